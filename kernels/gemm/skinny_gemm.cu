// Skinny GEMM for m <= 16 (kernels/gemm/skinny_gemm.h).
//
// Work decomposition. A warp tile is 16 * RT consecutive rows of w (RT = 1 or 2 tensor-core row
// tiles). A CTA has 8 warps: 8 / KS warp tiles side by side, each split over KS warps along k.
// k is cut into 32-element blocks; U consecutive blocks form a batch, and the KS warps of a tile
// take batches round-robin, so at any moment they stream neighbouring bytes of the same rows.
// A thread issues all its weight loads of a batch (U * RT * 2 loads of 16 bytes, non-coherent,
// L1::no_allocate so L1 keeps a) before the first mma that consumes them. Partial sums of the
// KS warps are added in shared memory in a fixed order (deterministic), then stored.
//
// Tensor-core mapping. mma.sync m16n8k16 computes D[16 x 8] += A[16 x 16] B[16 x 8]; we use
// A = 16 rows of w, B = 8 rows of a (transposed), D = a tile of d^T. In A's fragment, lane
// (g = lane / 4, t = lane % 4) holds rows g and g + 8 at the logical k columns {2t, 2t+1, 2t+8,
// 2t+9}; in B's fragment it holds row g of a (B column g) at the same logical k rows. Because k
// is summed over, any bijection between logical and physical k that A and B share gives the same
// product, so lane (g, t) loads the 8 physical elements [32 b + 8t, 32 b + 8t + 8) of its rows
// with one 16-byte load per row, and the 32 physical k of block b feed two mma: the first takes
// physical 8t + {0, 1} as logical {2t, 2t+1} and 8t + {2, 3} as {2t+8, 2t+9}, the second the
// elements 8t + 4..7 likewise. One 16-byte load of a then feeds both B fragments.
//
// Rows of w past n and rows of a past m are clamped to the last valid row (no predication): a
// row of D depends only on the same row of A, and a column only on the same column of B, so
// those lanes compute values that are never stored. Only the k tail (k % 32 != 0) is predicated,
// with zeros for both operands.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/gemm/skinny_gemm.h"
#include "kernels/gemm/skinny_gemm_bulk.cuh"
#include "kernels/gemm/skinny_gemm_common.cuh"
#include "kernels/pdl.cuh"

namespace pmkv::kernels {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMinBlocksPerSm = 2;   // <= 128 registers per thread
constexpr int kPrefetchBatches = 2;  // batches per warp fetched into L2 before pdl_wait()

// Blocks of 32 k per batch: 16 loads of w in flight per thread for NT == 1, 8 (RT == 1) or 12
// (RT == 2) for NT == 2, whose second fragment of a costs registers (the limit is 128).
template <int NT, int RT>
constexpr int batch_blocks() {
  return NT == 1 ? 8 / RT : (RT == 1 ? 4 : 3);
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

using skinny_detail::convert_out;
using skinny_detail::load_cached;
using skinny_detail::mma_block;

// Grid: one CTA per 8 / 2^ks_log2 warp tiles. a, w: 16-byte aligned, k % 8 == 0.
template <int NT, int RT, class OutT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    skinny_gemm_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ w,
                       OutT* __restrict__ d, int m, int n, int k, int ks_log2) {
  constexpr int U = batch_blocks<NT, RT>();
  constexpr int kSlots = RT * NT * 4;  // accumulators per lane
  __shared__ float red[kWarps][kSlots][32];

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, t = lane & 3;
  const int ks = 1 << ks_log2;
  const int tiles_per_cta = kWarps >> ks_log2;
  const int kslice = warp & (ks - 1);
  const int64_t tile = int64_t{blockIdx.x} * tiles_per_cta + (warp >> ks_log2);
  const int64_t row0 = tile * (16 * RT);

  // Per-lane row pointers (uint4 units, already offset by the lane's 8t elements).
  const uint4* wp[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int64_t r = row0 + 16 * rt + 8 * h + g;
      r = r < n ? r : n - 1;
      wp[rt][h] = reinterpret_cast<const uint4*>(w + r * k) + t;
    }
  }
  const uint4* ap[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = min(8 * nt + g, m - 1);
    ap[nt] = reinterpret_cast<const uint4*>(a + int64_t{r} * k) + t;
  }

