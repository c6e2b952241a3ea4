#pragma once
// Bulk-copy variant of the skinny GEMM (kernels/gemm/skinny_gemm.h), for m <= 8 and
// k % 1024 == 0 on Hopper (sm_90+). Included by skinny_gemm.cu only.
//
// Why. The register-load kernel keeps each thread's 16-byte loads in flight itself, 256-512 bytes
// per row and visit; over a Llama-3-8B token's GEMMs at m = 1 it streamed 3,280 GB/s on an H200
// whose copy bandwidth is 4,276 GB/s and whose plain read bandwidth is ~4,550 GB/s. Here one
// producer warp per CTA streams the weights into a shared-memory ring with cp.async.bulk (the copy
// engine counts the bytes on an mbarrier: no registers, no load instructions) and 8 consumer warps
// run the tensor-core products from shared memory; the work is split evenly over one CTA per SM.
// The copies must be long: 512-byte rows ran at 1,632 GB/s, 2-KB rows at 3,776 and 4-KB rows at
// 3,817 GB/s over the same token (a development probe, bench/RESULTS.md), so a unit is 16 rows x
// KU columns with KU = 2048 (k % 2048 == 0) or 1024.
// Other ways to fill the ring, measured and left (bench/RESULTS.md, twenty-fifth session): the
// same ring filled by all 256 threads' 16-byte cp.async streamed a token's weights alone 3-6%
// faster than these bulk copies, but in the GEMM its warps refill in lock step (a slot waits for
// the slowest warp and for each tile's epilogue): 6-42% slower. The producer warp issuing
// cp.async instead streamed like the bulk copies (2-4 producer warps: 1.2-1.3% faster alone).
//
// Work decomposition. A unit is one row tile (16 RT rows of w) x KU columns of k, one ring stage.
// The units are ordered tile-major (a tile's units along k are consecutive), and CTA c of G takes
// a contiguous range of them (Split):
// - by tiles (the default when there are at least as many tiles as CTAs): whole tiles, [floor(c T
//   / G), floor((c + 1) T / G)) of the T tiles. No tile is split, so no CTA ends waiting on
//   another's partial sums (fence, atomic, the partials read back from L2). The CTAs' bytes differ
//   by up to one tile (at Llama-3-8B shapes the largest is 3.1% above the mean), which did not
//   show: the DRAM, not an SM, sets the pace, and the CTAs still streaming take the bandwidth of
//   those done. Measured on the H200 against stream-K (bench/RESULTS.md, twenty-third session): a
//   batch-1 token's GEMMs 4.01 -> 3.68 ms (95% of copy bandwidth; the stream alone, no
//   arithmetic, 3.66), at m = 8 4.31 -> 4.04, the batch-1 token end to end 4.71 -> 4.36 ms.
// - by units (stream-K; SkinnyGemmParams::stream_k, and launches with fewer tiles than CTAs):
//   [floor(c U / G), floor((c + 1) U / G)), every CTA the same bytes to within one unit. A tile
//   split between CTAs gets one partial per contributing CTA in a workspace (slot 0: the CTA's
//   first tile, slot 1: its last), and the last contributor to arrive (an atomic counter per
//   tile, reset by that contributor) adds the partials in CTA order and stores the tile.
// - claimed (SkinnyGemmParams::claim, only where the split is by tiles): the producers claim
//   kClaimTiles whole tiles at a time from a counter in the workspace as they go and tell the
//   consumers each stage's unit (Smem::meta). Over lm_head (8,016 tiles, ~260 us) the fixed
//   ranges' CTAs ended 104-116 us apart in bench_weight_stream: some SMs stream slower for that
//   long; claimed chunks ended within a few us (bench/RESULTS.md, twenty-third and twenty-fourth
//   sessions). Shorter products lost with it (the claims' latency, and early enders' bandwidth
//   going to the others anyway).
// Either way the result is deterministic for a given G and split (bit-identical run to run), like
// the register kernel's; the two splits differ in the rounding of the tiles stream-K splits, and
// claimed tiles equal the split by tiles bit for bit (each tile is one CTA's, reduced alike).
//
// Consumer mapping. In a stage, warp w takes the 32-column blocks w, w + 8, ... of the unit, with
// the register kernel's fragment layout (lane (g, t): rows g and g + 8, physical columns
// 8t..8t+7 of the block, one 16-byte shared-memory read per row; see skinny_gemm.cu). Rows sit
// 2 KU + 64 bytes apart in the stage, so that the 8 lanes of a 128-byte read phase hit distinct
// banks. The 8 warps' partial sums of a tile are added in shared memory in warp order.
//
// Epilogue. Plain: the tile's fp32 sums, stored as fp32 or bf16. Gated (SkinnyGemmParams::gated):
// rows r and r + 8 of each 16-row group are a gate row and its up row (kernels::GateUpLayout), and
// the stored value is the SwiGLU activation of the two bf16-rounded sums.
//
// Tail (SkinnyGemmParams::fuse_add_norm). The residual add + RMSNorm that follows the o and down
// projections in a decoder needs all of a row of d, which no CTA has: every CTA fences its
// stores and counts itself in (a counter after the tile counters, reset by the last), and the
// last one runs launch_add_rmsnorm's row code (kernels/model/add_rmsnorm_row.cuh) on its 256
// consumer threads, row after row: the same thread per column and the same reduction order as
// that kernel, so the result is bit-identical. The rows run one after another on one SM, so the
// tail pays at m = 1 only (GemmRunner::run_add_norm fuses only there; bench/RESULTS.md).
//
// Split norm (SkinnyGemmParams::add_residual, norm_input). The tail's one CTA running the row after
// all others cost ~5 us a launch at Llama-3-8B shapes. Split, the product before the norm adds each
// column of d to the residual x as the tile's owner stores it (kSplitAdd), and the product after
// it normalizes x itself: every CTA's 256 consumer threads run the row code's reduction in its
// order (norm_prologue) into a bf16 row in shared memory, which the consumers read `a` from
// (kSplitNorm, m = 1). The pair is bit-identical to the tail.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cp_async.cuh"
#include "kernels/gemm/bulk_copy.cuh"
#include "kernels/gemm/skinny_gemm.h"
#include "kernels/gemm/skinny_gemm_common.cuh"
#include "kernels/model/add_rmsnorm_row.cuh"
#include "kernels/pdl.cuh"

