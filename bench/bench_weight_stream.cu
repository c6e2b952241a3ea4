// A decode token's weight stream alone, without arithmetic: how fast one Llama-shaped token's
// weights (qkv, o, gate_up, down per layer, then lm_head; distinct weights: 15.01 GB at
// Llama-3-8B) can be read in the skinny GEMM's units (16 rows x KU columns of a [n, k] bf16
// matrix, tile-major, CTA c of G taking the contiguous range [c U / G, (c + 1) U / G)), by the
// bulk GEMM's mechanism and by others, as one CUDA graph of 129 launches:
//
//   tma          the bulk GEMM's ring (kernels/gemm/skinny_gemm_bulk.cuh): a producer warp,
//                cp.async.bulk of each unit's rows (KU 2048, 3 stages), 8 consumer warps that
//                wait for a stage and release it; one CTA an SM;
//   claimC       the same, CTAs claiming C units at a time from a counter (plain launches only);
//   strideC      the same, CTA c taking chunks c, c + G, ... of C units;
//   producer_ldgsts  the same ring, the producer warp copying with 16-byte cp.async;
//   producerP_ldgsts  the same with P = 2, 4 or 8 producer warps;
//   producerP_sweep  P = 4 or 8 producer warps copying each unit in the ldgsts mode's order (all
//                the producers' lanes on one row's contiguous bytes at a time);
//   tma1k        KU 1024, 6 stages (the same ~200 KB ring, finer stages);
//   tma1k_x2     KU 1024, 3 stages, two CTAs an SM;
//   ldgsts       the ring fed by all 256 threads with 16-byte cp.async (KU 2048, 3 stages);
//   ldgsts1k_x2  the same at KU 1024, two CTAs an SM;
//   ldg          16-byte loads into registers, two units in flight a thread (KU 2048), one CTA
//                of 256 threads an SM;
//   ldg_x2       the same at KU 1024, two CTAs an SM;
//   read         a plain grid-stride read of each matrix (8 CTAs of 512 threads an SM).
//
// With --pdl 1 every launch may start while the one before runs (griddepcontrol): loads before
// the consumers' wait, as the GEMMs do under PDL. Before the modes: one read of the whole token
// in one launch, and the device-to-device copy bandwidth.
//
// Why: the bulk GEMM at batch 1 runs as fast as its own stream (3.68 against 3.66 ms a token,
// bench/RESULTS.md, twenty-third session), and that stream reads at ~4.1 TB/s where a plain read
// of the same bytes reaches ~4.5: is the gap the mechanism (TMA), the units, or the launches?
// Also: do CTAs finish apart because SMs stream at different rates (the per-CTA end spread of one
// launch of each shape after an idle GPU)?
//
// Usage: bench_weight_stream [--modes tma,ldgsts,...] [--pdl 0,1] [--layers 32] [--hidden 4096]
//                            [--intermediate 14336] [--heads 32] [--kv-heads 8] [--head-dim 128]
//                            [--vocab 128256]
// Output: a table on stderr, one JSON object on stdout.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/cp_async.cuh"
#include "kernels/gemm/bulk_copy.cuh"
#include "kernels/pdl.cuh"