  // Launched with PDL: the weights do not depend on the kernels before this one, so the first
  // batches of this warp's rows are fetched into L2 while those kernels finish; `a` (their output)
  // and `d` are touched only after pdl_wait().
  pdl_trigger();
  {
    const int full = k >> 5, nb = full / U;
    for (int b = kslice; b < nb && b < kslice + kPrefetchBatches * ks; b += ks) {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(wp[rt][h] + b * U * 4 + 4 * u));
    }
  }
  pdl_wait();

  float acc[RT][NT][4];
  skinny_detail::zero(acc);

  // Full batches, round-robin over the KS warps of the tile. Block b starts at uint4 4b.
  const int full_blocks = k >> 5;
  const int batches = full_blocks / U;
  for (int b = kslice; b < batches; b += ks) {
    const int q0 = b * U * 4;
    uint4 wv[U][RT][2];
    uint4 av[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[u][rt][h] = load_stream(wp[rt][h] + q0 + 4 * u);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        av[u][nt] = load_cached(ap[nt] + q0 + 4 * u);
#pragma unroll
    for (int u = 0; u < U; ++u)
      mma_block<NT, RT>(acc, wv[u], av[u]);
  }

  // Leftover blocks (fewer than U full ones and a partial one), one per warp in turn; a lane whose
  // 8 elements lie past k contributes zeros.
  const int total_blocks = full_blocks + ((k & 31) != 0 ? 1 : 0);
  for (int blk = batches * U + kslice; blk < total_blocks; blk += ks) {
    // Such a lane reads its row's first 8 elements instead (in bounds as k >= 8, even if the
    // compiler speculates the load) and zeroes them.
    const bool ok = int64_t{blk} * 32 + 8 * t < k;
    const int q = ok ? blk * 4 : -t;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    uint4 wv[RT][2];
    uint4 av[NT];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 v = load_stream(wp[rt][h] + q);
        wv[rt][h] = ok ? v : zero;
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4 v = load_cached(ap[nt] + q);
      av[nt] = ok ? v : zero;
    }
    mma_block<NT, RT>(acc, wv, av);
  }

  // Partial sums to shared memory; then each (tile, slot, lane) is summed over the KS warps in
  // order and stored.
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        red[warp][(rt * NT + nt) * 4 + c][lane] = acc[rt][nt][c];
  __syncthreads();

  const int outputs = tiles_per_cta * kSlots * 32;
  for (int i = static_cast<int>(threadIdx.x); i < outputs; i += kThreads) {
    const int l = i & 31;
    const int slot = (i >> 5) % kSlots;
    const int tl = (i >> 5) / kSlots;  // tile within the CTA
    const int c = slot & 3;
    const int nt = (slot >> 2) % NT;
    const int rt = (slot >> 2) / NT;
    const int col = 8 * nt + 2 * (l & 3) + (c & 1);  // row of a / d
    const int64_t row = (int64_t{blockIdx.x} * tiles_per_cta + tl) * (16 * RT) + 16 * rt +
                        (l >> 2) + 8 * (c >> 1);  // row of w / column of d
    if (col < m && row < n) {
      float s = red[tl << ks_log2][slot][l];
      for (int j = 1; j < ks; ++j)
        s += red[(tl << ks_log2) + j][slot][l];
      d[int64_t{col} * n + row] = convert_out<OutT>(s);
    }
  }
}

struct Config {
  int nt, rt, ks_log2;
  int64_t ctas;
};

int log2_exact(int v) {
  switch (v) {
    case 1:
      return 0;
    case 2:
      return 1;
    case 4:
      return 2;
    case 8:
      return 3;
    default:
      return -1;
  }
}

