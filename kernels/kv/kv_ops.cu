// KV pool byte work: quantized writes, window-flush requantization, in-place demotion. Every
// formula mirrors engine/kv/kv_codec.cpp operation for operation (IEEE division, round half to
// even, the same fp32 multiplies in the same order), so pages compare byte-equal with the CPU's.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/kv/kv_ops.h"
#include "kernels/kv/kv_quantize.cuh"

namespace pmkv::kernels {

namespace {

constexpr int kOpThreads = 256;

using kvq::qmax;

// kv::shrink_code: q' = round(q (2^c - 1) / (2^b - 1)), c = b / 2, in uint32 arithmetic.
__device__ __forceinline__ uint32_t shrink_code(uint32_t q, int from_bits) {
  const uint32_t c = static_cast<uint32_t>(from_bits / 2);
  const uint32_t mul = (1u << (2 * c)) - (1u << c) + 1u;
  const uint32_t add = (1u << (3 * c - 1)) - (1u << (2 * c - 1)) + (1u << (c - 1));
  return ((q * mul + add) >> (3 * c)) & ((1u << c) - 1u);
}

template <int kFrom, int kTo>
__device__ __forceinline__ uint32_t shrink_chain(uint32_t q) {
#pragma unroll
  for (int b = kFrom; b > kTo; b /= 2)
    q = shrink_code(q, b);
  return q;
}

template <int kFrom, int kTo>
__device__ __forceinline__ float shrink_scale_chain(float s) {
#pragma unroll
  for (int b = kFrom; b > kTo; b /= 2)
    s = __fmul_rn(s, static_cast<float>((1u << (b / 2)) + 1u));
  return s;
}

// Code i of a packed row (16-byte aligned; a code never straddles a 32-bit word).
template <int kBits>
__device__ __forceinline__ uint32_t code_at(const uint8_t* row, int i) {
  const uint32_t w = reinterpret_cast<const uint32_t*>(row)[(i * kBits) / 32];
  return (w >> ((i * kBits) % 32)) & qmax<kBits>();
}

// Output word w of a row re-coded from kFrom to kTo bits; codes past head_dim are padding (0).
template <int kFrom, int kTo>
__device__ __forceinline__ uint32_t recode_word(const uint8_t* src_row, int w, int head_dim) {
  constexpr int kPer = 32 / kTo;
  uint32_t out = 0;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int i = w * kPer + k;
    if (i < head_dim) out |= shrink_chain<kFrom, kTo>(code_at<kFrom>(src_row, i)) << (k * kTo);
  }
  return out;
}

// Runs f.template run<kFrom, kTo>() for the runtime pair (from, to), to <= from.
template <class F>
__device__ __forceinline__ void dispatch_bits_pair(int from, int to, F& f) {
  switch (from * 32 + to) {
    case 16 * 32 + 16:
      f.template run<16, 16>();
      break;
    case 16 * 32 + 8:
      f.template run<16, 8>();
      break;
    case 16 * 32 + 4:
      f.template run<16, 4>();
      break;
    case 16 * 32 + 2:
      f.template run<16, 2>();
      break;
    case 8 * 32 + 8:
      f.template run<8, 8>();
      break;
    case 8 * 32 + 4:
      f.template run<8, 4>();
      break;
    case 8 * 32 + 2:
      f.template run<8, 2>();
      break;
    case 4 * 32 + 4:
      f.template run<4, 4>();
      break;
    case 4 * 32 + 2:
      f.template run<4, 2>();
      break;
    case 2 * 32 + 2:
      f.template run<2, 2>();
      break;
    default:
      break;  // invalid op: left alone
  }
}

// ---- requant (window flush) -----------------------------------------------------------------

struct RequantBody {
  const KvPoolRef& pool;
  const KvRequantOp& op;