namespace {

constexpr int kRows = 16;
constexpr int kConsumers = 8;

using namespace pmkv::kernels::bulk_copy_detail;

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void grid_trigger() {
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
}
__device__ __forceinline__ void grid_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// Units of one launch: row tiles of 16 rows x KU columns, tile-major; CTA c of G takes the
// contiguous range [c U / G, (c + 1) U / G) (the split by whole tiles streams alike).
struct Units {
  int64_t ku, units;
  __device__ Units(int n, int k, int KU)
      : ku(k / KU), units(int64_t{(n + kRows - 1) / kRows} * (k / KU)) {}
  __device__ int64_t begin(int64_t c, int64_t G) const { return c * units / G; }
};

// The bulk GEMM's ring (skinny_gemm_bulk.cuh) without its arithmetic: a producer warp copies each
// unit's 16 rows with cp.async.bulk (one 2 KU-byte copy a row) into kStages stages; 8 consumer
// warps wait for a stage and release it. Under PDL the consumers wait for the kernel before
// (griddepcontrol.wait) as the GEMM's do before reading `a`; the producer does not.
// chunk 0: static split; chunk > 0: claim `chunk` units at a time from claim[0] (claim[1] counts
// the CTAs done; the last resets both for the next launch); chunk < 0: chunks of -chunk units,
// CTA c taking chunks c, c + G, ... ends: per-CTA end time, or null.
template <int KU, int kStages, int kProducers = 1>
struct TmaRing {
  static constexpr int kRowStride = 2 * KU + 64;  // as the GEMM's footprints
  static constexpr int kStageBytes = kRows * kRowStride;
  static constexpr int kThreads = (kConsumers + kProducers) * 32;
  static constexpr int kSmemBytes = kStages * kStageBytes + 3 * kStages * 8;
};

// kAsync: kProducers producer warps copy with 16-byte cp.async instead (warp p rows p, p + P, ...
// of each unit), each lane handing its copies' completion to the stage's mbarrier; producer 0's
// lane 0 arrives once more (it publishes the stage's unit). Static and strided splits only when
// kProducers > 1. kSweep: the producers' 32 P lanes copy 16-byte chunk t, t + 32 P, ... of the
// unit in row order instead (as ldgsts_kernel's 256 threads do).
template <int KU, int kStages, bool kAsync = false, int kProducers = 1, bool kSweep = false>
__global__ void __launch_bounds__(TmaRing<KU, kStages, kProducers>::kThreads)
    tma_kernel(const uint16_t* __restrict__ w, int n, int k, int chunk, int* claim, uint64_t* ends,
               uint32_t* sink) {
  using R = TmaRing<KU, kStages, kProducers>;
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * R::kStageBytes);
  uint64_t* empty = full + kStages;
  int64_t* meta = reinterpret_cast<int64_t*>(empty + kStages);  // the stage's unit, -1: the end
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  grid_trigger();
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], kAsync ? 32 * kProducers + 1 : 1);
      mbar_init(&empty[s], kConsumers * 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const Units U(n, k, KU);
  const int64_t G = gridDim.x;
  if (warp >= kConsumers) {
    const int pw = warp - kConsumers;  // producer warp
    int i = 0;
    auto stage_for = [&](int64_t u) {  // waits for a free stage, marks it with u
      const int s = i % kStages;
      if (i >= kStages) mbar_wait(&empty[s], ((i / kStages) - 1) & 1);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if (pw == 0 && lane == 0) meta[s] = u;
      __syncwarp();
      return s;
    };
    auto issue = [&](int64_t u) {
      const int s = stage_for(u);
      const int64_t tile = u / U.ku, kk = u % U.ku;
      if constexpr (kAsync && kSweep) {
        constexpr int kRowChunks = KU / 8, kLanes = 32 * kProducers;
        const int t = pw * 32 + lane;
#pragma unroll 4
        for (int c = t; c < kRows * kRowChunks; c += kLanes) {
          const int r = c / kRowChunks, col = c % kRowChunks;
          int64_t row = tile * kRows + r;
          row = row < n ? row : n - 1;
          pmkv::kernels::cp_async16(smem + s * R::kStageBytes + r * R::kRowStride + 16 * col,
                                    w + row * k + kk * KU + 8 * col);
        }
        cp_async_mbar_arrive(&full[s]);
        if (pw == 0 && lane == 0) mbar_arrive(&full[s]);
      } else if constexpr (kAsync) {
#pragma unroll 2
        for (int r = pw; r < kRows; r += kProducers) {
          int64_t row = tile * kRows + r;
          row = row < n ? row : n - 1;
          const uint16_t* src = w + row * k + kk * KU + 8 * lane;
          uint8_t* dst = smem + s * R::kStageBytes + r * R::kRowStride + 16 * lane;
#pragma unroll
          for (int c = 0; c < KU / 256; ++c)
            pmkv::kernels::cp_async16(dst + 512 * c, src + 256 * c);
        }
        cp_async_mbar_arrive(&full[s]);
        if (pw == 0 && lane == 0) mbar_arrive(&full[s]);
      } else {
        if (lane == 0) mbar_arrive_expect_tx(&full[s], kRows * KU * 2);
        __syncwarp();
        for (int r = lane; r < kRows; r += 32) {
          int64_t row = tile * kRows + r;
          row = row < n ? row : n - 1;
          bulk_copy(smem + s * R::kStageBytes + r * R::kRowStride, w + row * k + kk * KU, KU * 2,
                    &full[s]);
        }
      }
      ++i;
    };
    if (chunk == 0) {
      for (int64_t u = U.begin(blockIdx.x, G); u < U.begin(blockIdx.x + 1, G); ++u)
        issue(u);
    } else if (chunk < 0) {
      for (int64_t u0 = int64_t{blockIdx.x} * -chunk; u0 < U.units; u0 += G * -chunk) {
        const int64_t u1 = u0 - chunk < U.units ? u0 - chunk : U.units;
        for (int64_t u = u0; u < u1; ++u)
          issue(u);
      }
    } else {
      for (;;) {
        int c = 0;
        if (lane == 0) c = atomicAdd(&claim[0], 1);
        c = __shfl_sync(0xffffffffu, c, 0);
        const int64_t u0 = int64_t{c} * chunk;
        if (u0 >= U.units) break;
        const int64_t u1 = u0 + chunk < U.units ? u0 + chunk : U.units;
        for (int64_t u = u0; u < u1; ++u)
          issue(u);
      }
    }
    const int s = stage_for(-1);  // the end
    if (kAsync || lane == 0) mbar_arrive(&full[s]);
    if (kAsync && pw == 0 && lane == 0) mbar_arrive(&full[s]);
    return;
  }
  grid_wait();
  uint32_t x = 0;
  for (int i = 0;; ++i) {
    const int s = i % kStages;
    mbar_wait(&full[s], (i / kStages) & 1);
    const int64_t u = meta[s];
    if (u < 0) break;
    x ^= *reinterpret_cast<const uint32_t*>(smem + s * R::kStageBytes + threadIdx.x * 16);
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

// The same ring fed by every thread with 16-byte cp.async (LDGSTS, as Ampere GEMMs feed theirs):
// 256 threads, thread t copies chunks t, t + 256, ... of a unit's 2 KU 16-byte chunks (a warp
// copies 512 contiguous bytes of a row); kStages - 1 units in flight while one is read. Under PDL
// the first kStages - 1 units are issued before the wait.
template <int KU, int kStages>
struct AsyncRing {
  static constexpr int kThreads = 256;
  static constexpr int kStageBytes = kRows * 2 * KU;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static constexpr int kPerThread = 2 * KU / kThreads;  // 16-byte chunks a thread copies
  static constexpr int kRowChunks = KU / 8;
};

template <int KU, int kStages>
__global__ void __launch_bounds__(AsyncRing<KU, kStages>::kThreads)
    ldgsts_kernel(const uint16_t* __restrict__ w, int n, int k, uint64_t* ends, uint32_t* sink) {
  using R = AsyncRing<KU, kStages>;
  extern __shared__ __align__(128) uint8_t smem[];
  grid_trigger();
  const Units U(n, k, KU);
  const int64_t G = gridDim.x;
  const int64_t u0 = U.begin(blockIdx.x, G), u1 = U.begin(blockIdx.x + 1, G);
  auto issue = [&](int64_t u, int s) {
    if (u < u1) {
      const int64_t tile = u / U.ku, kk = u % U.ku;
#pragma unroll
      for (int j = 0; j < R::kPerThread; ++j) {
        const int c = threadIdx.x + R::kThreads * j;
        const int r = c / R::kRowChunks, col = c % R::kRowChunks;
        int64_t row = tile * kRows + r;
        row = row < n ? row : n - 1;
        const uint32_t dst = smem_u32(smem + s * R::kStageBytes + c * 16);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst),
                     "l"(w + row * k + kk * KU + col * 8));
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  for (int s = 0; s < kStages - 1; ++s)
    issue(u0 + s, s);
  grid_wait();
  uint32_t x = 0;
  for (int64_t i = 0; u0 + i < u1; ++i) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2));
    __syncthreads();  // stage i % S landed for every thread; stage (i - 1) % S read by all
    const int s = static_cast<int>(i % kStages);
    x ^= *reinterpret_cast<const uint32_t*>(smem + s * R::kStageBytes +
                                            ((threadIdx.x * 97) % (R::kStageBytes / 16)) * 16);
    issue(u0 + i + kStages - 1, static_cast<int>((i + kStages - 1) % kStages));
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  if (x == 0x9E3779B9u) *sink = x;
  if (ends != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) ends[blockIdx.x] = now_ns();
  }
}