namespace pmkv::kernels::bulk_gemm {

inline constexpr int kConsumers = 8;  // consumer warps
// PMKV_BULK_PRODUCERS (a build-time A/B knob, not measured yet: bench/RESULTS.md, thirty-third
// session): 0, the default, is one producer warp issuing one cp.async.bulk a row (TMA); P = 1, 2,
// 4 or 8 is P producer warps issuing 16-byte cp.async, each lane's completion handed to the
// stage's mbarrier. The weight stream alone (bench_weight_stream) ran 1.2-1.3% faster with 2-4 such
// warps and 5.6% with all 256 threads of a CTA issuing in row order (twenty-fifth session); with
// PMKV_BULK_SWEEP=1 (the default when P > 0) the producers' lanes copy a unit in that order, all
// on one row's contiguous bytes at a time, else warp p copies rows p, p + P, ... P = 8 needs
// setmaxnreg (see kSetMaxNreg) to leave the 2048-column consumers their registers. With P > 0
// the producers claim no tiles (SkinnyGemmParams::claim is ignored: fixed ranges, the same bytes).
#ifndef PMKV_BULK_PRODUCERS
#define PMKV_BULK_PRODUCERS 0
#endif
#ifndef PMKV_BULK_SWEEP
#define PMKV_BULK_SWEEP 1
#endif
inline constexpr int kAsyncProducers = PMKV_BULK_PRODUCERS;
inline constexpr bool kSweep = PMKV_BULK_SWEEP != 0;
static_assert(kAsyncProducers == 0 || kAsyncProducers == 1 || kAsyncProducers == 2 ||
                  kAsyncProducers == 4 || kAsyncProducers == 8,
              "PMKV_BULK_PRODUCERS: 0, 1, 2, 4 or 8");
inline constexpr int kProducerWarps = kAsyncProducers > 0 ? kAsyncProducers : 1;
inline constexpr int kThreads = (kConsumers + kProducerWarps) * 32;
// 8 producer warps (512 threads) leave a launch 128 registers a thread; the producers' two
// warpgroups give theirs back (setmaxnreg) so that the consumers' two can hold the 2048-column
// units' 161-168 (256 x 40 + 256 x 216 = the 65,536 of an SM).
// setmaxnreg is an sm_90a instruction: that variant builds with CMAKE_CUDA_ARCHITECTURES=90a.
inline constexpr bool kSetMaxNreg = kThreads > 384;
inline constexpr int kProducerRegs = 40, kConsumerRegs = 216;
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
static_assert(!kSetMaxNreg, "PMKV_BULK_PRODUCERS=8 needs sm_90a (CMAKE_CUDA_ARCHITECTURES=90a)");
#endif
inline constexpr int kRingBudget = 200 * 1024;  // bytes of shared memory for the ring
// The compact footprint (SkinnyGemmParams::compact): 1024-column units, three stages, ~108 KB of
// shared memory and ~100 registers a thread, so that one CTA of it fits on an SM beside one CTA of
// the kernel before it (a 16-bit decode-attention CTA: ~102 KB, 220 registers x 128 threads).
// The launch asks for kCompactSmemRequest, which two such CTAs together exceed (228 KB an SM on
// sm_90, 1 KB of it reserved per CTA): one CTA of the grid per SM still, as the split of the work
// assumes.
inline constexpr int kCompactRingBudget = 100 * 1024;
inline constexpr int kCompactSmemRequest = 116 * 1024;
static_assert(kConsumers * 32 == rmsnorm_detail::kNormThreads,
              "the fused norm tail runs the norm's CTA-per-row variant on the consumer threads");

// RT: 16-row halves per tile (rows = 16 RT); KU: k columns per unit. A stage holds one unit: 16 RT
// rows of 2 KU bytes, rows padded by 64 bytes (conflict-free fragment reads). kCompact: the ring of
// kCompactRingBudget bytes (see there).
template <int RT, int KU, bool kCompact = false>
struct Geometry {
  static constexpr int kRows = 16 * RT;
  static constexpr int kRowStride = 2 * KU + 64;
  static constexpr int kStageBytes = kRows * kRowStride;
  static constexpr int kRing = kCompact ? kCompactRingBudget : kRingBudget;
  static constexpr int kStages = kRing / kStageBytes < 16 ? kRing / kStageBytes : 16;
  static constexpr int kBlocks = KU / 32;    // 32-column blocks per unit, spread over the warps
  static constexpr int kSlots = RT * 2 * 4;  // accumulators per lane at NT = 2
  static constexpr int kPartialFloats = kRows * 16;  // a tile's partial sums, [16 cols][rows]
  static constexpr int kRedBytes = kConsumers * kSlots * 32 * 4;
  static constexpr int kFinBytes = kSlots * 32 * 4;  // a tile's final sums
  // Rounded to 16 bytes: a norm_input launch keeps its bf16 row right after (16-byte reads).
  static constexpr int kSmemBytes =
      (kStages * kStageBytes + kRedBytes + kFinBytes + 3 * kStages * 8 + 16 + 15) / 16 * 16;
  static_assert(kStages >= 2 && KU % 256 == 0, "two stages at least");
  static_assert(kSmemBytes <= 227 * 1024, "a CTA's shared memory on sm_90");
  static_assert(!kCompact || kSmemBytes <= kCompactSmemRequest, "the compact request covers it");
  // What the launch asks for (the compact footprint pads to its request, see there).
  static constexpr int kLaunchSmemBytes = kCompact ? kCompactSmemRequest : kSmemBytes;
};

using bulk_copy_detail::bulk_copy;
using bulk_copy_detail::cp_async_mbar_arrive;
using bulk_copy_detail::mbar_arrive;
using bulk_copy_detail::mbar_arrive_expect_tx;
using bulk_copy_detail::mbar_init;
using bulk_copy_detail::mbar_wait;
using bulk_copy_detail::smem_u32;

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ uint4 lds128(const uint8_t* p) {
  return *reinterpret_cast<const uint4*>(p);
}
using skinny_detail::convert_out;
using skinny_detail::load_cached;
using skinny_detail::mma_block;

// silu(g) * u exactly as launch_silu_mul (kernels/model/layer_ops.cu) and cpu::silu_mul:
// g / (1 + exp(-g)) * u, every step rounded separately.
__device__ __forceinline__ float silu_mul(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// How a launch's `units` (tiles x ku) are shared out over its G CTAs (see the file comment): CTA
// c takes units [begin(c), begin(c + 1)), and owner(u) is the CTA whose range holds unit u.
struct Split {
  int64_t units, ku, G;
  bool by_tiles;
  __device__ __forceinline__ int64_t begin(int64_t c) const {
    return by_tiles ? c * (units / ku) / G * ku : c * units / G;
  }
  __device__ __forceinline__ int64_t owner(int64_t u) const {
    return by_tiles ? ((u / ku + 1) * G - 1) / (units / ku) : ((u + 1) * G - 1) / units;
  }
};

// The shared-memory carve-up of a CTA: the ring's stages, the warps' partial sums, a tile's final
// sums, the ring's mbarriers, each stage's unit (claimed tiles) and a flag word.
template <int RT, int KU, bool kCompact>
struct Smem {
  using Ge = Geometry<RT, KU, kCompact>;
  uint8_t* stages;
  float* red;  // [warp][slot][lane]
  float* fin;
  uint64_t* full;
  uint64_t* empty;
  int64_t* meta;  // claimed tiles: the unit a stage holds, -1 after the last
  int* flag;
  __device__ __forceinline__ explicit Smem(uint8_t* smem)
      : stages(smem),
        red(reinterpret_cast<float*>(smem + Ge::kStages * Ge::kStageBytes)),
        fin(reinterpret_cast<float*>(smem + Ge::kStages * Ge::kStageBytes + Ge::kRedBytes)),
        full(reinterpret_cast<uint64_t*>(smem + Ge::kStages * Ge::kStageBytes + Ge::kRedBytes +
                                         Ge::kFinBytes)),
        empty(full + Ge::kStages),
        meta(reinterpret_cast<int64_t*>(empty + Ge::kStages)),
        flag(reinterpret_cast<int*>(meta + Ge::kStages)) {}
  // Thread 0 initializes the ring's barriers; the caller then synchronizes the CTA. A stage is
  // full after one arrival (the producer's lane 0, with the bulk copies' bytes) or, with
  // cp.async producers, one a producer lane once its copies landed.
  __device__ __forceinline__ void init() const {
    if (threadIdx.x == 0) {
      for (int s = 0; s < Ge::kStages; ++s) {
        mbar_init(&full[s], kAsyncProducers > 0 ? 32 * kAsyncProducers : 1);
        mbar_init(&empty[s], kConsumers * 32);
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
  }
};

// Claimed tiles (SkinnyGemmParams::claim): the workspace's claim counter and the count of CTAs
// past their last claim (the last resets both for the next launch); null: fixed ranges.
struct Claim {
  int* ctr = nullptr;
  int* done = nullptr;
};
inline constexpr int kClaimTiles = 2;  // tiles a claim takes

// Producer warp: streams units [u0, u1) of w [n, k] into the ring, or, claiming, chunks of
// kClaimTiles whole tiles as it claims them and then a stage marked -1 (the end); `i` counts the
// ring's stages used so far. Lane r copies row r of each unit's tile (rows past n repeat row
// n - 1: those outputs are never stored). Weights depend on no earlier kernel: callers start
// this before pdl_wait().
template <int RT, int KU, bool kCompact>
__device__ __forceinline__ void produce(const Smem<RT, KU, kCompact>& sm,
                                        const uint16_t* __restrict__ w, int n, int k, int64_t u0,
                                        int64_t u1, int& i, int lane, const Claim& claim = {},
                                        int64_t tiles = 0, int64_t G = 0) {
  using Ge = Geometry<RT, KU, kCompact>;
  constexpr int kRows = Ge::kRows, kStages = Ge::kStages;
  const int64_t ku = k / KU;
  // Waits for stage i to be free; with `mark`, records its unit for the consumers.
  auto take_stage = [&](bool mark, int64_t u) {
    const int s = i % kStages;
    if (i >= kStages) mbar_wait(&sm.empty[s], ((i / kStages) - 1) & 1);
    // The consumers read the stage through the generic proxy, the copy writes it through the
    // async proxy: without this fence the copy could overwrite bytes not yet read. (Measured:
    // without it, 14-299 of 299 repeated launches at m = 8 differed from the first; with it,
    // none. The mbarrier's release/acquire orders only the generic proxy.)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    if (mark && lane == 0) sm.meta[s] = u;  // published by the arrive's release
    return s;
  };
  auto issue = [&](bool mark, int64_t u) {
    const int s = take_stage(mark, u);
    if (lane == 0) mbar_arrive_expect_tx(&sm.full[s], kRows * KU * 2);
    __syncwarp();
    const int64_t tile = u / ku, kk = u % ku;
    for (int r = lane; r < kRows; r += 32) {
      int64_t row = tile * kRows + r;
      row = row < n ? row : n - 1;
      bulk_copy(sm.stages + s * Ge::kStageBytes + r * Ge::kRowStride, w + row * k + kk * KU, KU * 2,
                &sm.full[s]);
    }
    ++i;
  };
  if (claim.ctr == nullptr) {
    for (int64_t u = u0; u < u1; ++u)
      issue(false, u);
    return;
  }
  int c = lane == 0 ? atomicAdd(claim.ctr, 1) : 0;
  c = __shfl_sync(0xffffffffu, c, 0);
  for (;;) {
    const int64_t t0 = int64_t{c} * kClaimTiles;
    if (t0 >= tiles) break;
    // The next claim goes out first: its latency hides behind this chunk's copies.
    int next = lane == 0 ? atomicAdd(claim.ctr, 1) : 0;
    const int64_t t1 = t0 + kClaimTiles < tiles ? t0 + kClaimTiles : tiles;
    for (int64_t u = t0 * ku; u < t1 * ku; ++u)
      issue(true, u);
    c = __shfl_sync(0xffffffffu, next, 0);
  }
  const int s = take_stage(true, -1);  // the end: an arrival without bytes completes the stage
  if (lane == 0) {
    mbar_arrive(&sm.full[s]);
    __threadfence();  // this CTA's claims before its count
    if (atomicAdd(claim.done, 1) == static_cast<int>(G - 1)) {  // every CTA is past its claims
      *claim.ctr = 0;
      *claim.done = 0;
    }
  }
  ++i;
}

// PMKV_BULK_PRODUCERS > 0: producer warp `pw` of kAsyncProducers streams units [u0, u1) with
// 16-byte cp.async (see kAsyncProducers); every producer warp waits for each stage to be free,
// and each lane arrives on the stage's mbarrier once its copies of the stage have landed. Rows
// past n repeat row n - 1, as in produce().
template <int RT, int KU, bool kCompact>
__device__ __forceinline__ void produce_async(const Smem<RT, KU, kCompact>& sm,
                                              const uint16_t* __restrict__ w, int n, int k,
                                              int64_t u0, int64_t u1, int& i, int pw, int lane) {
  using Ge = Geometry<RT, KU, kCompact>;
  constexpr int kRows = Ge::kRows, kStages = Ge::kStages, kP = kProducerWarps;
  constexpr int kRowChunks = KU / 8;  // 16-byte chunks of a unit's row
  const int64_t ku = k / KU;
  for (int64_t u = u0; u < u1; ++u, ++i) {
    const int s = i % kStages;
    if (i >= kStages) mbar_wait(&sm.empty[s], ((i / kStages) - 1) & 1);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // as in produce()
    const int64_t tile = u / ku, kk = u % ku;
    uint8_t* const st = sm.stages + s * Ge::kStageBytes;
    if constexpr (kSweep) {
#pragma unroll 4
      for (int c = pw * 32 + lane; c < kRows * kRowChunks; c += 32 * kP) {
        const int r = c / kRowChunks, col = c % kRowChunks;
        int64_t row = tile * kRows + r;
        row = row < n ? row : n - 1;
        cp_async16(st + r * Ge::kRowStride + 16 * col, w + row * k + kk * KU + 8 * col);
      }
    } else {
#pragma unroll 2
      for (int r = pw; r < kRows; r += kP) {
        int64_t row = tile * kRows + r;
        row = row < n ? row : n - 1;
#pragma unroll
        for (int c = 0; c < KU / 256; ++c)
          cp_async16(st + r * Ge::kRowStride + 16 * lane + 512 * c,
                     w + row * k + kk * KU + 8 * lane + 256 * c);
      }
    }
    cp_async_mbar_arrive(&sm.full[s]);
  }
}

inline constexpr int kSplitAdd = 1;
inline constexpr int kSplitNorm = 2;

// The 8 consumer warps: the products of units [u0, u1) of d [m, n] = a [m, k] * w [n, k]^T (CTA
// `cta` of G), or of the whole tiles the producer claims (each stage's unit in sm.meta, -1 at the
// end), each tile's fix-up and its epilogue (see the file comment). `i` as in produce().
// kSplit (see SkinnyGemmParams::add_residual, norm_input): 0; kSplitAdd: each stored column of d
// is also added to the residual stream (norm.x += d + norm.bias); kSplitNorm: `a` is the row the
// prologue normalized into shared memory (m == 1).
template <int NT, int RT, int KU, class OutT, bool kGated, bool kCompact, int kSplit = 0>
__device__ __forceinline__ void consume(const Smem<RT, KU, kCompact>& sm,
                                        const uint16_t* __restrict__ a, OutT* __restrict__ d, int m,
                                        int n, int k, int* __restrict__ counters,
                                        float* __restrict__ partials,
                                        const float* __restrict__ gate_bias, int64_t cta,
                                        const Split& split, int& i, int warp, int lane,
                                        const AddRmsNormParams& norm = {}, bool claiming = false) {
  using Ge = Geometry<RT, KU, kCompact>;
  constexpr int kRows = Ge::kRows, kStages = Ge::kStages, kStageBytes = Ge::kStageBytes;
  constexpr int kSlots = RT * NT * 4;
  float* const red = sm.red;
  float* const fin = sm.fin;
  const int64_t ku = split.ku;  // units per tile
  const int64_t u0 = claiming ? 0 : split.begin(cta);
  const int64_t u1 = claiming ? INT64_MAX : split.begin(cta + 1);
  const int g = lane >> 2, t = lane & 3;
  const uint4* ap[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = min(8 * nt + g, m - 1);
    ap[nt] = reinterpret_cast<const uint4*>(a + int64_t{r} * k) + t + 4 * warp;
  }
  constexpr int kMine = (Ge::kBlocks + kConsumers - 1) / kConsumers;  // blocks per warp per unit
  float acc[RT][NT][4];
  skinny_detail::zero(acc);
  const int ct = static_cast<int>(threadIdx.x);  // consumer thread 0..255
  const int64_t first_tile = u0 / ku;
  // The fragments of `a` for a unit are loaded one unit ahead (from L2 when a does not fit the L1
  // that the ring leaves: m > 1), so their latency hides behind the previous unit's wait.
  constexpr bool kAllBlocks = Ge::kBlocks % kConsumers == 0;
  uint4 av[kMine][NT], an[kMine][NT];
  auto load_a = [&](int64_t kk, uint4(&dst)[kMine][NT]) {
#pragma unroll
    for (int j = 0; j < kMine; ++j)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        if (kAllBlocks || warp + kConsumers * j < Ge::kBlocks)
          dst[j][nt] = kSplit == kSplitNorm
                           ? *(ap[nt] + kk * (KU / 8) + 4 * kConsumers * j)
                           : load_cached(ap[nt] + kk * (KU / 8) + 4 * kConsumers * j);
  };
  load_a(u0 % ku, an);  // in bounds even for an empty range (any kk < ku is)
  for (int64_t done_units = 0;; ++done_units, ++i) {
    const int s = i % kStages;
    int64_t u = u0 + done_units;  // claiming: the stage says (below)
    if (u >= u1) break;
    // Claimed tiles are whole, so their units' k offsets cycle 0 .. ku - 1 as a range's do.
    const int64_t kk = claiming ? done_units % ku : u % ku;
#pragma unroll
    for (int j = 0; j < kMine; ++j)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        av[j][nt] = an[j][nt];
    if (claiming || u + 1 < u1) load_a((kk + 1) % ku, an);
    mbar_wait(&sm.full[s], (i / kStages) & 1);
    if (claiming) {
      u = sm.meta[s];
      if (u < 0) break;
    }
    const int64_t tile = u / ku;
    uint4 wv[kMine][RT][2];
#pragma unroll
    for (int j = 0; j < kMine; ++j) {
      const uint8_t* st = sm.stages + s * kStageBytes + (32 * (warp + kConsumers * j) + 8 * t) * 2;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (kAllBlocks || warp + kConsumers * j < Ge::kBlocks)
            wv[j][rt][h] = lds128(st + (16 * rt + 8 * h + g) * Ge::kRowStride);
    }
    mbar_arrive(&sm.empty[s]);  // every consumer thread: its reads of the stage are done
#pragma unroll
    for (int j = 0; j < kMine; ++j) {
      if (!kAllBlocks && warp + kConsumers * j >= Ge::kBlocks) continue;
      mma_block<NT, RT>(acc, wv[j], av[j]);
    }

    // ---- at the end of this CTA's segment of `tile`: add the 8 warps' sums, store or publish.
    if (kk != ku - 1 && u != u1 - 1) continue;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          red[(warp * kSlots + (rt * NT + nt) * 4 + c) * 32 + lane] = acc[rt][nt][c];
    skinny_detail::zero(acc);
    named_sync(1, kConsumers * 32);
    const bool whole = kk == ku - 1 && u - kk >= u0;  // the segment is the whole tile
    // Output o of the tile (slot o / 32, lane o % 32: the accumulator layout) goes to fin[o] once
    // complete: here for a whole tile, after the fix-up for a split one.
    for (int o = ct; o < kSlots * 32; o += kConsumers * 32) {
      float v = 0.0f;
#pragma unroll
      for (int ww = 0; ww < kConsumers; ++ww)
        v += red[ww * kSlots * 32 + o];
      if (whole) {
        fin[o] = v;
      } else {
        const int pslot = tile == first_tile ? 0 : 1;
        partials[(cta * 2 + pslot) * Ge::kPartialFloats + o] = v;
      }
    }
    bool done = whole;
    if (!whole) {
      const int64_t c_first = split.owner(tile * ku);
      const int64_t c_last = split.owner(tile * ku + ku - 1);
      __threadfence();
      named_sync(1, kConsumers * 32);
      if (ct == 0) {
        const int old = atomicAdd(&counters[tile], 1);
        const int last = old == static_cast<int>(c_last - c_first);
        if (last) counters[tile] = 0;  // every contributor has arrived: ready for the next launch
        *sm.flag = last;
      }
      named_sync(1, kConsumers * 32);
      done = *sm.flag != 0;
      if (done) {
        __threadfence();
        for (int o = ct; o < kSlots * 32; o += kConsumers * 32) {
          float sum = 0.0f;
          for (int64_t cc = c_first; cc <= c_last; ++cc) {
            const int ps = split.begin(cc) / ku == tile ? 0 : 1;
            sum += __ldcg(&partials[(cc * 2 + ps) * Ge::kPartialFloats + o]);
          }
          fin[o] = sum;
        }
      }
    }
    if (done) {
      named_sync(1, kConsumers * 32);
      for (int o = ct; o < kSlots * 32; o += kConsumers * 32) {
        const int slot = o >> 5, l = o & 31;
        const int c = slot & 3, nt = (slot >> 2) % NT, rt = (slot >> 2) / NT;
        const int col = 8 * nt + 2 * (l & 3) + (c & 1);
        if constexpr (kGated) {
          // Rows r (gate) and r + 8 (up) of a 16-row group sit in slots c and c + 2.
          if ((c & 2) != 0) continue;
          const int64_t half = n / 2;
          const int64_t j = 8 * (tile * RT + rt) + (l >> 2);  // output column
          if (col < m && j < half) {
            // No bias: no addition either (as launch_silu_mul; -0 + 0 would turn into +0).
            float gv = __bfloat162float(__float2bfloat16_rn(fin[o]));
            float uv = __bfloat162float(__float2bfloat16_rn(fin[o + 64]));
            if (gate_bias != nullptr) {
              gv = __fadd_rn(gv, gate_bias[j]);
              uv = __fadd_rn(uv, gate_bias[half + j]);
            }
            d[int64_t{col} * half + j] = convert_out<OutT>(silu_mul(gv, uv));
          }
        } else {
          const int64_t row = tile * kRows + 16 * rt + (l >> 2) + 8 * (c >> 1);
          if (col < m && row < n) {
            d[int64_t{col} * n + row] = convert_out<OutT>(fin[o]);
            if constexpr (kSplit == kSplitAdd) {
              // add_rmsnorm_row's first pass for this column: y = x + (delta + bias).
              const float dv = norm.bias != nullptr ? __fadd_rn(fin[o], norm.bias[row]) : fin[o];
              float* xp = norm.x + int64_t{col} * n + row;
              *xp = __fadd_rn(*xp, dv);
            }
          }
        }
      }
    }
    named_sync(1, kConsumers * 32);  // red and flag are reused by the next segment
  }
}

// Counts this CTA's consumers in on `counter` once their stores are fenced; true in the last of
// the G CTAs to arrive (in all its consumer threads), which also resets the counter to zero.
template <int RT, int KU, bool kCompact>
__device__ __forceinline__ bool arrive_last(const Smem<RT, KU, kCompact>& sm, int* counter,
                                            int64_t G) {
  __threadfence();
  named_sync(1, kConsumers * 32);
  if (threadIdx.x == 0) {
    const int old = atomicAdd(counter, 1);
    const int last = old == static_cast<int>(G - 1);
    if (last) *counter = 0;  // ready for the next launch
    *sm.flag = last;
  }
  named_sync(1, kConsumers * 32);
  return *sm.flag != 0;
}

// The residual add + RMSNorm tail over d's m rows (see the file comment), run by the consumers of
// the one CTA that arrived last.
template <int kNormV, int RT, int KU, bool kCompact>
__device__ __forceinline__ void norm_tail(const Smem<RT, KU, kCompact>& sm,
                                          const AddRmsNormParams& norm, int m, int warp, int lane) {
  using Ge = Geometry<RT, KU, kCompact>;
  __threadfence();
  if (norm.dim <= rmsnorm_detail::kWarpRowMaxDim) {  // the norm's warp-per-row variant
    for (int r = warp; r < m; r += kConsumers)
      rmsnorm_detail::add_rmsnorm_row<kNormV, true, true>(norm, r, lane, nullptr, [] {});
  } else {  // its CTA-per-row variant on the 256 consumer threads, a partial buffer a row
    static_assert(kSkinnyGemmBulkMaxM * kConsumers * 4 <= Ge::kRedBytes);
    const int ct = static_cast<int>(threadIdx.x);
    for (int r = 0; r < m; ++r)
      rmsnorm_detail::add_rmsnorm_row<kNormV, false, true>(norm, r, ct, sm.red + r * kConsumers,
                                                           [] { named_sync(1, kConsumers * 32); });
  }
}

// The prologue of a kSplitNorm product (m == 1): add_rmsnorm_row's CTA-per-row variant on the
// 256 consumer threads, over x as the product before stored it (kSplitAdd: y = x + (delta +
// bias) already), so the same thread sums the same columns in the same order and the row `h`
// written to shared memory (bf16 [k]) is bit-identical to that kernel's output. CTA 0 also stores
// it to norm.out when given (tests). The norm's weights depend on no earlier kernel: they are in
// registers before pdl_wait(), and x is read once (k <= kNormInMaxK).
inline constexpr int kNormInMaxK = 8192;
inline constexpr int kNormInVecs = kNormInMaxK / (kConsumers * 32 * 4);  // float4 a thread

struct NormWeights {
  float w[kNormInVecs][4];
};

__device__ __forceinline__ NormWeights norm_weights(const AddRmsNormParams& norm, int k, int ct) {
  NormWeights nw;
#pragma unroll
  for (int j = 0; j < kNormInVecs; ++j) {
    const int c = ct * 4 + j * rmsnorm_detail::kNormThreads * 4;
    if (c < k) rmsnorm_detail::load_v<4>(norm.weight + c, nw.w[j]);
  }
  return nw;
}

__device__ __forceinline__ void norm_prologue(const AddRmsNormParams& norm, const NormWeights& nw,
                                              int k, uint16_t* h, float* partial, int warp,
                                              int lane) {
  using namespace rmsnorm_detail;
  const int ct = warp * 32 + lane;
  float y[kNormInVecs][4];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kNormInVecs; ++j) {
    const int c = ct * 4 + j * kNormThreads * 4;
    if (c < k) load_v<4>(norm.x + c, y[j]);
  }
#pragma unroll
  for (int j = 0; j < kNormInVecs; ++j) {
    const int c = ct * 4 + j * kNormThreads * 4;
    if (c < k) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        ss = __fmaf_rn(y[j][e], y[j][e], ss);
    }
  }
  ss = warp_sum(ss);
  if (lane == 0) partial[warp] = ss;
  named_sync(1, kConsumers * 32);
  ss = 0.0f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w)
    ss += partial[w];
  const float inv =
      __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(k)), norm.eps)));
  const bool out = norm.out != nullptr && blockIdx.x == 0;