  template <int kFrom, int kTo>
  __device__ void run() {
    const kv::PageGeometry& g = pool.geometry;
    const kv::PageLayout ls = kv::page_layout(g, kFrom), ld = kv::page_layout(g, kTo);
    if (op.src == op.dst || op.count < 0 || op.src_slot < 0 || op.dst_slot < 0 ||
        op.src_slot + op.count > ls.tokens || op.dst_slot + op.count > ld.tokens) {
      return;
    }
    const uint8_t* src = static_cast<const uint8_t*>(pool.base) + int64_t{op.src} * pool.page_bytes;
    uint8_t* dst = static_cast<uint8_t*>(pool.base) + int64_t{op.dst} * pool.page_bytes;
    const int H = g.num_kv_heads, D = g.head_dim;
    const int words = static_cast<int>(ld.row / 4);
    const int64_t rows = int64_t{op.count} * H * 2;  // (token, head, K|V)
    for (int64_t idx = threadIdx.x; idx < rows * words; idx += blockDim.x) {
      const int w = static_cast<int>(idx % words);
      const int64_t r = idx / words;
      const int kind = static_cast<int>(r % 2), h = static_cast<int>((r / 2) % H);
      const int t = static_cast<int>(r / (2 * H));
      const uint8_t* s_row = src + ls.code_row(kind ? ls.v_codes : ls.k_codes, op.src_slot + t, h);
      uint8_t* d_row = dst + ld.code_row(kind ? ld.v_codes : ld.k_codes, op.dst_slot + t, h);
      reinterpret_cast<uint32_t*>(d_row)[w] = recode_word<kFrom, kTo>(s_row, w, D);
    }
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
      const int kind = static_cast<int>(r % 2), h = static_cast<int>((r / 2) % H);
      const int t = static_cast<int>(r / (2 * H));
      float scale, zero;
      kv::load_params(src + ls.param(kind ? ls.v_params : ls.k_params, op.src_slot + t, h), kFrom,
                      scale, zero);
      kv::store_params(dst + ld.param(kind ? ld.v_params : ld.k_params, op.dst_slot + t, h), kTo,
                       shrink_scale_chain<kFrom, kTo>(scale), zero);
    }
  }
};

// The ops [first, first + count): (0, num_ops) from the host, or read from `range` (device
// {first, count}) when it is set. CTA x runs ops x, x + gridDim.x, ...
struct OpRange {
  const int32_t* range;
  int32_t num_ops;
  __device__ int32_t first() const { return range ? range[0] : 0; }
  __device__ int32_t count() const { return range ? range[1] : num_ops; }
};

__global__ void __launch_bounds__(kOpThreads)
    requant_kernel(const KvPoolRef pool, const KvRequantOp* ops, const OpRange r) {
  const int32_t first = r.first(), count = r.count();
  for (int32_t i = blockIdx.x; i < count; i += gridDim.x) {
    const KvRequantOp op = ops[first + i];
    RequantBody body{pool, op};
    dispatch_bits_pair(op.src_bits, op.dst_bits, body);
  }
}

// ---- demote (in place) ----------------------------------------------------------------------

// 4-byte aligned bounds (the params of 4- and 2-bit pages are 4 bytes a row).
__device__ void zero_range(uint8_t* p, int64_t begin, int64_t end) {
  for (int64_t i = begin / 4 + threadIdx.x; i < end / 4; i += blockDim.x) {
    reinterpret_cast<uint32_t*>(p)[i] = 0u;
  }
}

struct DemoteBody {
  const KvPoolRef& pool;
  const KvDemoteOp& op;
  uint8_t* staged;  // shared memory image of src[0]'s used bytes, at their page offsets