// Plain 16-byte loads into registers (LDG, no shared memory), two units in flight a thread:
// 256 threads, thread t loads chunks t, t + 256, ... of each unit.
template <int KU>
__global__ void __launch_bounds__(256)
    ldg_kernel(const uint16_t* __restrict__ w, int n, int k, uint64_t* ends, uint32_t* sink) {
  constexpr int kPer = 2 * KU / 256, kRowChunks = KU / 8;
  grid_trigger();
  const Units U(n, k, KU);
  const int64_t G = gridDim.x;
  const int64_t u0 = U.begin(blockIdx.x, G), u1 = U.begin(blockIdx.x + 1, G);
  auto load = [&](int64_t u, uint4(&v)[kPer]) {
    const int64_t tile = u / U.ku, kk = u % U.ku;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int c = threadIdx.x + 256 * j;
      const int r = c / kRowChunks, col = c % kRowChunks;
      int64_t row = tile * kRows + r;
      row = row < n ? row : n - 1;
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v[j].x), "=r"(v[j].y), "=r"(v[j].z), "=r"(v[j].w)
                   : "l"(w + row * k + kk * KU + col * 8));
    }
  };
  uint32_t x = 0;
  uint4 a[kPer], b[kPer];
  if (u0 < u1) load(u0, a);
  grid_wait();
  for (int64_t u = u0; u < u1; u += 2) {
    if (u + 1 < u1) load(u + 1, b);
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      x ^= a[j].x ^ a[j].y ^ a[j].z ^ a[j].w;
    if (u + 1 >= u1) break;
    if (u + 2 < u1) load(u + 2, a);
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      x ^= b[j].x ^ b[j].y ^ b[j].z ^ b[j].w;
  }
  if (x == 0x9E3779B9u) *sink = x;
  if (ends != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) ends[blockIdx.x] = now_ns();
  }
}