// Chooses the warp tile (RT) and the k split (KS). All CTAs resident at once (one wave) when the
// shape allows: then every CTA streams at the same rate (the memory is the bottleneck) and they
// finish together. Among one-wave choices the largest KS wins (most warps, most bytes in flight).
// Shapes too large for one wave even at KS = 1 are cut into many CTAs (a short tail), with at
// least 8 batches per warp.
Config choose(int64_t m, int64_t n, int64_t k, int32_t num_sms, int32_t warp_rows,
              int32_t k_split) {
  Config cfg{};
  cfg.nt = m <= 8 ? 1 : 2;
  const int64_t resident = int64_t{num_sms > 0 ? num_sms : 132} * kMinBlocksPerSm;
  const auto ctas_for = [&](int rt, int ks_log2) {
    const int64_t tiles = (n + 16 * rt - 1) / (16 * rt);
    const int64_t per_cta = kWarps >> ks_log2;
    return (tiles + per_cta - 1) / per_cta;
  };
  if (warp_rows != 0) {
    cfg.rt = warp_rows / 16;
  } else {
    // 32-row warp tiles halve the traffic of a per weight byte; use them when there are enough
    // tiles to fill the machine anyway.
    cfg.rt = (n + 31) / 32 >= resident ? 2 : 1;
  }
  if (k_split != 0) {
    cfg.ks_log2 = log2_exact(k_split);
  } else {
    cfg.ks_log2 = -1;
    for (int l = 3; l >= 0 && cfg.ks_log2 < 0; --l)
      if (ctas_for(cfg.rt, l) <= resident) cfg.ks_log2 = l;
    if (cfg.ks_log2 < 0) {
      const int u = cfg.nt == 1 ? 8 / cfg.rt : (cfg.rt == 1 ? 4 : 3);
      const int64_t batches = (k / 32) / u;
      cfg.ks_log2 = 0;
      while (cfg.ks_log2 < 3 && batches >> (cfg.ks_log2 + 1) >= 8)
        ++cfg.ks_log2;
    }
  }
  cfg.ctas = cfg.ks_log2 >= 0 ? ctas_for(cfg.rt, cfg.ks_log2) : 0;
  return cfg;
}

template <int NT, int RT, class OutT>
cudaError_t launch_typed(const SkinnyGemmParams& p, int ks_log2, int64_t ctas,
                         cudaStream_t stream) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  request_pdl(cfg, attr, p.pdl);
  return cudaLaunchKernelEx(&cfg, skinny_gemm_kernel<NT, RT, OutT>, p.a, p.w,
                            static_cast<OutT*>(p.d), static_cast<int>(p.m), static_cast<int>(p.n),
                            static_cast<int>(p.k), ks_log2);
}

template <int NT, int RT>
cudaError_t launch_out(const SkinnyGemmParams& p, int ks_log2, int64_t ctas, cudaStream_t stream) {
  return p.out == DType::kF32 ? launch_typed<NT, RT, float>(p, ks_log2, ctas, stream)
                              : launch_typed<NT, RT, __nv_bfloat16>(p, ks_log2, ctas, stream);
}

// ---- the bulk kernel

// Unit width: the longest copies that leave the ring two stages or more.
int bulk_unit_k(int64_t k) {
  return k % 2048 == 0 ? 2048 : k % 1024 == 0 ? 1024 : 0;
}

int64_t bulk_tiles(int64_t n) {
  return (n + 15) / 16;
}

// The partials of split tiles sit at the end of the workspace, the same place for every launch
// that shares it. (Placed after this product's own counters, a narrow product's partials landed
// on a wider one's tile counters: the o projection's on the gate/up projection's at Llama-3-8B
// shapes, whose split tiles then never completed.) The offset is a multiple of 256 and at least
// skinny_gemm_counter_bytes(p.n), since skinny_gemm_uses_bulk checked the workspace's size.
float* bulk_partials(const SkinnyGemmParams& p) {
  const int64_t sms = p.num_sms > 0 ? p.num_sms : 132;
  const int64_t bytes = sms * 2 * bulk_gemm::Geometry<1, 1024>::kPartialFloats * 4;
  return reinterpret_cast<float*>(static_cast<uint8_t*>(p.workspace) +
                                  ((p.workspace_bytes - bytes) & ~int64_t{255}));
}

// A block's largest dynamic shared memory on sm_90 (227 KB).
constexpr int kMaxBlockSmem = 227 * 1024;

