// Per-layer elementwise kernels of the decoder forward: embedding gather, residual add + RMSNorm,
// bias + RoPE + KV write, SiLU-gated activation. Every rounding step that the CPU backend performs
// is done here with the explicitly rounded intrinsics (__fadd_rn, __fmul_rn, ...), so nvcc cannot
// contract a multiply and an add into an FMA the CPU does not do: the residual add and the V
// stored back are then bit-identical with the CPU's, RoPE differs only through cosf/sinf, and the
// KV write runs the very quantizer of launch_kv_write (kv/kv_quantize.cuh).
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/kv/kv_quantize.cuh"
#include "kernels/model/add_rmsnorm_row.cuh"
#include "kernels/model/layer_ops.h"
#include "kernels/pdl.cuh"

namespace pmkv::kernels {

namespace {

bool aligned(const void* p, uintptr_t a) {
  return reinterpret_cast<uintptr_t>(p) % a == 0;
}

// bf16 bits to fp32 (exact): element 0 of a 32-bit word is its low half (little endian).
__device__ __forceinline__ float bf16_lo(uint32_t w) {
  return __uint_as_float(w << 16);
}
__device__ __forceinline__ float bf16_hi(uint32_t w) {
  return __uint_as_float(w & 0xFFFF0000u);
}
__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) {
  return __uint_as_float(uint32_t{b} << 16);
}
using rmsnorm_detail::float_to_bf16_bits;
using rmsnorm_detail::pack_bf16x2;

// ---- embedding ------------------------------------------------------------------------------

constexpr int kEmbThreads = 256;

// One CTA per row. kVec: hidden % 8 == 0 and table, x 16-byte aligned (so every row start is).
template <bool kVec>
__global__ void __launch_bounds__(kEmbThreads)
    embedding_kernel(const uint16_t* table, int32_t vocab, const int32_t* ids, int32_t hidden,
                     float* x) {
  const int64_t r = blockIdx.x;
  const int32_t id = ids[r];
  const bool ok = id >= 0 && id < vocab;  // otherwise a zero row and no table read
  const uint16_t* src = table + (ok ? int64_t{id} * hidden : 0);
  float* dst = x + r * hidden;
  if constexpr (kVec) {
    const int n8 = hidden / 8;
    for (int i = threadIdx.x; i < n8; i += blockDim.x) {
      const uint4 w = ok ? reinterpret_cast<const uint4*>(src)[i] : make_uint4(0u, 0u, 0u, 0u);
      float4* d = reinterpret_cast<float4*>(dst) + 2 * i;
      d[0] = make_float4(bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y));
      d[1] = make_float4(bf16_lo(w.z), bf16_hi(w.z), bf16_lo(w.w), bf16_hi(w.w));
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
      dst[i] = ok ? bf16_bits_to_float(src[i]) : 0.0f;
  }
}

// ---- residual add + RMSNorm -----------------------------------------------------------------

constexpr int kNormWarpRows = 4;  // warp-per-row variant: rows (warps) per CTA
using rmsnorm_detail::kNormThreads;
using rmsnorm_detail::kWarpRowMaxDim;

// kWarpRow: a warp per row (kNormWarpRows per CTA), else a CTA of kNormThreads per row; V = 4
// when rmsnorm_detail::add_rmsnorm_vec4 allows it, else 1. The row itself: add_rmsnorm_row.
template <int V, bool kWarpRow>
__global__ void __launch_bounds__(kWarpRow ? kNormWarpRows * 32 : kNormThreads)
    add_rmsnorm_kernel(const AddRmsNormParams p) {
  pdl_trigger();  // the GEMM after it may start streaming its weights (kernels/pdl.cuh)
  if constexpr (kWarpRow) {
    const int r = blockIdx.x * kNormWarpRows + (threadIdx.x >> 5);
    if (r >= p.rows) return;  // warp-uniform, and this variant has no CTA barrier
    rmsnorm_detail::add_rmsnorm_row<V, true, false>(p, r, threadIdx.x & 31, nullptr, [] {});
  } else {
    __shared__ float partial[kNormThreads / 32];
    rmsnorm_detail::add_rmsnorm_row<V, false, false>(p, blockIdx.x, threadIdx.x, partial,
                                                     [] { __syncthreads(); });
  }
}

// ---- bias + RoPE + KV write -----------------------------------------------------------------

constexpr int kRopeWarps = 8;
constexpr int kHalfSlots = kvq::kRowSlots / 2;  // pairs (i, i + d/2) a lane holds: d/2 <= 128

// grid (rows, ceil(tasks / kRopeWarps)); task t of a row is head t of the concatenated
// q | k | v heads, so its columns are [t * d, (t + 1) * d) of the row. A lane holds the pairs
// (j, j + d/2) for j = lane + 32 k < d/2: slot k is element j, slot k + 4 element j + d/2, so a
// lane's element indices increase with the slot, as kvq::quantize_row requires.
__global__ void __launch_bounds__(kRopeWarps * 32) rope_kv_write_kernel(const RopeKvWriteParams p) {
  pdl_trigger();  // decode attention after it may start reading its plan (DecodeParams::pdl)
  __shared__ float cos_t[kvq::kMaxHeadDim / 2];
  __shared__ float sin_t[kvq::kMaxHeadDim / 2];
  __shared__ uint32_t row_words[kRopeWarps][kvq::kRowWords];
  const int row = blockIdx.x;
  const int D = p.head_dim, half = D / 2;
  // The row's cos/sin table, exactly as cpu::rope_inplace: fp32 angle, accurate cosf/sinf.
  // half <= 128 < blockDim.x.
  if (threadIdx.x < half) {
    const float angle = __fmul_rn(static_cast<float>(p.positions[row]), p.inv_freq[threadIdx.x]);
    cos_t[threadIdx.x] = cosf(angle);
    sin_t[threadIdx.x] = sinf(angle);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int Hq = p.num_heads, Hk = p.num_kv_heads;
  const int task = blockIdx.y * kRopeWarps + warp;
  const bool live = task < Hq + 2 * Hk;
  const int kind = task < Hq ? 0 : (task < Hq + Hk ? 1 : 2);  // q, k, v
  const int h = kind == 0 ? task : (kind == 1 ? task - Hq : task - Hq - Hk);
  const int64_t col = int64_t{task} * D;
  // Before the wait, what no kernel writes: the bias (weights) and the row's page, bit-width and
  // slot (uploaded by the host before the step), so that after it only qkv's load is on the
  // critical path.
  float bias_a[kHalfSlots], bias_b[kHalfSlots];
#pragma unroll
  for (int k = 0; k < kHalfSlots; ++k) {
    const int j = lane + 32 * k;
    const bool use = live && p.bias != nullptr && j < half;
    bias_a[k] = use ? p.bias[col + j] : 0.0f;
    bias_b[k] = use ? p.bias[col + j + half] : 0.0f;
  }
  const bool kv_row = live && kind != 0;
  const int slot = kv_row ? p.slots[row] : 0;
  const int page_id = kv_row ? p.page_ids[row] : 0;
  const int bits = kv_row ? p.bits[row] : 0;
  __syncthreads();
  pdl_wait();         // qkv comes from the GEMM before (RopeKvWriteParams::pdl); every thread waits
  if (!live) return;  // warp-uniform; no CTA barrier below
  float* src = p.qkv + int64_t{row} * p.qkv_stride + col;

  float x[kvq::kRowSlots];
#pragma unroll
  for (int k = 0; k < kHalfSlots; ++k) {
    const int j = lane + 32 * k;
    float a = 0.0f, b = 0.0f;
    if (j < half) {
      a = src[j];
      b = src[j + half];
      if (p.bias != nullptr) {
        a = __fadd_rn(a, bias_a[k]);
        b = __fadd_rn(b, bias_b[k]);
      }
      if (kind != 2) {  // rotate-half, each product and sum rounded as on the CPU
        const float c = cos_t[j], s = sin_t[j];
        const float ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        const float rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        a = ra;
        b = rb;
      }
      float* dst = kind == 0 ? p.q_out + int64_t{row} * Hq * D + int64_t{h} * D : src;
      dst[j] = a;
      dst[j + half] = b;
    }
    x[k] = a;
    x[k + kHalfSlots] = b;
  }
  if (kind == 0) return;

  uint8_t* page = static_cast<uint8_t*>(p.pool.base) + int64_t{page_id} * p.pool.page_bytes;
  const auto index = [&](int k) {
    const int j = lane + 32 * (k % kHalfSlots);
    return j < half ? j + (k < kHalfSlots ? 0 : half) : -1;
  };
  uint32_t* sw = row_words[warp];
  const int qkind = kind - 1;  // 0: K, 1: V
  const kv::PageGeometry& g = p.pool.geometry;
  switch (bits) {  // warp-uniform
    case 16: {
      const kv::PageLayout L = kv::page_layout(g, 16);
      if (slot >= 0 && slot < L.tokens)
        kvq::quantize_row<16>(x, index, L, page, slot, h, qkind, lane, sw);
      break;
    }
    case 8: {
      const kv::PageLayout L = kv::page_layout(g, 8);
      if (slot >= 0 && slot < L.tokens)
        kvq::quantize_row<8>(x, index, L, page, slot, h, qkind, lane, sw);
      break;
    }
    case 4: {
      const kv::PageLayout L = kv::page_layout(g, 4);
      if (slot >= 0 && slot < L.tokens)
        kvq::quantize_row<4>(x, index, L, page, slot, h, qkind, lane, sw);
      break;
    }
    case 2: {
      const kv::PageLayout L = kv::page_layout(g, 2);
      if (slot >= 0 && slot < L.tokens)
        kvq::quantize_row<2>(x, index, L, page, slot, h, qkind, lane, sw);
      break;
    }
    default:
      break;  // not a bit-width: no pool write
  }
}

// ---- SiLU-gated activation ------------------------------------------------------------------

constexpr int kSiluThreads = 256;

// silu(g) * u as cpu::silu_mul: g / (1 + exp(-g)) * u, every step rounded separately.
__device__ __forceinline__ float silu_mul1(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// grid (rows, column chunks). kVec: n % 8 == 0, gate_up and bias 16-byte aligned, out 16-byte
// aligned; each thread does 8 columns (16-byte loads of gate and up, one 16-byte store).
// kInterleaved: gate_up's columns come in groups of 16, 8 gate then the same 8 up (GateUpLayout).
template <bool kVec, bool kInterleaved>
__global__ void __launch_bounds__(kSiluThreads)
    silu_mul_kernel(const uint16_t* gate_up, const float* bias, int32_t n, uint16_t* out) {
  pdl_trigger();  // the down projection after it may start streaming its weights
  const int64_t r = blockIdx.x;
  const uint16_t* gr = gate_up + r * 2 * n;
  uint16_t* o = out + r * n;
  const int i = blockIdx.y * kSiluThreads + threadIdx.x;
  if constexpr (kVec) {
    const int c = i * 8;
    if (c >= n) return;
    const uint16_t* gp = kInterleaved ? gr + 2 * c : gr + c;  // c % 8 == 0: one whole group
    const uint4 gw = *reinterpret_cast<const uint4*>(gp);
    const uint4 uw = *reinterpret_cast<const uint4*>(kInterleaved ? gp + 8 : gr + n + c);
    float g[8] = {bf16_lo(gw.x), bf16_hi(gw.x), bf16_lo(gw.y), bf16_hi(gw.y),
                  bf16_lo(gw.z), bf16_hi(gw.z), bf16_lo(gw.w), bf16_hi(gw.w)};
    float u[8] = {bf16_lo(uw.x), bf16_hi(uw.x), bf16_lo(uw.y), bf16_hi(uw.y),
                  bf16_lo(uw.z), bf16_hi(uw.z), bf16_lo(uw.w), bf16_hi(uw.w)};
    if (bias != nullptr) {
      const float4* bg = reinterpret_cast<const float4*>(bias + c);
      const float4* bu = reinterpret_cast<const float4*>(bias + n + c);
      const float4 g0 = bg[0], g1 = bg[1], u0 = bu[0], u1 = bu[1];
      const float gb[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
      const float ub[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        g[j] = __fadd_rn(g[j], gb[j]);
        u[j] = __fadd_rn(u[j], ub[j]);
      }
    }
    float y[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      y[j] = silu_mul1(g[j], u[j]);
    *reinterpret_cast<uint4*>(o + c) = make_uint4(pack_bf16x2(y[0], y[1]), pack_bf16x2(y[2], y[3]),
                                                  pack_bf16x2(y[4], y[5]), pack_bf16x2(y[6], y[7]));
  } else {
    if (i >= n) return;
    const int64_t gi = kInterleaved ? 16 * (i / 8) + i % 8 : i;
    const int64_t ui = kInterleaved ? gi + 8 : n + i;
    float g = bf16_bits_to_float(gr[gi]), u = bf16_bits_to_float(gr[ui]);
    if (bias != nullptr) {
      g = __fadd_rn(g, bias[i]);
      u = __fadd_rn(u, bias[n + i]);
    }
    o[i] = float_to_bf16_bits(silu_mul1(g, u));
  }
}

bool valid_pool(const KvPoolRef& pool) {  // as kv_ops.cu's: aligned rows and params
  const kv::PageGeometry& g = pool.geometry;
  return pool.base != nullptr && aligned(pool.base, 16) && g.num_kv_heads > 0 && g.head_dim > 0 &&
         g.tokens16 > 0 && pool.page_bytes >= kv::page_bytes(g) && pool.page_bytes % 16 == 0;
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace

cudaError_t launch_embedding(const uint16_t* table_bf16, int32_t vocab, const int32_t* ids,
                             int32_t rows, int32_t hidden, float* x, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || hidden <= 0 || vocab < 0 || table_bf16 == nullptr || ids == nullptr ||
      x == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (hidden % 8 == 0 && aligned(table_bf16, 16) && aligned(x, 16)) {
    embedding_kernel<true><<<rows, kEmbThreads, 0, stream>>>(table_bf16, vocab, ids, hidden, x);
  } else {
    embedding_kernel<false><<<rows, kEmbThreads, 0, stream>>>(table_bf16, vocab, ids, hidden, x);
  }
  return cudaGetLastError();
}

cudaError_t launch_add_rmsnorm(const AddRmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.dim <= 0 || p.x == nullptr || p.weight == nullptr || p.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool vec = rmsnorm_detail::add_rmsnorm_vec4(p);
  if (p.dim <= kWarpRowMaxDim) {
    const unsigned blocks = static_cast<unsigned>((p.rows + kNormWarpRows - 1) / kNormWarpRows);
    if (vec) {
      add_rmsnorm_kernel<4, true><<<blocks, kNormWarpRows * 32, 0, stream>>>(p);
    } else {
      add_rmsnorm_kernel<1, true><<<blocks, kNormWarpRows * 32, 0, stream>>>(p);
    }
  } else if (vec) {
    add_rmsnorm_kernel<4, false><<<p.rows, kNormThreads, 0, stream>>>(p);
  } else {
    add_rmsnorm_kernel<1, false><<<p.rows, kNormThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_rope_kv_write(const RopeKvWriteParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const int64_t width = int64_t{p.num_heads + 2 * p.num_kv_heads} * p.head_dim;
  if (p.rows < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.head_dim % 2 != 0 || p.head_dim > kvq::kMaxHeadDim || !valid_pool(p.pool) ||
      p.pool.geometry.head_dim != p.head_dim || p.pool.geometry.num_kv_heads != p.num_kv_heads ||
      p.qkv == nullptr || p.qkv_stride < width || p.positions == nullptr || p.inv_freq == nullptr ||
      p.q_out == nullptr || p.page_ids == nullptr || p.bits == nullptr || p.slots == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t tasks = p.num_heads + 2 * int64_t{p.num_kv_heads};
  const int64_t chunks = (tasks + kRopeWarps - 1) / kRopeWarps;
  if (chunks > kMaxGridY) return cudaErrorInvalidValue;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(p.rows), static_cast<unsigned>(chunks));
  cfg.blockDim = dim3(kRopeWarps * 32);
  cfg.stream = stream;
  cudaLaunchAttribute pdl_attr;
  request_pdl(cfg, pdl_attr, p.pdl);
  return cudaLaunchKernelEx(&cfg, rope_kv_write_kernel, p);
}

cudaError_t launch_silu_mul(const uint16_t* gate_up, const float* bias, int32_t rows, int32_t n,
                            uint16_t* out, cudaStream_t stream, GateUpLayout layout) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || n <= 0 || gate_up == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const bool inter = layout == GateUpLayout::kInterleaved8;
  if (inter && n % 8 != 0) return cudaErrorInvalidValue;
  const bool vec = n % 8 == 0 && aligned(gate_up, 16) && aligned(out, 16) &&
                   (bias == nullptr || aligned(bias, 16));
  const int64_t per_thread = vec ? 8 : 1;
  const int64_t chunks = (n / per_thread + kSiluThreads - 1) / kSiluThreads;
  if (chunks > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  const auto kernel = vec ? (inter ? silu_mul_kernel<true, true> : silu_mul_kernel<true, false>)
                          : (inter ? silu_mul_kernel<false, true> : silu_mul_kernel<false, false>);
  kernel<<<grid, kSiluThreads, 0, stream>>>(gate_up, bias, n, out);
  return cudaGetLastError();
}

}  // namespace pmkv::kernels