#pragma unroll
  for (int j = 0; j < kNormInVecs; ++j) {
    const int c = ct * 4 + j * kNormThreads * 4;
    if (c < k) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        y[j][e] = __fmul_rn(nw.w[j][e], __fmul_rn(y[j][e], inv));
      store_bf16_v<4>(h + c, y[j]);
      if (out) store_bf16_v<4>(norm.out + c, y[j]);
    }
  }
  named_sync(1, kConsumers * 32);  // h complete; partial (the red buffer) free again
}

// Grid: G CTAs (G <= units), kThreads threads, Geometry::kLaunchSmemBytes of dynamic shared memory.
// by_tiles: the split by whole tiles (Split; the launcher sets it only when tiles >= G). claim:
// whole tiles claimed as the CTAs go (SkinnyGemmParams::claim; only with by_tiles), or nulls.
// kGated: the SwiGLU epilogue (see SkinnyGemmParams::gated); d is then [m, n / 2]. kNormV: 0, or
// the tail's vector width (4 when rmsnorm_detail::add_rmsnorm_vec4(norm), else 1; d is norm.delta).
template <int NT, int RT, int KU, class OutT, bool kGated, int kNormV, bool kCompact,
          int kSplit = 0>
__global__ void __launch_bounds__(kThreads, 1)
    bulk_gemm_kernel(const uint16_t* a, const uint16_t* __restrict__ w, OutT* __restrict__ d, int m,
                     int n, int k, int* __restrict__ counters, float* __restrict__ partials,
                     const float* __restrict__ gate_bias, const AddRmsNormParams norm,
                     const int by_tiles, const Claim claim) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the launcher takes this path only on sm_90 and newer