template <int NT, int KU, class OutT, bool kGated, int kNormV, bool kCompact, int kSplit = 0>
cudaError_t launch_bulk_typed(const SkinnyGemmParams& p, cudaStream_t stream) {
  using Ge = bulk_gemm::Geometry<1, KU, kCompact>;
  const auto kernel =
      bulk_gemm::bulk_gemm_kernel<NT, 1, KU, OutT, kGated, kNormV, kCompact, kSplit>;
  constexpr bool kNormIn = kSplit == bulk_gemm::kSplitNorm;
  // The attribute is per kernel and process; setting it is not a stream operation (capturable).
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kNormIn ? kMaxBlockSmem : Ge::kLaunchSmemBytes);
  if (attr_status != cudaSuccess) return attr_status;
  const int64_t smem = Ge::kLaunchSmemBytes + (kNormIn ? 2 * p.k : 0);
  if (smem > kMaxBlockSmem) return cudaErrorInvalidValue;
  const int64_t units = bulk_tiles(p.n) * (p.k / KU);
  const int64_t ctas = std::min<int64_t>(units, p.num_sms > 0 ? p.num_sms : 132);
  const int by_tiles = !p.stream_k && bulk_tiles(p.n) >= ctas ? 1 : 0;  // see bulk_gemm::Split
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(bulk_gemm::kThreads);
  cfg.dynamicSmemBytes = static_cast<unsigned>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  request_pdl(cfg, attr, p.pdl);
  auto* counters = static_cast<int*>(p.workspace);
  float* partials = bulk_partials(p);
  bulk_gemm::Claim claim;
  // After the tile counters and the fused norm's. (cp.async producers claim nothing: see
  // bulk_gemm::kAsyncProducers.)
  if (p.claim && by_tiles != 0 && bulk_gemm::kAsyncProducers == 0) {
    claim.ctr = counters + bulk_tiles(p.n) + 1;
    claim.done = claim.ctr + 1;
  }
  return cudaLaunchKernelEx(&cfg, kernel, p.a, p.w, static_cast<OutT*>(p.d), static_cast<int>(p.m),
                            static_cast<int>(p.n), static_cast<int>(p.k), counters, partials,
                            p.gate_bias, p.add_norm, by_tiles, claim);
}

template <int NT, int KU, bool kCompact>
cudaError_t launch_bulk_out(const SkinnyGemmParams& p, cudaStream_t stream) {
  using bulk_gemm::kSplitAdd, bulk_gemm::kSplitNorm;
  if (p.add_residual)
    return launch_bulk_typed<NT, KU, float, false, 0, kCompact, kSplitAdd>(p, stream);
  if (p.norm_input) {
    if (p.gated)
      return launch_bulk_typed<NT, KU, __nv_bfloat16, true, 0, kCompact, kSplitNorm>(p, stream);
    return p.out == DType::kF32
               ? launch_bulk_typed<NT, KU, float, false, 0, kCompact, kSplitNorm>(p, stream)
               : launch_bulk_typed<NT, KU, __nv_bfloat16, false, 0, kCompact, kSplitNorm>(p,
                                                                                          stream);
  }
  if (p.gated) return launch_bulk_typed<NT, KU, __nv_bfloat16, true, 0, kCompact>(p, stream);
  if (p.fuse_add_norm) {
    return rmsnorm_detail::add_rmsnorm_vec4(p.add_norm)
               ? launch_bulk_typed<NT, KU, float, false, 4, kCompact>(p, stream)
               : launch_bulk_typed<NT, KU, float, false, 1, kCompact>(p, stream);
  }
  return p.out == DType::kF32
             ? launch_bulk_typed<NT, KU, float, false, 0, kCompact>(p, stream)
             : launch_bulk_typed<NT, KU, __nv_bfloat16, false, 0, kCompact>(p, stream);
}

cudaError_t launch_bulk(const SkinnyGemmParams& p, cudaStream_t stream) {
  if (p.compact) return launch_bulk_out<1, 1024, true>(p, stream);  // any k % 1024 == 0
  return bulk_unit_k(p.k) == 2048 ? launch_bulk_out<1, 2048, false>(p, stream)
                                  : launch_bulk_out<1, 1024, false>(p, stream);
}

}  // namespace

int64_t skinny_gemm_counter_bytes(int64_t max_n) {
  // + the fused norm's counter and the claimed tiles' two
  return ((bulk_tiles(max_n) + 3) * 4 + 255) / 256 * 256;
}

int64_t skinny_gemm_workspace_bytes(int64_t max_n, int32_t num_sms) {
  const int64_t sms = num_sms > 0 ? num_sms : 132;
  return skinny_gemm_counter_bytes(max_n) +
         sms * 2 * bulk_gemm::Geometry<1, 1024>::kPartialFloats * 4;
}