  template <int kFrom, int kTo>
  __device__ void run() {
    const kv::PageGeometry& g = pool.geometry;
    const kv::PageLayout ls = kv::page_layout(g, kFrom), ld = kv::page_layout(g, kTo);
    const int n = op.num_src;
    if (n < 1 || n > KvDemoteOp::kMaxSources || n > kFrom / kTo) return;
    int32_t start[KvDemoteOp::kMaxSources + 1];
    start[0] = 0;
    for (int i = 0; i < n; ++i) {
      if (op.tokens[i] < 0 || op.tokens[i] > ls.tokens) return;
      start[i + 1] = start[i] + op.tokens[i];
    }
    const int32_t total = start[n];
    if (total > ld.tokens) return;
    uint8_t* base = static_cast<uint8_t*>(pool.base);
    uint8_t* dst = base + int64_t{op.src[0]} * pool.page_bytes;
    const int H = g.num_kv_heads, D = g.head_dim;

    // 1. Stage src[0] (it is also the destination): its whole used area, codes and params of every
    //    head (pages are head-major, so the rows read are spread over the page).
    const int64_t used = kv::page_used_bytes(g, kFrom);  // a multiple of 8
    for (int64_t i = threadIdx.x; i < used / 8; i += blockDim.x) {
      reinterpret_cast<uint2*>(staged)[i] = reinterpret_cast<const uint2*>(dst)[i];
    }
    __syncthreads();

    // 2. Code rows of slots [0, total), params, then zeros everywhere else (apply_demote memsets
    //    the page before writing).
    auto source = [&](int32_t slot, int32_t& t) -> const uint8_t* {
      int i = 0;
      while (slot >= start[i + 1])
        ++i;
      t = slot - start[i];
      return i == 0 ? staged : base + int64_t{op.src[i]} * pool.page_bytes;
    };
    const int words = static_cast<int>(ld.row / 4);
    const int64_t rows = int64_t{total} * H * 2;
    for (int64_t idx = threadIdx.x; idx < rows * words; idx += blockDim.x) {
      const int w = static_cast<int>(idx % words);
      const int64_t r = idx / words;
      const int kind = static_cast<int>(r % 2), h = static_cast<int>((r / 2) % H);
      const int32_t slot = static_cast<int32_t>(r / (2 * H));
      int32_t t;
      const uint8_t* src = source(slot, t);
      const uint8_t* s_row = src + ls.code_row(kind ? ls.v_codes : ls.k_codes, t, h);
      uint8_t* d_row = dst + ld.code_row(kind ? ld.v_codes : ld.k_codes, slot, h);
      reinterpret_cast<uint32_t*>(d_row)[w] = recode_word<kFrom, kTo>(s_row, w, D);
    }
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
      const int kind = static_cast<int>(r % 2), h = static_cast<int>((r / 2) % H);
      const int32_t slot = static_cast<int32_t>(r / (2 * H));
      int32_t t;
      const uint8_t* src = source(slot, t);
      float scale, zero;
      kv::load_params(src + ls.param(kind ? ls.v_params : ls.k_params, t, h), kFrom, scale, zero);
      kv::store_params(dst + ld.param(kind ? ld.v_params : ld.k_params, slot, h), kTo,
                       shrink_scale_chain<kFrom, kTo>(scale), zero);
    }
    // Head-major: each head's rows past `total` up to the page's capacity.
    for (int h = 0; h < H; ++h) {
      zero_range(dst, ld.code_row(ld.k_codes, total, h), ld.code_row(ld.k_codes, ld.tokens, h));
      zero_range(dst, ld.code_row(ld.v_codes, total, h), ld.code_row(ld.v_codes, ld.tokens, h));
      zero_range(dst, ld.param(ld.k_params, total, h), ld.param(ld.k_params, ld.tokens, h));
      zero_range(dst, ld.param(ld.v_params, total, h), ld.param(ld.v_params, ld.tokens, h));
    }
    zero_range(dst, ld.v_params + int64_t{ld.tokens} * H * ld.par, pool.page_bytes);
  }
};

__global__ void __launch_bounds__(kOpThreads)
    demote_kernel(const KvPoolRef pool, const KvDemoteOp* ops, const OpRange r) {
  extern __shared__ __align__(16) uint8_t staged[];
  const int32_t first = r.first(), count = r.count();
  for (int32_t i = blockIdx.x; i < count; i += gridDim.x) {
    if (i != static_cast<int32_t>(blockIdx.x)) __syncthreads();  // `staged` is reused
    const KvDemoteOp op = ops[first + i];
    DemoteBody body{pool, op, staged};
    dispatch_bits_pair(op.from_bits, op.to_bits, body);
  }
}

// ---- write (quantize new rows) --------------------------------------------------------------

constexpr int kWriteWarps = 4;
constexpr int kMaxHeadDim = kvq::kMaxHeadDim;

template <int kBits>
__device__ void write_row(const KvWriteParams& p, const float (&x)[kMaxHeadDim / 32], int row,
                          int h, int kind, int lane, uint32_t* sw) {
  const kv::PageGeometry& g = p.pool.geometry;
  const int D = g.head_dim;
  const kv::PageLayout L = kv::page_layout(g, kBits);
  const int slot = p.slots[row];
  if (slot < 0 || slot >= L.tokens) return;
  uint8_t* page = static_cast<uint8_t*>(p.pool.base) + int64_t{p.page_ids[row]} * p.pool.page_bytes;
  // Lane-strided row: x[k] is element lane + 32 k (increasing with k, as quantize_row needs).
  const auto index = [&](int k) {
    const int i = lane + 32 * k;
    return i < D ? i : -1;
  };
  kvq::quantize_row<kBits>(x, index, L, page, slot, h, kind, lane, sw);
}