#else
  extern __shared__ __align__(128) uint8_t smem[];
  const Smem<RT, KU, kCompact> sm(smem);
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t G = gridDim.x;
  const int64_t tiles =
      (n + Geometry<RT, KU, kCompact>::kRows - 1) / Geometry<RT, KU, kCompact>::kRows;
  const Split split{tiles * (k / KU), k / KU, G, by_tiles != 0};
  sm.init();
  __syncthreads();
  pdl_trigger();

  int i = 0;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (kSetMaxNreg) {
    if (warp >= kConsumers) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    } else {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    }
  }
#endif
  if constexpr (kAsyncProducers > 0) {
    if (warp >= kConsumers) {
      produce_async(sm, w, n, k, split.begin(blockIdx.x), split.begin(int64_t{blockIdx.x} + 1), i,
                    warp - kConsumers, lane);
      return;
    }
  } else if (warp == kConsumers) {
    produce(sm, w, n, k, split.begin(blockIdx.x), split.begin(int64_t{blockIdx.x} + 1), i, lane,
            claim, tiles, G);
    return;
  }
  if constexpr (kSplit == kSplitNorm) {
    const NormWeights nw = norm_weights(norm, k, static_cast<int>(threadIdx.x));
    pdl_wait();  // x comes from the earlier kernels
    // The row lives past the launch's usual footprint (launch_bulk_typed asks for 2 k bytes more).
    uint16_t* h = reinterpret_cast<uint16_t*>(smem + Geometry<RT, KU, kCompact>::kLaunchSmemBytes);
    norm_prologue(norm, nw, k, h, sm.red, warp, lane);
    a = h;
  } else {
    pdl_wait();  // `a`, `d`, the counters and partials belong to / follow the earlier kernels
  }
  consume<NT, RT, KU, OutT, kGated, kCompact, kSplit>(sm, a, d, m, n, k, counters, partials,
                                                      gate_bias, blockIdx.x, split, i, warp, lane,
                                                      norm, claim.ctr != nullptr);
  if constexpr (kNormV != 0) {
    // Every thread's stores of d (and of split tiles' partials) before its CTA is counted in.
    if (arrive_last(sm, &counters[tiles], G)) norm_tail<kNormV>(sm, norm, m, warp, lane);
  }
#endif
}

}  // namespace pmkv::kernels::bulk_gemm