bool skinny_gemm_norm_input_fits(int64_t k, bool compact) {
  const int64_t base = compact ? bulk_gemm::Geometry<1, 1024, true>::kLaunchSmemBytes
                               : std::max(bulk_gemm::Geometry<1, 1024>::kLaunchSmemBytes,
                                          bulk_gemm::Geometry<1, 2048>::kLaunchSmemBytes);
  return k >= 0 && k <= bulk_gemm::kNormInMaxK && base + 2 * k <= kMaxBlockSmem;
}

int32_t skinny_gemm_bulk_smem_bytes() {
  return std::max(bulk_gemm::Geometry<1, 1024>::kSmemBytes,
                  bulk_gemm::Geometry<1, 2048>::kSmemBytes);
}

bool skinny_gemm_uses_bulk(const SkinnyGemmParams& p) {
  return p.bulk && p.workspace != nullptr && p.m >= 1 && p.m <= kSkinnyGemmBulkMaxM &&
         bulk_unit_k(p.k) != 0 && p.warp_rows == 0 && p.k_split == 0 &&
         skinny_gemm_supported(p.a, p.w, p.d, p.out, p.m, p.n, p.k) &&
         p.workspace_bytes >= skinny_gemm_workspace_bytes(p.n, p.num_sms);
}

cudaError_t launch_skinny_gemm(const SkinnyGemmParams& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  if (!skinny_gemm_supported(p.a, p.w, p.d, p.out, p.m, p.n, p.k)) return cudaErrorInvalidValue;
  if (p.out != DType::kF32 && p.out != DType::kBF16) return cudaErrorInvalidValue;
  if (p.warp_rows != 0 && p.warp_rows != 16 && p.warp_rows != 32) return cudaErrorInvalidValue;
  if (p.k_split != 0 && log2_exact(p.k_split) < 0) return cudaErrorInvalidValue;
  if (p.num_sms < 0) return cudaErrorInvalidValue;
  if (p.gated && (!skinny_gemm_uses_bulk(p) || p.out != DType::kBF16 || p.n % 16 != 0 ||
                  (p.gate_bias != nullptr && reinterpret_cast<uintptr_t>(p.gate_bias) % 4 != 0))) {
    return cudaErrorInvalidValue;
  }
  if (p.fuse_add_norm) {
    const AddRmsNormParams& q = p.add_norm;
    if (!skinny_gemm_uses_bulk(p) || p.gated || p.out != DType::kF32 || q.delta != p.d ||
        q.rows != p.m || q.dim != p.n || q.row_index != nullptr || q.x == nullptr ||
        q.weight == nullptr || q.out == nullptr) {
      return cudaErrorInvalidValue;
    }
  }
  if (p.add_residual && (!skinny_gemm_uses_bulk(p) || p.gated || p.fuse_add_norm || p.norm_input ||
                         p.out != DType::kF32 || p.add_norm.x == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.norm_input) {
    const AddRmsNormParams& q = p.add_norm;
    const auto aligned = [](const void* x, uintptr_t a) {
      return reinterpret_cast<uintptr_t>(x) % a == 0;
    };
    // k > 1024: launch_add_rmsnorm's CTA-per-row variant, the one the prologue reproduces.
    if (!skinny_gemm_uses_bulk(p) || p.m != 1 || p.fuse_add_norm || p.k <= 1024 ||
        p.k > bulk_gemm::kNormInMaxK || q.x == nullptr || q.weight == nullptr ||
        !aligned(q.x, 16) || !aligned(q.weight, 16) || (q.out != nullptr && !aligned(q.out, 8)) ||
        !skinny_gemm_norm_input_fits(p.k, p.compact)) {
      return cudaErrorInvalidValue;
    }
  }
  if (skinny_gemm_uses_bulk(p)) return launch_bulk(p, stream);
  const Config cfg = choose(p.m, p.n, p.k, p.num_sms, p.warp_rows, p.k_split);
  if (cfg.ctas <= 0 || cfg.ctas > INT32_MAX) return cudaErrorInvalidValue;
  if (cfg.nt == 1) {
    return cfg.rt == 1 ? launch_out<1, 1>(p, cfg.ks_log2, cfg.ctas, stream)
                       : launch_out<1, 2>(p, cfg.ks_log2, cfg.ctas, stream);
  }
  return cfg.rt == 1 ? launch_out<2, 1>(p, cfg.ks_log2, cfg.ctas, stream)
                     : launch_out<2, 2>(p, cfg.ks_log2, cfg.ctas, stream);
}

}  // namespace pmkv::kernels
