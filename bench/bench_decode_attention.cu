// Decode attention benchmark: times launch_decode (the split kernel, which merges too; the plan is
// built and uploaded once, outside the timing) over uniform-bit page tables with shuffled page ids,
// with CUDA events around every launch (median of many), rotating over enough copies of the inputs
// that the L2 cache cannot hold them. Prints one JSON object per point (JSON lines). Each point
// also times its read floor (read_floor_us): a plain kernel reading the point's KV bytes once,
// contiguously, timed the same way, the fastest any decode kernel over those bytes could be here.
//
//   bench_decode_attention [--bits 16,8,4,2] [--batch 1,16,64] [--ctx 1024,4096,16384,65536]
//                          [--kv-heads 8] [--group 4] [--head-dim 128] [--tokens16 32]
//                          [--out FILE.jsonl] [--min-time-ms 300] [--min-item-kb 16,64]
//                          [--ctas-per-sm N] [--page-order shuffled|sequential]
//                          [--dense auto|never|always]
// (--min-item-kb: DecodePlanConfig::min_item_bytes in KiB, one point per value, for tuning the
// plan; default the engine's. --ctas-per-sm: DecodePlanConfig::ctas_per_sm, the resident CTAs an
// SM the plan counts for every bit-width; default 0, the kernels' own with the short-item rule.
// --dense: DecodePlanConfig::dense, the 2/4-bit dense variant; the JSON's "dense" says whether the
// point's launch took it.)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/attention/decode.h"
#include "kernels/kv_page_layout.h"

namespace {

using namespace pmkv;

__device__ uint32_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Random code bytes everywhere (never zeros: zeros can run faster than real data).
__global__ void fill_random(uint32_t* p, int64_t words, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < words;
       i += int64_t{gridDim.x} * blockDim.x) {
    p[i] = mix(seed + static_cast<uint64_t>(i));
  }
}

// Plausible {scale, zero} params for every (token, head) of every page at `bits`.
__global__ void fill_params(uint8_t* pool, int64_t page_bytes, int64_t num_pages, int bits,
                            int64_t k_params, int64_t per_page, uint64_t seed) {
  const int64_t n = num_pages * per_page;
  const int64_t par = kv::param_bytes(bits);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t page = i / per_page, j = i % per_page;  // K then V params are contiguous
    const uint32_t r = mix(seed + static_cast<uint64_t>(i));
    kv::store_params(pool + page * page_bytes + k_params + j * par, bits,
                     1e-3f + static_cast<float>(r & 0xFFFF) * 1e-7f,
                     static_cast<float>(r >> 16) / 65536.0f - 0.5f);
  }
}

