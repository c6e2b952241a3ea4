#pragma once
// Boilerplate shared by the CUDA benchmarks (bench/*.cu, one translation unit each): a CUDA error
// check that exits with the failing expression, comma-separated number lists, a deterministic
// bf16 fill, a plain read stream, and the weight shapes of one Llama decoder token.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace pmkv::bench {

inline void check_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s:%d: %s -> %s\n", file, line, expr, cudaGetErrorString(e));
    std::exit(1);
  }
}

// "1,4,16" -> {1, 4, 16}.
template <class T = int64_t>
std::vector<T> parse_list(const std::string& s) {
  std::vector<T> out;
  size_t at = 0;
  while (at < s.size()) {
    const size_t comma = s.find(',', at);
    out.push_back(static_cast<T>(std::stoll(s.substr(at, comma - at))));
    at = comma == std::string::npos ? s.size() : comma + 1;
  }
  return out;
}

namespace {

// The fills' hash of element i.
__device__ __forceinline__ uint32_t fill_hash(int64_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  return h;
}

// Deterministic bf16 values with |x| in [2^-7, 2^-6) and random signs (a grid-stride fill).
__global__ void fill_bf16(uint16_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint32_t h = fill_hash(i, seed);
    p[i] = static_cast<uint16_t>(0x3C00u | (h & 0x3FFu) | ((h >> 16) & 0x8000u));
  }
}

// Deterministic fp32 values in [-1, 1) (a grid-stride fill).
__global__ void fill_f32(float* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    p[i] = static_cast<float>(fill_hash(i, seed) & 0xFFFFFu) / 524288.0f - 1.0f;
}

// A plain read of n16 16-byte words, grid-stride, 8 independent loads in flight a thread (launch
// 8 CTAs of 512 threads an SM): the fastest these benchmarks read a buffer. It lets the kernel
// after it start at once under programmatic dependent launch. ends: each CTA's end
// (%globaltimer, ns), or null.
__global__ void read_stream(const uint4* p, int64_t n16, uint64_t* ends, uint32_t* sink) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
  uint32_t x = 0;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  for (; i + 7 * stride < n16; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u)
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                   : "l"(p + i + u * stride));
#pragma unroll
    for (int u = 0; u < 8; ++u)
      x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = p[i];
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x9E3779B9u) *sink = x;  // never true in practice; keeps the loads
  if (ends != nullptr) {
    __syncthreads();
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (threadIdx.x == 0) ends[blockIdx.x] = t;
  }
}

}  // namespace

// The weight matrices [n, k] of one Llama decoder token: per layer qkv, o, gate_up (fused) and
// down, then lm_head. Defaults: Llama-3-8B.
struct LlamaShapes {
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  int64_t layers = 32, hidden = 4096, intermediate = 14336, heads = 32, kv_heads = 8,
          head_dim = 128, vocab = 128256;

  // Takes `--layers`, `--hidden`, `--intermediate`, `--heads`, `--kv-heads`, `--head-dim`,
  // `--vocab`; false for any other option.
  bool parse(const std::string& option, const std::string& value) {
    int64_t* fields[] = {&layers, &hidden, &intermediate, &heads, &kv_heads, &head_dim, &vocab};
    const char* names[] = {"--layers",   "--hidden",   "--intermediate", "--heads",
                           "--kv-heads", "--head-dim", "--vocab"};
    for (int i = 0; i < 7; ++i) {
      if (option == names[i]) {
        *fields[i] = std::stoll(value);
        return true;
      }
    }
    return false;
  }
  std::array<Shape, 4> layer() const {
    return {Shape{"qkv", (heads + 2 * kv_heads) * head_dim, hidden},
            Shape{"o", hidden, heads * head_dim}, Shape{"gate_up", 2 * intermediate, hidden},
            Shape{"down", hidden, intermediate}};
  }
  Shape head() const { return {"lm_head", vocab, hidden}; }
  // Elements of every weight a token reads.
  int64_t total_elements() const {
    int64_t total = head().n * head().k;
    for (const Shape& s : layer())
      total += layers * s.n * s.k;
    return total;
  }
};

// One token's weights in device memory (never freed: a benchmark's lifetime), filled with
// fill_bf16: the layers' matrices back to back (layer[j][l]: matrix j of layer l, in
// LlamaShapes::layer() order), then lm_head. Distinct weights, so a token reads nothing from L2
// twice.
struct TokenWeights {
  std::vector<const uint16_t*> layer[4];
  const uint16_t* head = nullptr;
};