// A stream mode: how a launch of one [n, k] matrix is run.
enum class Kind {
  kTma2k,
  kAsyncProducer,
  kAsyncProducer2,
  kAsyncProducer4,
  kAsyncProducer8,
  kAsyncSweep4,
  kAsyncSweep8,
  kTma1k,
  kTma1kX2,
  kLdgsts,
  kLdgsts1kX2,
  kLdg,
  kLdgX2,
  kRead
};
struct Mode {
  std::string name;
  Kind kind;
  int chunk = 0;  // kTma2k: 0 static, > 0 claimed, < 0 strided (see tma_kernel)
};

// "tma", "claim2", "stride4", "producer_ldgsts", "tma1k", "tma1k_x2", "ldgsts", "ldgsts1k_x2",
// "ldg", "ldg_x2", "read"; false for anything else.
bool parse_mode(const std::string& s, Mode* m) {
  const std::pair<const char*, Kind> fixed[] = {{"tma", Kind::kTma2k},
                                                {"tma1k", Kind::kTma1k},
                                                {"tma1k_x2", Kind::kTma1kX2},
                                                {"producer_ldgsts", Kind::kAsyncProducer},
                                                {"producer2_ldgsts", Kind::kAsyncProducer2},
                                                {"producer4_ldgsts", Kind::kAsyncProducer4},
                                                {"producer8_ldgsts", Kind::kAsyncProducer8},
                                                {"producer4_sweep", Kind::kAsyncSweep4},
                                                {"producer8_sweep", Kind::kAsyncSweep8},
                                                {"ldgsts", Kind::kLdgsts},
                                                {"ldgsts1k_x2", Kind::kLdgsts1kX2},
                                                {"ldg", Kind::kLdg},
                                                {"ldg_x2", Kind::kLdgX2},
                                                {"read", Kind::kRead}};
  for (const auto& [name, kind] : fixed) {
    if (s == name) {
      *m = {s, kind, 0};
      return true;
    }
  }
  for (const auto& [prefix, sign] : {std::pair<const char*, int>{"claim", 1}, {"stride", -1}}) {
    const std::string p = prefix;
    if (s.rfind(p, 0) == 0 && s.size() > p.size()) {
      const int c = std::atoi(s.c_str() + p.size());
      if (c < 1) return false;
      *m = {s, Kind::kTma2k, sign * c};
      return true;
    }
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  pmkv::bench::LlamaShapes model;
  std::string modes_arg = "tma,producer_ldgsts,producer2_ldgsts,producer4_ldgsts,ldgsts,read";
  std::string pdl_arg = "0,1";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--modes") {
      modes_arg = v;
    } else if (a == "--pdl") {
      pdl_arg = v;
    } else if (!model.parse(a, v)) {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  std::vector<Mode> modes;
  for (size_t at = 0; at < modes_arg.size();) {
    const size_t comma = modes_arg.find(',', at);
    const std::string name = modes_arg.substr(at, comma - at);
    Mode m;
    if (!parse_mode(name, &m)) {
      std::fprintf(stderr, "unknown mode %s\n", name.c_str());
      return 2;
    }
    modes.push_back(m);
    at = comma == std::string::npos ? modes_arg.size() : comma + 1;
  }
  const int64_t L = model.layers;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  using Shape = pmkv::bench::LlamaShapes::Shape;
  const auto layer = model.layer();
  const Shape shapes[5] = {layer[0], layer[1], layer[2], layer[3], model.head()};
  for (const Shape& sh : shapes) {
    if (sh.k % 2048 != 0) {
      std::fprintf(stderr, "%s: k %lld is not a multiple of 2048\n", sh.name,
                   static_cast<long long>(sh.k));
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
  CK(cudaMalloc(&ends, 8 * sms * sizeof(uint64_t)));
  CK(cudaMalloc(&sink, 4));
  CK(cudaFuncSetAttribute(tma_kernel<2048, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<2048, 3, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<2048, 3, true, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<2048, 3, true, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<2048, 3, true, 8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<2048, 3, true, 4, true>,
                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<2048, 3, true, 8, true>,
                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<1024, 6>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<1024, 6>::kSmemBytes));
  CK(cudaFuncSetAttribute(tma_kernel<1024, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          TmaRing<1024, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(ldgsts_kernel<2048, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          AsyncRing<2048, 3>::kSmemBytes));
  CK(cudaFuncSetAttribute(ldgsts_kernel<1024, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          AsyncRing<1024, 3>::kSmemBytes));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaDeviceSynchronize());

  // One launch of `kernel` on s, with programmatic dependent launch when pdl.
  const auto launch_ex = [&](auto kernel, int grid, int block, int smem, bool pdl, auto... args) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(grid));
    cfg.blockDim = dim3(static_cast<unsigned>(block));
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = s;
    cudaLaunchAttribute attr;
    pmkv::kernels::request_pdl(cfg, attr, pdl);
    CK(cudaLaunchKernelEx(&cfg, kernel, args...));
  };
  // The CTAs a launch of the mode has (ends has room for 8 an SM).
  const auto ctas_of = [&](const Mode& m) {
    switch (m.kind) {
      case Kind::kTma1kX2:
      case Kind::kLdgsts1kX2:
      case Kind::kLdgX2:
        return 2 * sms;
      case Kind::kRead:
        return 8 * sms;
      default:
        return sms;
    }
  };
  const auto launch = [&](const Mode& m, const uint16_t* w, const Shape& sh, bool pdl,
                          uint64_t* e) {
    const int n = static_cast<int>(sh.n), k = static_cast<int>(sh.k), G = ctas_of(m);
    switch (m.kind) {
      case Kind::kTma2k:
        launch_ex(tma_kernel<2048, 3>, G, TmaRing<2048, 3>::kThreads, TmaRing<2048, 3>::kSmemBytes,
                  pdl, w, n, k, m.chunk, claim, e, sink);
        break;
      case Kind::kAsyncProducer:
        launch_ex(tma_kernel<2048, 3, true>, G, TmaRing<2048, 3>::kThreads,
                  TmaRing<2048, 3>::kSmemBytes, pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kAsyncProducer2:
        launch_ex(tma_kernel<2048, 3, true, 2>, G, TmaRing<2048, 3, 2>::kThreads,
                  TmaRing<2048, 3>::kSmemBytes, pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kAsyncProducer4:
        launch_ex(tma_kernel<2048, 3, true, 4>, G, TmaRing<2048, 3, 4>::kThreads,
                  TmaRing<2048, 3>::kSmemBytes, pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kAsyncProducer8:
        launch_ex(tma_kernel<2048, 3, true, 8>, G, TmaRing<2048, 3, 8>::kThreads,
                  TmaRing<2048, 3>::kSmemBytes, pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kAsyncSweep4:
        launch_ex(tma_kernel<2048, 3, true, 4, true>, G, TmaRing<2048, 3, 4>::kThreads,
                  TmaRing<2048, 3>::kSmemBytes, pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kAsyncSweep8:
        launch_ex(tma_kernel<2048, 3, true, 8, true>, G, TmaRing<2048, 3, 8>::kThreads,
                  TmaRing<2048, 3>::kSmemBytes, pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kTma1k:
        launch_ex(tma_kernel<1024, 6>, G, TmaRing<1024, 6>::kThreads, TmaRing<1024, 6>::kSmemBytes,
                  pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kTma1kX2:
        launch_ex(tma_kernel<1024, 3>, G, TmaRing<1024, 3>::kThreads, TmaRing<1024, 3>::kSmemBytes,
                  pdl, w, n, k, 0, claim, e, sink);
        break;
      case Kind::kLdgsts:
        launch_ex(ldgsts_kernel<2048, 3>, G, AsyncRing<2048, 3>::kThreads,
                  AsyncRing<2048, 3>::kSmemBytes, pdl, w, n, k, e, sink);
        break;
      case Kind::kLdgsts1kX2:
        launch_ex(ldgsts_kernel<1024, 3>, G, AsyncRing<1024, 3>::kThreads,
                  AsyncRing<1024, 3>::kSmemBytes, pdl, w, n, k, e, sink);
        break;
      case Kind::kLdg:
        launch_ex(ldg_kernel<2048>, G, 256, 0, pdl, w, n, k, e, sink);
        break;
      case Kind::kLdgX2:
        launch_ex(ldg_kernel<1024>, G, 256, 0, pdl, w, n, k, e, sink);
        break;
      case Kind::kRead:
        launch_ex(pmkv::bench::read_stream, G, 512, 0, pdl, reinterpret_cast<const uint4*>(w),
                  int64_t{sh.n} * sh.k / 8, e, sink);
        break;
    }
  };
  // A graph's time: the fastest of 5 rounds of 5 replays.
  const auto graph_ms = [&](auto&& body) { return pmkv::bench::best_graph_ms(s, body, 5); };

  // The device's own rates over the same bytes: one plain read of the whole token, and a
  // device-to-device copy of 4 GB (read + write counted, as bench_skinny_gemm's copy bandwidth).
  const double read_ms = graph_ms([&] {
    launch_ex(pmkv::bench::read_stream, 8 * sms, 512, 0, false,
              reinterpret_cast<const uint4*>(W[0][0]), total / 8, static_cast<uint64_t*>(nullptr),
              sink);
  });
  const size_t copy_bytes = size_t{4} << 30;
  void* copy_dst = nullptr;
  CK(cudaMalloc(&copy_dst, copy_bytes));
  // Timed on the stream, not in a graph: a graph's memcpy node copied at ~2.7 TB/s (call 1 of the
  // twenty-fifth session), a stream's cudaMemcpyAsync at bench_skinny_gemm's ~4.25.
  double copy_ms = 1e30;
  for (int r = 0; r < 5; ++r) {
    CK(cudaEventRecord(e0, s));
    CK(cudaMemcpyAsync(copy_dst, W[0][0], copy_bytes, cudaMemcpyDeviceToDevice, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    copy_ms = std::min(copy_ms, double(ms));
  }
  CK(cudaFree(copy_dst));
  const double read_gbps = 2.0 * total / (read_ms * 1e-3) / 1e9;
  const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  std::fprintf(stderr,
               "%s, %d SMs; token weights %.3f GB; one read of them %.3f ms (%.0f GB/s); copy "
               "%.0f GB/s\n",
               prop.name, sms, 2.0 * total / 1e9, read_ms, read_gbps, copy_gbps);
  std::string json = "{\"device\": \"" + std::string(prop.name) +
                     "\", \"token_weight_bytes\": " + std::to_string(2 * total) +
                     ", \"read_ms\": " + std::to_string(read_ms) +
                     ", \"read_gb_s\": " + std::to_string(read_gbps) +
                     ", \"copy_gb_s\": " + std::to_string(copy_gbps) + ", \"modes\": [";
  bool first = true;
  for (const int64_t pdl_flag : pmkv::bench::parse_list(pdl_arg)) {
    const bool pdl = pdl_flag != 0;
    for (const Mode& m : modes) {
      if (pdl && m.chunk > 0) continue;  // claims: the launch before may still hold the counter
      const double token_ms = graph_ms([&] {
        for (int64_t l = 0; l < L; ++l)
          for (int j = 0; j < 4; ++j)
            launch(m, W[j][l], shapes[j], pdl, nullptr);
        launch(m, Wh, shapes[4], pdl, nullptr);
      });
      const double gbps = 2.0 * total / (token_ms * 1e-3) / 1e9;
      std::fprintf(stderr, "%-12s pdl %d: token %.3f ms, %.0f GB/s (%.1f%% of the read)\n",
                   m.name.c_str(), pdl ? 1 : 0, token_ms, gbps, 100.0 * read_ms / token_ms);
      json += std::string(first ? "" : ", ") + "{\"mode\": \"" + m.name +
              "\", \"pdl\": " + (pdl ? "true" : "false") +
              ", \"token_ms\": " + std::to_string(token_ms) +
              ", \"gb_s\": " + std::to_string(gbps) + ", \"shapes\": {";
      first = false;
      for (int j = 0; j < 5; ++j) {
        const Shape& sh = shapes[j];
        const uint16_t* w0 = j < 4 ? W[j][0] : Wh;
        // Alone: 32 launches of the shape over distinct layers' weights (lm_head: the same one).
        const double ms = graph_ms([&] {
                            for (int64_t l = 0; l < L; ++l)
                              launch(m, j < 4 ? W[j][l] : Wh, sh, pdl, nullptr);
                          }) /
                          static_cast<double>(L);
        // Spread: one launch after an idle GPU, each CTA's end after the earliest.
        CK(cudaStreamSynchronize(s));
        launch(m, w0, sh, false, ends);
        CK(cudaStreamSynchronize(s));
        const int G = ctas_of(m);
        std::vector<uint64_t> t(G);
        CK(cudaMemcpy(t.data(), ends, G * sizeof(uint64_t), cudaMemcpyDeviceToHost));
        std::sort(t.begin(), t.end());
        const double med = (t[G / 2] - t[0]) * 1e-3, last = (t[G - 1] - t[0]) * 1e-3;
        const double bytes = 2.0 * sh.n * sh.k;
        std::fprintf(stderr,
                     "    %-8s %8.2f us  %5.0f GB/s  CTA ends after the first: median %.2f, "
                     "last %.2f us\n",
                     sh.name, ms * 1e3, bytes / (ms * 1e-3) / 1e9, med, last);
        json += std::string(j ? ", " : "") + "\"" + sh.name +
                "\": {\"us\": " + std::to_string(ms * 1e3) +
                ", \"gb_s\": " + std::to_string(bytes / (ms * 1e-3) / 1e9) +
                ", \"end_median_us\": " + std::to_string(med) +
                ", \"end_last_us\": " + std::to_string(last) + "}";
      }
      json += "}}";
    }
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
}