// The read floor: streams `bytes` (a multiple of 16) from p with 16-byte loads, four in flight
// per thread, and keeps the XOR of everything read (stored only if it matches a value it never
// takes, so the loads cannot be dropped). Timed the way the decode launches are, this is what
// any kernel that reads a point's KV bytes once costs, fixed launch cost included.
__global__ void __launch_bounds__(512) read_floor(const uint4* p, int64_t n16, uint32_t* sink) {
  uint32_t x = 0;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      v[k] = __ldcs(p + i + k * stride);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      x ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = __ldcs(p + i);
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x9e3779b9u) *sink = x;
}

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> bits_list = {16, 8, 4, 2}, batches = {1, 16, 64},
                   contexts = {1024, 4096, 16384, 65536};
  int kv_heads = 8, group = 4, head_dim = 128, tokens16 = 32;
  double min_time_ms = 300;
  int ctas_per_sm = 0;
  std::vector<int> min_item_kbs = {
      static_cast<int>(kernels::DecodePlanConfig{}.min_item_bytes >> 10)};
  std::string out_path;
  bool shuffle_pages = true;
  auto dense = kernels::DecodePlanConfig::Dense::kAuto;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--bits")
      bits_list = bench::parse_list<int>(argv[i + 1]);
    else if (a == "--batch")
      batches = bench::parse_list<int>(argv[i + 1]);
    else if (a == "--ctx")
      contexts = bench::parse_list<int>(argv[i + 1]);
    else if (a == "--kv-heads")
      kv_heads = std::atoi(argv[i + 1]);
    else if (a == "--group")
      group = std::atoi(argv[i + 1]);
    else if (a == "--head-dim")
      head_dim = std::atoi(argv[i + 1]);
    else if (a == "--tokens16")
      tokens16 = std::atoi(argv[i + 1]);
    else if (a == "--out")
      out_path = argv[i + 1];
    else if (a == "--min-item-kb")
      min_item_kbs = bench::parse_list<int>(argv[i + 1]);
    else if (a == "--ctas-per-sm")
      ctas_per_sm = std::atoi(argv[i + 1]);
    else if (a == "--min-time-ms")
      min_time_ms = std::atof(argv[i + 1]);
    else if (a == "--page-order") {
      const std::string v = argv[i + 1];
      if (v != "shuffled" && v != "sequential") {
        std::fprintf(stderr, "--page-order: shuffled or sequential, not %s\n", v.c_str());
        return 2;
      }
      shuffle_pages = v == "shuffled";
    } else if (a == "--dense") {
      const std::string v = argv[i + 1];
      using D = kernels::DecodePlanConfig::Dense;
      if (v != "auto" && v != "never" && v != "always") {
        std::fprintf(stderr, "--dense: auto, never or always, not %s\n", v.c_str());
        return 2;
      }
      dense = v == "auto" ? D::kAuto : v == "never" ? D::kNever : D::kAlways;
    } else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  FILE* out = out_path.empty() ? stdout : std::fopen(out_path.c_str(), "w");
  if (out == nullptr) return 2;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const double copy_gbps = pmkv::bench::copy_bandwidth_gbps();
  std::fprintf(stderr, "device %s, %d SMs, L2 %d MiB, copy bandwidth %.0f GB/s (read+write)\n",
               prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbps);

  const kv::PageGeometry g{kv_heads, head_dim, tokens16};
  const int64_t page_bytes = kv::page_bytes(g);
  const int heads = kv_heads * group;
  const int64_t l2_rotation_bytes = int64_t{4} * prop.l2CacheSize;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::mt19937 rng(12345);

  for (const int bits : bits_list) {
    for (const int batch : batches) {
      for (const int ctx : contexts) {
        const int T = kv::tokens_per_page(g, bits);
        const int pps = (ctx + T - 1) / T;
        const int64_t pages = int64_t{batch} * pps;
        const int64_t q_bytes = int64_t{batch} * heads * head_dim * 2;  // bf16 q, bf16 out
        const int64_t kv_bytes = int64_t{batch} * ctx * kv_heads * 2 *
                                 (kv::row_bytes(head_dim, bits) + kv::param_bytes(bits));
        const int64_t bytes = kv_bytes + 2 * q_bytes;
        const int rot = static_cast<int>(
            std::clamp<int64_t>((l2_rotation_bytes + kv_bytes - 1) / kv_bytes, 1, 1024));
        const int64_t pool_pages = pages * rot;
        size_t free_b = 0, total_b = 0;
        CK(cudaMemGetInfo(&free_b, &total_b));
        const double pool_gb = double(pool_pages) * page_bytes / 1e9;
        std::fprintf(stderr, "bits %2d batch %2d ctx %6d: pool %.2f GB x%d ... ", bits, batch, ctx,
                     pool_gb, rot);
        if (double(pool_pages) * page_bytes + (size_t{2} << 30) > double(free_b)) {
          std::fprintf(stderr, "skipped (does not fit)\n");
          std::fprintf(out,
                       "{\"bits\": %d, \"batch\": %d, \"context\": %d, \"skipped\": \"does not fit "
                       "in device memory\"}\n",
                       bits, batch, ctx);
          continue;
        }
        uint8_t* pool = nullptr;
        CK(cudaMalloc(&pool, pool_pages * page_bytes));
        fill_random<<<4096, 256>>>(reinterpret_cast<uint32_t*>(pool), pool_pages * page_bytes / 4,
                                   rng());
        CK(cudaGetLastError());
        const kv::PageLayout L = kv::page_layout(g, bits);
        fill_params<<<4096, 256>>>(pool, page_bytes, pool_pages, bits, L.k_params,
                                   int64_t{2} * L.tokens * L.heads, rng());
        CK(cudaGetLastError());

        // Page tables: rot copies with disjoint, shuffled page ids (a pool after churn; or, with
        // --page-order sequential, each sequence's pages in pool order); the same shape.
        std::vector<int32_t> perm(pool_pages);
        std::iota(perm.begin(), perm.end(), 0);
        if (shuffle_pages) std::shuffle(perm.begin(), perm.end(), rng);
        std::vector<int32_t> starts(batch + 1), page_bits(pages, bits), page_tokens(pages, T);
        for (int s = 0; s <= batch; ++s)
          starts[s] = s * pps;
        for (int s = 0; s < batch; ++s)
          page_tokens[(s + 1) * pps - 1] = ctx - (pps - 1) * T;
        int32_t* ids = nullptr;
        int32_t* tok = nullptr;
        CK(cudaMalloc(&ids, pool_pages * 4));
        CK(cudaMalloc(&tok, pages * 4));
        CK(cudaMemcpy(ids, perm.data(), pool_pages * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(tok, page_tokens.data(), pages * 4, cudaMemcpyHostToDevice));

        for (const int min_item_kb : min_item_kbs) {
          kernels::DecodePlanConfig cfg;
          cfg.num_kv_heads = kv_heads;
          cfg.group = group;
          cfg.head_dim = head_dim;
          cfg.tokens16 = tokens16;
          cfg.num_sms = prop.multiProcessorCount;
          cfg.min_item_bytes = int64_t{min_item_kb} << 10;
          cfg.ctas_per_sm = ctas_per_sm;
          cfg.dense = dense;
          const kernels::DecodeLayerTable table{batch, starts.data(), page_bits.data(),
                                                page_tokens.data()};
          kernels::DecodePlan plan;
          kernels::plan_decode(cfg, {&table, 1}, &plan);
          void* ws = nullptr;
          CK(cudaMalloc(&ws, plan.workspace_bytes));
          CK(kernels::upload_decode_plan(plan, ws, plan.workspace_bytes, nullptr));

          std::vector<__nv_bfloat16> hq(size_t(batch) * heads * head_dim * rot);
          std::normal_distribution<float> dist(0.0f, 1.0f);
          for (auto& x : hq)
            x = __float2bfloat16(dist(rng));
          __nv_bfloat16 *q = nullptr, *o = nullptr;
          CK(cudaMalloc(&q, hq.size() * 2));
          CK(cudaMalloc(&o, hq.size() * 2));
          CK(cudaMemcpy(q, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));

          kernels::DecodeParams p;
          p.pool = pool;
          p.page_bytes = page_bytes;
          p.num_kv_heads = kv_heads;
          p.group = group;
          p.head_dim = head_dim;
          p.tokens16 = tokens16;
          p.page_tokens = tok;
          p.plan = kernels::decode_layer_view(plan, ws, 0);
          p.q_dtype = kernels::DType::kBF16;
          p.out_dtype = kernels::DType::kBF16;
          p.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
          auto launch = [&](int r) {
            p.page_ids = ids + int64_t{r} * pages;
            p.q = q + int64_t{r} * batch * heads * head_dim;
            p.out = o + int64_t{r} * batch * heads * head_dim;
            CK(kernels::launch_decode(p, nullptr));
          };
          for (int r = 0; r < std::max(3, rot); ++r)
            launch(r % rot);  // warm-up
          CK(cudaDeviceSynchronize());
          CK(cudaEventRecord(e0));
          launch(0);
          CK(cudaEventRecord(e1));
          CK(cudaEventSynchronize(e1));
          float once = 0;
          CK(cudaEventElapsedTime(&once, e0, e1));
          const int reps =
              static_cast<int>(std::clamp(min_time_ms / std::max(once, 1e-3f), 30.0, 500.0));
          std::vector<cudaEvent_t> ev(2 * reps);
          for (auto& e : ev)
            CK(cudaEventCreate(&e));
          for (int i = 0; i < reps; ++i) {
            CK(cudaEventRecord(ev[2 * i]));
            launch(i % rot);
            CK(cudaEventRecord(ev[2 * i + 1]));
          }
          CK(cudaDeviceSynchronize());
          std::vector<float> ms(reps);
          for (int i = 0; i < reps; ++i)
            CK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
          for (auto& e : ev)
            CK(cudaEventDestroy(e));
#ifdef PMKV_DECODE_TRACE
          // The CTA-timeline probe: the last of a dozen back-to-back launches, one line per CTA
          // (row, SM, then slots 1-9 in ns after the earliest entry, -1 when unset, item, tiles).
          {
            constexpr size_t kRows = 65536;
            constexpr int kS = kernels::kDecodeTraceSlots;
            uint64_t* tr = nullptr;
            CK(cudaMalloc(&tr, kRows * kS * 8));
            CK(cudaMemset(tr, 0, kRows * kS * 8));
            kernels::set_decode_trace(tr);
            for (int i = 0; i < 12; ++i)
              launch(i % rot);
            CK(cudaDeviceSynchronize());
            kernels::set_decode_trace(nullptr);
            std::vector<uint64_t> h(kRows * kS);
            CK(cudaMemcpy(h.data(), tr, h.size() * 8, cudaMemcpyDeviceToHost));
            CK(cudaFree(tr));
            const char* dir = std::getenv("PMKV_TRACE_DIR");
            char name[512];
            std::snprintf(name, sizeof name, "%s/trace_b%d_B%d_T%d_m%d.txt", dir ? dir : ".", bits,
                          batch, ctx, min_item_kb);
            FILE* f = std::fopen(name, "w");
            if (f == nullptr) {
              std::fprintf(stderr, "cannot write %s\n", name);
              return 1;
            }
            uint64_t t0 = ~uint64_t{0};
            for (size_t r = 0; r < kRows; ++r)
              if (h[r * kS + 1] != 0) t0 = std::min(t0, h[r * kS + 1]);
            for (size_t r = 0; r < kRows; ++r) {
              if (h[r * kS + 1] == 0) continue;
              std::fprintf(f, "%zu %llu", r, static_cast<unsigned long long>(h[r * kS]));
              for (int k = 1; k < 10; ++k)
                std::fprintf(f, " %lld",
                             h[r * kS + k] ? static_cast<long long>(h[r * kS + k] - t0) : -1ll);
              std::fprintf(f, " %llu %llu\n",
                           static_cast<unsigned long long>(h[r * kS + 10] & 0xffffffffu),
                           static_cast<unsigned long long>(h[r * kS + 10] >> 32));
            }
            std::fclose(f);
          }
#endif
          // The read floor of this point: its KV bytes, contiguous, from the same rotation of
          // pool copies, timed like the launches above (median of the same number of reps); the
          // fastest of three grid sizes (1, 2 and 4 CTAs of 512 threads an SM).
          double floor_us = 0;
          {
            uint32_t* sink = nullptr;
            CK(cudaMalloc(&sink, 4));
            const int64_t n16 = kv_bytes / 16;
            for (const int per_sm : {1, 2, 4}) {
              const int grid = prop.multiProcessorCount * per_sm;
              auto read_once = [&](int r) {
                read_floor<<<grid, 512>>>(
                    reinterpret_cast<const uint4*>(pool + r * pages * page_bytes), n16, sink);
              };
              for (int r = 0; r < std::max(3, rot); ++r)
                read_once(r % rot);
              std::vector<float> fms(reps);
              for (int i = 0; i < reps; ++i) {
                CK(cudaEventRecord(e0));
                read_once(i % rot);
                CK(cudaEventRecord(e1));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&fms[i], e0, e1));
              }
              CK(cudaGetLastError());
              const double us = median(fms) * 1e3;
              floor_us = floor_us == 0 ? us : std::min(floor_us, us);
            }
            CK(cudaFree(sink));
          }
          std::sort(ms.begin(), ms.end());
          const double t_us = ms[reps / 2] * 1e3;
          const double gbps = bytes / (t_us * 1e-6) / 1e9;
          std::fprintf(
              stderr, "min item %d KiB: %.1f us, %.0f GB/s (%.0f%% of copy), %d items, %d merges\n",
              min_item_kb, t_us, gbps, 100 * gbps / copy_gbps, plan.layers[0].num_items,
              plan.layers[0].num_merges);
          std::fprintf(
              out,
              "{\"bits\": %d, \"batch\": %d, \"context\": %d, \"kv_heads\": %d, "
              "\"q_heads\": %d, \"head_dim\": %d, \"tokens16\": %d, \"time_us\": %.3f, "
              "\"time_us_p10\": %.3f, \"time_us_p90\": %.3f, \"reps\": %d, \"rotation\": %d, "
              "\"bytes\": %lld, \"effective_gbps\": %.1f, \"copy_gbps\": %.1f, "
              "\"fraction_of_copy_bandwidth\": %.4f, \"items\": %d, \"merges\": %d, "
              "\"min_item_kib\": %d, \"ctas_per_sm\": %d, \"dense\": %s, \"page_order\": \"%s\", "
              "\"read_floor_us\": %.3f, \"fraction_of_read_floor\": %.4f, \"device\": \"%s\"}\n",
              bits, batch, ctx, kv_heads, heads, head_dim, tokens16, t_us, ms[reps / 10] * 1e3,
              ms[reps * 9 / 10] * 1e3, reps, rot, static_cast<long long>(bytes), gbps, copy_gbps,
              gbps / copy_gbps, plan.layers[0].num_items, plan.layers[0].num_merges, min_item_kb,
              ctas_per_sm, plan.dense_mask != 0 ? "true" : "false",
              shuffle_pages ? "shuffled" : "sequential", floor_us, floor_us / t_us, prop.name);
          std::fflush(out);
          CK(cudaFree(ws));
          CK(cudaFree(q));
          CK(cudaFree(o));
        }
        CK(cudaFree(pool));
        CK(cudaFree(ids));
        CK(cudaFree(tok));
      }
    }
  }
  if (out != stdout) std::fclose(out);
  return 0;
}
