// The skinny GEMM (kernels/gemm/skinny_gemm.h) over one decode token's weight stream of a
// Llama-shaped model: for each layer qkv, o, gate_up and down (distinct weights, so nothing is
// read from L2 twice), then lm_head, captured in one CUDA graph and replayed. Compares the register
// kernel with the bulk kernel (sm_90; its full and compact footprints, split by whole tiles and by
// units) at the m given, against the device-to-device copy bandwidth and a plain read-only stream
// over the same bytes (the ceiling a weight-streaming kernel can reach). Also each shape alone (32
// launches of it in a graph).
//
// Usage: bench_skinny_gemm [--rows 1,2,4,8] [--layers 32] [--hidden 4096] [--intermediate 14336]
//                          [--heads 32] [--kv-heads 8] [--head-dim 128] [--vocab 128256]
// Output: a table on stderr, one JSON object on stdout (device, copy_gb_s, read_gb_s, points).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/gemm/skinny_gemm.h"

using namespace pmkv;

int main(int argc, char** argv) {
  std::string rows = "1,2,4,8";
  bench::LlamaShapes model;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--rows") {
      rows = v;
    } else if (!model.parse(a, v)) {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  const int64_t L = model.layers, H = model.hidden, I = model.intermediate, V = model.vocab;
  const int64_t q_width = model.heads * model.head_dim;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const bool hopper = prop.major >= 9;
  using Shape = bench::LlamaShapes::Shape;
  const auto shapes = model.layer();
  const Shape head = model.head();
  const int64_t total = model.total_elements();
  const bench::TokenWeights tw = bench::alloc_token_weights(model);
  const std::vector<const uint16_t*>* W = tw.layer;
  const uint16_t* Wh = tw.head;
  const int64_t max_k = std::max(H, std::max(I, q_width));
  uint16_t* a = nullptr;
  float* d = nullptr;
  uint32_t* sink = nullptr;
  CK(cudaMalloc(&a, 16 * max_k * 2));
  CK(cudaMalloc(&d, static_cast<size_t>(16 * std::max(V, 2 * I)) * 4));
  CK(cudaMalloc(&sink, 4));
  bench::fill_bf16<<<64, 256>>>(a, 16 * max_k, 7u);
  const int64_t ws_bytes = kernels::skinny_gemm_workspace_bytes(std::max(V, 2 * I), sms);
  void* ws = nullptr;
  CK(cudaMalloc(&ws, static_cast<size_t>(ws_bytes)));
  CK(cudaMemset(ws, 0, static_cast<size_t>(ws_bytes)));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaDeviceSynchronize());

  auto elapsed_ms = [&](auto&& enqueue, int reps) {
    for (int r = 0; r < 2; ++r)
      enqueue();
    CK(cudaEventRecord(e0, s));
    for (int r = 0; r < reps; ++r)
      enqueue();
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return double(ms) / reps;
  };
  // Copy and read ceilings.
  const size_t cb = size_t{2} << 30;
  void *x = nullptr, *y = nullptr;
  CK(cudaMalloc(&x, cb));
  CK(cudaMalloc(&y, cb));
  const double copy_ms =
      elapsed_ms([&] { CK(cudaMemcpyAsync(y, x, cb, cudaMemcpyDeviceToDevice, s)); }, 10);
  CK(cudaFree(x));
  CK(cudaFree(y));
  const double copy_gbps = 2.0 * cb / (copy_ms * 1e-3) / 1e9;
  const double read_ms = elapsed_ms(
      [&] {
        bench::read_stream<<<sms * 8, 512, 0, s>>>(reinterpret_cast<const uint4*>(W[0][0]),
                                                   total / 8, nullptr, sink);
      },
      3);
  const double bytes = 2.0 * total;
  const double read_gbps = bytes / (read_ms * 1e-3) / 1e9;
  std::fprintf(stderr, "%s: copy %.0f GB/s, read stream %.0f GB/s over %.2f GB\n", prop.name,
               copy_gbps, read_gbps, bytes / 1e9);

  auto graph_ms = [&](auto&& body) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    body();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    const double ms = elapsed_ms([&] { CK(cudaGraphLaunch(ge, s)); }, 10);
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return ms;
  };
  std::string json = "{\"device\": \"" + std::string(prop.name) +
                     "\", \"copy_gb_s\": " + std::to_string(copy_gbps) +
                     ", \"read_gb_s\": " + std::to_string(read_gbps) +
                     ", \"token_weight_gb\": " + std::to_string(bytes / 1e9) + ", \"points\": [";
  bool first = true;
  for (const int64_t m : bench::parse_list(rows)) {
    // register, bulk, and the bulk kernel's compact footprint (SkinnyGemmParams::compact), each
    // bulk one split by whole tiles (the default) and by units (stream-K,
    // SkinnyGemmParams::stream_k).
    for (const int variant : {0, 1, 2, 3, 4}) {
      const bool bulk = variant >= 1;
      const char* kname = variant == 0   ? "register"
                          : variant == 1 ? "bulk"
                          : variant == 2 ? "compact"
                          : variant == 3 ? "bulk_sk"
                                         : "compact_sk";
      if (bulk && !hopper) continue;
      auto gemm = [&](const uint16_t* w, const Shape& sh) {
        kernels::SkinnyGemmParams p;
        p.a = a;
        p.w = w;
        p.d = d;
        p.m = m;
        p.n = sh.n;
        p.k = sh.k;
        p.num_sms = sms;
        p.bulk = bulk;
        p.workspace = ws;
        p.workspace_bytes = ws_bytes;
        p.compact = variant == 2 || variant == 4;
        p.stream_k = variant >= 3;
        CK(kernels::launch_skinny_gemm(p, s));
      };
      const double ms = graph_ms([&] {
        for (int64_t l = 0; l < L; ++l)
          for (int j = 0; j < 4; ++j)
            gemm(W[j][l], shapes[j]);
        gemm(Wh, head);
      });
      std::fprintf(
          stderr, "m=%lld %-8s token: %.3f ms, %.0f GB/s (%.1f%% of copy, %.1f%% of read) |",
          static_cast<long long>(m), kname, ms, bytes / (ms * 1e-3) / 1e9,
          100 * bytes / (ms * 1e-3) / 1e9 / copy_gbps, 100 * bytes / (ms * 1e-3) / 1e9 / read_gbps);
      json += std::string(first ? "" : ", ") + "{\"m\": " + std::to_string(m) + ", \"kernel\": \"" +
              kname + "\", \"token_ms\": " + std::to_string(ms) +
              ", \"token_gb_s\": " + std::to_string(bytes / (ms * 1e-3) / 1e9);
      first = false;
      for (int j = 0; j < 4; ++j) {
        const double ms1 = graph_ms([&] {
          for (int64_t l = 0; l < L; ++l)
            gemm(W[j][l], shapes[j]);
        });
        const double gbps = L * shapes[j].n * shapes[j].k * 2.0 / (ms1 * 1e-3) / 1e9;
        std::fprintf(stderr, " %s %.1f us %.0f GB/s |", shapes[j].name, ms1 * 1e3 / L, gbps);
        json += std::string(", \"") + shapes[j].name + "_us\": " + std::to_string(ms1 * 1e3 / L) +
                ", \"" + shapes[j].name + "_gb_s\": " + std::to_string(gbps);
      }
      std::fprintf(stderr, "\n");
      json += "}";
    }
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
}