inline TokenWeights alloc_token_weights(const LlamaShapes& model) {
  const int64_t total = model.total_elements();
  uint16_t* base = nullptr;
  check_cuda(cudaMalloc(&base, static_cast<size_t>(total) * 2), "cudaMalloc", __FILE__, __LINE__);
  fill_bf16<<<4096, 256>>>(base, total, 0x9E3779B9u);
  check_cuda(cudaGetLastError(), "fill_bf16", __FILE__, __LINE__);
  TokenWeights w;
  const auto shapes = model.layer();
  int64_t off = 0;
  for (int64_t l = 0; l < model.layers; ++l)
    for (int j = 0; j < 4; ++j) {
      w.layer[j].push_back(base + off);
      off += shapes[j].n * shapes[j].k;
    }
  w.head = base + off;
  return w;
}

// Captures body() (which enqueues work on s) into a CUDA graph, replays it once, then times 5
// rounds of `replays` back-to-back replays: the fastest round's ms a replay.
template <class Body>
double best_graph_ms(cudaStream_t s, Body&& body, int replays) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  check_cuda(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), "capture", __FILE__, __LINE__);
  body();
  check_cuda(cudaStreamEndCapture(s, &g), "cudaStreamEndCapture", __FILE__, __LINE__);
  check_cuda(cudaGraphInstantiate(&ge, g, 0), "cudaGraphInstantiate", __FILE__, __LINE__);
  check_cuda(cudaGraphLaunch(ge, s), "cudaGraphLaunch", __FILE__, __LINE__);
  cudaEvent_t e0, e1;
  check_cuda(cudaEventCreate(&e0), "cudaEventCreate", __FILE__, __LINE__);
  check_cuda(cudaEventCreate(&e1), "cudaEventCreate", __FILE__, __LINE__);
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    check_cuda(cudaEventRecord(e0, s), "cudaEventRecord", __FILE__, __LINE__);
    for (int j = 0; j < replays; ++j)
      check_cuda(cudaGraphLaunch(ge, s), "cudaGraphLaunch", __FILE__, __LINE__);
    check_cuda(cudaEventRecord(e1, s), "cudaEventRecord", __FILE__, __LINE__);
    check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize", __FILE__, __LINE__);
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime", __FILE__, __LINE__);
    best = std::min(best, double(ms) / replays);
  }
  check_cuda(cudaEventDestroy(e0), "cudaEventDestroy", __FILE__, __LINE__);
  check_cuda(cudaEventDestroy(e1), "cudaEventDestroy", __FILE__, __LINE__);
  check_cuda(cudaGraphExecDestroy(ge), "cudaGraphExecDestroy", __FILE__, __LINE__);
  check_cuda(cudaGraphDestroy(g), "cudaGraphDestroy", __FILE__, __LINE__);
  return best;
}

// The device's copy bandwidth in GB/s, read + write counted: the median of ten 2 GiB
// device-to-device copies on the default stream after two warm-up copies.
inline double copy_bandwidth_gbps() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  check_cuda(cudaMalloc(&a, bytes), "cudaMalloc", __FILE__, __LINE__);
  check_cuda(cudaMalloc(&b, bytes), "cudaMalloc", __FILE__, __LINE__);
  check_cuda(cudaMemset(a, 1, bytes), "cudaMemset", __FILE__, __LINE__);
  cudaEvent_t e0, e1;
  check_cuda(cudaEventCreate(&e0), "cudaEventCreate", __FILE__, __LINE__);
  check_cuda(cudaEventCreate(&e1), "cudaEventCreate", __FILE__, __LINE__);
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    check_cuda(cudaEventRecord(e0), "cudaEventRecord", __FILE__, __LINE__);
    check_cuda(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync", __FILE__,
               __LINE__);
    check_cuda(cudaEventRecord(e1), "cudaEventRecord", __FILE__, __LINE__);
    check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize", __FILE__, __LINE__);
    float t = 0;
    check_cuda(cudaEventElapsedTime(&t, e0, e1), "cudaEventElapsedTime", __FILE__, __LINE__);
    if (i >= 2) ms.push_back(t);
  }
  check_cuda(cudaEventDestroy(e0), "cudaEventDestroy", __FILE__, __LINE__);
  check_cuda(cudaEventDestroy(e1), "cudaEventDestroy", __FILE__, __LINE__);
  check_cuda(cudaFree(a), "cudaFree", __FILE__, __LINE__);
  check_cuda(cudaFree(b), "cudaFree", __FILE__, __LINE__);
  std::sort(ms.begin(), ms.end());
  return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;
}

}  // namespace pmkv::bench

#define CK(x) ::pmkv::bench::check_cuda((x), #x, __FILE__, __LINE__)