__global__ void __launch_bounds__(kWriteWarps * 32) kv_write_kernel(const KvWriteParams p) {
  __shared__ uint32_t row_words[kWriteWarps][kvq::kRowWords];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int H = p.pool.geometry.num_kv_heads, D = p.pool.geometry.head_dim;
  const int64_t task = int64_t{blockIdx.x} * kWriteWarps + warp;  // (row, head, K|V)
  if (task >= int64_t{p.num_rows} * H * 2) return;  // warp-uniform; no block barrier below
  const int row = static_cast<int>(task / (2 * H));
  const int h = static_cast<int>((task / 2) % H), kind = static_cast<int>(task % 2);
  const int64_t off = row * (kind ? p.v_stride : p.k_stride) + int64_t{h} * D;
  float x[kMaxHeadDim / 32];
#pragma unroll
  for (int k = 0; k < kMaxHeadDim / 32; ++k) {
    const int i = lane + 32 * k;
    x[k] = 0.0f;
    if (i < D) {
      if (p.dtype == DType::kF32) {
        x[k] = static_cast<const float*>(kind ? p.v : p.k)[off + i];
      } else {
        x[k] = __bfloat162float(static_cast<const __nv_bfloat16*>(kind ? p.v : p.k)[off + i]);
      }
    }
  }
  uint32_t* sw = row_words[warp];
  switch (p.bits[row]) {  // warp-uniform
    case 16:
      write_row<16>(p, x, row, h, kind, lane, sw);
      break;
    case 8:
      write_row<8>(p, x, row, h, kind, lane, sw);
      break;
    case 4:
      write_row<4>(p, x, row, h, kind, lane, sw);
      break;
    case 2:
      write_row<2>(p, x, row, h, kind, lane, sw);
      break;
    default:
      break;
  }
}

int64_t max_used_bytes(const kv::PageGeometry& g) {
  int64_t m = 0;
  for (int b = 16; b >= 2; b /= 2)
    m = kv::page_used_bytes(g, b) > m ? kv::page_used_bytes(g, b) : m;
  return m;
}

bool valid_pool(const KvPoolRef& pool) {
  const kv::PageGeometry& g = pool.geometry;
  return pool.base != nullptr && g.num_kv_heads > 0 && g.head_dim > 0 && g.tokens16 > 0 &&
         pool.page_bytes >= kv::page_bytes(g) && pool.page_bytes % 16 == 0;
}

}  // namespace

namespace {

cudaError_t requant(const KvPoolRef& pool, const KvRequantOp* ops, OpRange r, int32_t ctas,
                    cudaStream_t stream) {
  if (ctas == 0) return cudaSuccess;
  if (!valid_pool(pool) || ctas < 0) return cudaErrorInvalidValue;
  requant_kernel<<<ctas, kOpThreads, 0, stream>>>(pool, ops, r);
  return cudaGetLastError();
}

cudaError_t demote(const KvPoolRef& pool, const KvDemoteOp* ops, OpRange r, int32_t ctas,
                   cudaStream_t stream) {
  if (ctas == 0) return cudaSuccess;
  if (!valid_pool(pool) || ctas < 0) return cudaErrorInvalidValue;
  const int64_t smem = max_used_bytes(pool.geometry);
  int device = 0, limit = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  if (smem > limit) return cudaErrorInvalidValue;
  e = cudaFuncSetAttribute(demote_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  demote_kernel<<<ctas, kOpThreads, smem, stream>>>(pool, ops, r);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_requant(const KvPoolRef& pool, const KvRequantOp* ops, int32_t num_ops,
                           cudaStream_t stream) {
  if (num_ops < 0) return cudaErrorInvalidValue;
  return requant(pool, ops, {nullptr, num_ops}, num_ops, stream);
}

cudaError_t launch_demote(const KvPoolRef& pool, const KvDemoteOp* ops, int32_t num_ops,
                          cudaStream_t stream) {
  if (num_ops < 0) return cudaErrorInvalidValue;
  return demote(pool, ops, {nullptr, num_ops}, num_ops, stream);
}

cudaError_t launch_requant_ranged(const KvPoolRef& pool, const KvRequantOp* ops,
                                  const int32_t* range, int32_t ctas, cudaStream_t stream) {
  if (range == nullptr) return cudaErrorInvalidValue;
  return requant(pool, ops, {range, 0}, ctas, stream);
}

cudaError_t launch_demote_ranged(const KvPoolRef& pool, const KvDemoteOp* ops, const int32_t* range,
                                 int32_t ctas, cudaStream_t stream) {
  if (range == nullptr) return cudaErrorInvalidValue;
  return demote(pool, ops, {range, 0}, ctas, stream);
}

cudaError_t launch_kv_write(const KvWriteParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (!valid_pool(p.pool) || p.num_rows < 0 || p.pool.geometry.head_dim > kMaxHeadDim) {
    return cudaErrorInvalidValue;
  }
  const int64_t tasks = int64_t{p.num_rows} * p.pool.geometry.num_kv_heads * 2;
  const int64_t blocks = (tasks + kWriteWarps - 1) / kWriteWarps;
  kv_write_kernel<<<static_cast<unsigned>(blocks), kWriteWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pmkv::kernels
