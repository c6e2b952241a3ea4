// The bulk GEMM's weight stream alone (kernels/gemm/skinny_gemm_bulk.cuh without its arithmetic):
// how fast one decode token's weights can be streamed through a shared-memory ring with
// cp.async.bulk, one CTA per SM, in the bulk GEMM's units (16 rows x 2048 columns of a [n, k]
// bf16 matrix, tile-major), depending on how the units are shared out:
//
//   static:   stream-K, CTA c of G takes units [c U / G, (c + 1) U / G) (the GEMM's split until
//             the twenty-third session; its split by whole tiles streams alike);
//   claim C:  CTAs claim chunks of C consecutive units from an atomic counter as they go, so an
//             SM that streams faster takes more chunks;
//   stride C: CTA c takes chunks c, c + G, c + 2G, ... of C units (no counter): the CTAs' reads
//             interleave in memory, as the claims' do.
//
// Why: the bulk GEMM's CTAs finish 3-18 us apart though each streams the same bytes
// (bench/RESULTS.md, fourteenth session): if SMs stream at different rates, claiming should bring
// the launch's end to about its CTAs' mean; if the spread is shared bandwidth, it should not.
// Each mode runs a Llama-shaped token (qkv, o, gate_up, down per layer, then lm_head; distinct
// weights) as one CUDA graph of plain launches, and each shape alone; the consumers only wait for
// the stage and release it. Per-CTA end times (globaltimer) of one launch per shape give the
// spread.
//
// Usage: bench_weight_stream [--layers 32] [--hidden 4096] [--intermediate 14336] [--heads 32]
//                            [--kv-heads 8] [--head-dim 128] [--vocab 128256] [--chunks 1,2,4,-2]
// (--chunks: the claim modes' chunk sizes, negative for the stride modes)
// Output: a table on stderr, one JSON object on stdout.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/gemm/bulk_copy.cuh"

namespace {

constexpr int kRows = 16;
constexpr int kKU = 2048;                 // columns per unit (k % 2048 == 0 here)
constexpr int kRowStride = 2 * kKU + 64;  // as the GEMM's full footprint
constexpr int kStageBytes = kRows * kRowStride;
constexpr int kStages = 3;  // the full footprint's ring at these units
constexpr int kConsumers = 8;
constexpr int kThreads = (kConsumers + 1) * 32;
constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + kStages * 8;

using namespace pmkv::kernels::bulk_copy_detail;

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// chunk 0: static split; chunk > 0: claim `chunk` units at a time from claim[0] (claim[1] counts
// the CTAs done; the last resets both for the next launch); chunk < 0: chunks of -chunk units,
// CTA c taking chunks c, c + G, ... ends: per-CTA end time, or null.
__global__ void __launch_bounds__(kThreads, 1)
    stream_kernel(const uint16_t* __restrict__ w, int n, int k, int chunk, int* claim,
                  uint64_t* ends, uint32_t* sink) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  int64_t* meta = reinterpret_cast<int64_t*>(empty + kStages);  // the stage's unit, -1: the end
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers * 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int64_t ku = k / kKU;
  const int64_t units = (n + kRows - 1) / kRows * ku;
  const int64_t G = gridDim.x;
  if (warp == kConsumers) {
    int i = 0;
    auto stage_for = [&](int64_t u) {  // waits for a free stage, marks it with u
      const int s = i % kStages;
      if (i >= kStages) mbar_wait(&empty[s], ((i / kStages) - 1) & 1);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if (lane == 0) meta[s] = u;
      __syncwarp();
      return s;
    };
    auto issue = [&](int64_t u) {
      const int s = stage_for(u);
      if (lane == 0) mbar_arrive_expect_tx(&full[s], kRows * kKU * 2);
      __syncwarp();
      const int64_t tile = u / ku, kk = u % ku;
      for (int r = lane; r < kRows; r += 32) {
        int64_t row = tile * kRows + r;
        row = row < n ? row : n - 1;
        bulk_copy(smem + s * kStageBytes + r * kRowStride, w + row * k + kk * kKU, kKU * 2,
                  &full[s]);
      }
      ++i;
    };
    if (chunk == 0) {
      for (int64_t u = blockIdx.x * units / G; u < (blockIdx.x + 1) * units / G; ++u)
        issue(u);
    } else if (chunk < 0) {
      for (int64_t u0 = int64_t{blockIdx.x} * -chunk; u0 < units; u0 += G * -chunk) {
        const int64_t u1 = u0 - chunk < units ? u0 - chunk : units;
        for (int64_t u = u0; u < u1; ++u)
          issue(u);
      }
    } else {
      for (;;) {
        int c = 0;
        if (lane == 0) c = atomicAdd(&claim[0], 1);
        c = __shfl_sync(0xffffffffu, c, 0);
        const int64_t u0 = int64_t{c} * chunk;
        if (u0 >= units) break;
        const int64_t u1 = u0 + chunk < units ? u0 + chunk : units;
        for (int64_t u = u0; u < u1; ++u)
          issue(u);
      }
    }
    const int s = stage_for(-1);  // the end
    if (lane == 0) mbar_arrive(&full[s]);
    return;
  }
  uint32_t x = 0;
  for (int i = 0;; ++i) {
    const int s = i % kStages;
    mbar_wait(&full[s], (i / kStages) & 1);
    const int64_t u = meta[s];
    if (u < 0) break;
    x ^= *reinterpret_cast<const uint32_t*>(smem + s * kStageBytes + threadIdx.x * 16);
    mbar_arrive(&empty[s]);
  }
  if (x == 0x9E3779B9u) *sink = x;  // keeps the reads
  asm volatile("bar.sync 1, %0;\n" ::"r"(kConsumers * 32) : "memory");
  if (threadIdx.x == 0) {
    if (ends != nullptr) ends[blockIdx.x] = now_ns();
    if (chunk > 0) {
      __threadfence();
      if (atomicAdd(&claim[1], 1) == G - 1) {  // every CTA is past its last claim
        claim[0] = 0;
        claim[1] = 0;
        __threadfence();
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  pmkv::bench::LlamaShapes model;
  std::string chunks = "1,2,4";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--chunks") {
      chunks = v;
    } else if (!model.parse(a, v)) {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  const int64_t L = model.layers;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  using Shape = pmkv::bench::LlamaShapes::Shape;
  const auto layer = model.layer();
  const Shape shapes[5] = {layer[0], layer[1], layer[2], layer[3], model.head()};
  for (const Shape& sh : shapes) {
    if (sh.k % kKU != 0) {
      std::fprintf(stderr, "%s: k %lld is not a multiple of %d\n", sh.name,
                   static_cast<long long>(sh.k), kKU);
      return 2;
    }
  }
  const int64_t total = model.total_elements();
  const pmkv::bench::TokenWeights tw = pmkv::bench::alloc_token_weights(model);
  const std::vector<const uint16_t*>* W = tw.layer;
  const uint16_t* Wh = tw.head;
  int* claim = nullptr;
  uint64_t* ends = nullptr;
  uint32_t* sink = nullptr;
  CK(cudaMalloc(&claim, 2 * sizeof(int)));
  CK(cudaMemset(claim, 0, 2 * sizeof(int)));
  CK(cudaMalloc(&ends, sms * sizeof(uint64_t)));
  CK(cudaMalloc(&sink, 4));
  CK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaDeviceSynchronize());

  const auto launch = [&](const uint16_t* w, const Shape& sh, int chunk, uint64_t* e) {
    stream_kernel<<<sms, kThreads, kSmemBytes, s>>>(w, static_cast<int>(sh.n),
                                                    static_cast<int>(sh.k), chunk, claim, e, sink);
    CK(cudaGetLastError());
  };
  // A graph's time: the fastest of 5 rounds of 5 replays.
  const auto graph_ms = [&](auto&& body) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    body();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s));
    double best = 1e30;
    for (int r = 0; r < 5; ++r) {
      CK(cudaEventRecord(e0, s));
      for (int j = 0; j < 5; ++j)
        CK(cudaGraphLaunch(ge, s));
      CK(cudaEventRecord(e1, s));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      best = std::min(best, double(ms) / 5);
    }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return best;
  };
  std::vector<int> modes{0};
  for (const int64_t c : pmkv::bench::parse_list(chunks))
    modes.push_back(static_cast<int>(c));
  std::fprintf(stderr, "%s, %d SMs; token weights %.3f GB\n", prop.name, sms, 2.0 * total / 1e9);
  std::string json = "{\"device\": \"" + std::string(prop.name) +
                     "\", \"token_weight_bytes\": " + std::to_string(2 * total) + ", \"modes\": [";
  for (size_t mi = 0; mi < modes.size(); ++mi) {
    const int chunk = modes[mi];
    const double token_ms = graph_ms([&] {
      for (int64_t l = 0; l < L; ++l)
        for (int j = 0; j < 4; ++j)
          launch(W[j][l], shapes[j], chunk, nullptr);
      launch(Wh, shapes[4], chunk, nullptr);
    });
    std::fprintf(stderr, "%-8s chunk %d: token %.3f ms, %.0f GB/s\n",
                 chunk > 0   ? "claim"
                 : chunk < 0 ? "stride"
                             : "static",
                 chunk < 0 ? -chunk : chunk, token_ms, 2.0 * total / (token_ms * 1e-3) / 1e9);
    json += std::string(mi ? ", " : "") + "{\"chunk\": " + std::to_string(chunk) +
            ", \"token_ms\": " + std::to_string(token_ms) + ", \"shapes\": {";
    for (int j = 0; j < 5; ++j) {
      const Shape& sh = shapes[j];
      const uint16_t* w0 = j < 4 ? W[j][0] : Wh;
      // Alone: 32 launches of the shape over distinct layers' weights (lm_head: the same one).
      const double ms = graph_ms([&] {
                          for (int64_t l = 0; l < L; ++l)
                            launch(j < 4 ? W[j][l] : Wh, sh, chunk, nullptr);
                        }) /
                        static_cast<double>(L);
      // Spread: one launch after an idle GPU, each CTA's end after the earliest.
      CK(cudaStreamSynchronize(s));
      launch(w0, sh, chunk, ends);
      CK(cudaStreamSynchronize(s));
      std::vector<uint64_t> t(sms);
      CK(cudaMemcpy(t.data(), ends, sms * sizeof(uint64_t), cudaMemcpyDeviceToHost));
      std::sort(t.begin(), t.end());
      const double med = (t[sms / 2] - t[0]) * 1e-3, last = (t[sms - 1] - t[0]) * 1e-3;
      const double bytes = 2.0 * sh.n * sh.k;
      std::fprintf(stderr,
                   "    %-8s %8.2f us  %5.0f GB/s  CTA ends after the first: median %.2f, last "
                   "%.2f us\n",
                   sh.name, ms * 1e3, bytes / (ms * 1e-3) / 1e9, med, last);
      json += std::string(j ? ", " : "") + "\"" + sh.name +
              "\": {\"us\": " + std::to_string(ms * 1e3) +
              ", \"gb_s\": " + std::to_string(bytes / (ms * 1e-3) / 1e9) +
              ", \"end_median_us\": " + std::to_string(med) +
              ", \"end_last_us\": " + std::to_string(last) + "}";
    }
    json += "}}";
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
}
