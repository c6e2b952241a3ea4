// launch_prefill: the dequantization of the cached tokens into the workspace and the causal
// flash-attention kernel (see prefill.h for the contract).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention/decode_kernel.cuh"  // PTX wrappers: cp.async, mma.sync, ex2, packing
#include "kernels/attention/prefill.h"
#include "kernels/kv_page_layout.h"

namespace pmkv::kernels {

namespace prefill_detail {

using decode_detail::bf16x2_bits;
using decode_detail::cp_async16;
using decode_detail::cp_async_commit;
using decode_detail::cp_async_wait;
using decode_detail::ex2;
using decode_detail::mma_bf16;
using decode_detail::pack_bf16;

// ---- Kernel 1: every key of the step -> bf16 workspace -----------------------------------------
// Workspace: K at [kvh][total_keys][head_dim] with total_keys = total_cached + num_rows, then V
// likewise. The keys of sequence s (its cached tokens, then its step rows) are the contiguous rows
// key0(s) = cached_starts[s] + seq_starts[s] .. key0(s) + seq_cached[s] + rows(s) - 1 of a KV
// head's block: cached token t at key0(s) + t, step row r (a global row index) at
// cached_starts[s + 1] + r.
//
// The grid's first blocks dequantize the cached tokens, the rest round the step's fp32 K/V (one
// CTA per (kCvRows rows, KV head)).
//
// Dequantization: one CTA per (chunk of kDqChunk consecutive cached tokens of the whole batch, KV
// head). A chunk can span several sequences; per sequence it locates its tokens in the page table
// with a block-wide scan of page_tokens (256 pages per round, so a long table costs a few rounds,
// not a serial walk), then one warp per (token, K|V) dequantizes a row exactly as
// kv::dequantize_group does (float(code) * scale - zero, no contraction) and rounds it to bf16.
inline constexpr int kDqThreads = 256;
inline constexpr int kDqWarps = kDqThreads / 32;
inline constexpr int kDqChunk = 256;
inline constexpr int kCvRows = 32;  // step rows per conversion CTA

struct DequantParams {
  const uint8_t* pool;
  int64_t page_bytes;
  kv::PageGeometry geom;
  int32_t num_seqs;
  int32_t total_cached;
  const int32_t* cached_starts;
  const int32_t* page_starts;
  const int32_t* page_ids;
  const int32_t* page_bits;
  const int32_t* page_tokens;
  __nv_bfloat16* ws_k;
  __nv_bfloat16* ws_v;
  // The step's rows.
  int32_t num_rows;
  int32_t total_keys;  // total_cached + num_rows
  int32_t dq_blocks;   // blocks of the dequantization part of the grid
  const int32_t* seq_starts;
  const float* k;
  const float* v;
  int64_t kv_stride;
};

// Inclusive prefix sum over the CTA; `total` gets the sum of all. Contains two barriers (s_warp is
// reused by the next call only after the second).
__device__ __forceinline__ int block_scan(int x, int* s_warp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kDqWarps; ++w) {
    const int t = s_warp[w];
    before += w < warp ? t : 0;
    total += t;
  }
  __syncthreads();
  return x + before;
}

// Code i of a packed row (kv_page_layout.h: little-endian, least significant bits first).
__device__ __forceinline__ uint32_t unpack_code(const uint8_t* row, int bits, int i) {
  switch (bits) {
    case 16:
      return reinterpret_cast<const uint16_t*>(row)[i];
    case 8:
      return row[i];
    case 4:
      return (row[i >> 1] >> ((i & 1) * 4)) & 0xFu;
    default:
      return (row[i >> 2] >> ((i & 3) * 2)) & 0x3u;
  }
}

// Dequantizes tokens [t0, t1) of sequence s (sequence-local indices) for KV head kvh into the
// workspace rows starting at `ws_row0` (the sequence's first cached row of this head).
template <int kD>
__device__ __forceinline__ void dequant_range(const DequantParams& p, int s, int kvh, int t0,
                                              int t1, int64_t ws_row0, int* s_start, int* s_warp) {
  constexpr int kPer = kD / 32;  // codes per lane
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pe = p.page_starts[s + 1];
  int base = 0;  // tokens of the sequence in the pages before this round's
  for (int pb = p.page_starts[s]; pb < pe && base < t1; pb += kDqThreads) {
    const int pg = pb + static_cast<int>(threadIdx.x);
    const int nt = pg < pe ? p.page_tokens[pg] : 0;
    int total;
    const int incl = block_scan(nt, s_warp, total);
    // s_start is non-decreasing; page k of the round holds tokens [s_start[k], s_start[k] + nt).
    s_start[threadIdx.x] = base + incl - nt;
    __syncthreads();
    const int a = max(t0, base), b = min(t1, base + total);
    for (int item = warp; item < 2 * (b - a); item += kDqWarps) {
      const int t = a + (item >> 1), kind = item & 1;
      // The last page k with s_start[k] <= t: it holds t (a later page starting <= t would be
      // found instead of an empty one, and t < base + total excludes the padding slots).
      int lo = 0, hi = kDqThreads - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_start[mid] <= t) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      const int page = pb + lo, slot = t - s_start[lo];
      const int bits = p.page_bits[page];
      const kv::PageLayout L = kv::page_layout(p.geom, bits);
      const uint8_t* base_ptr = p.pool + int64_t{p.page_ids[page]} * p.page_bytes;
      const uint8_t* row = base_ptr + L.code_row(kind ? L.v_codes : L.k_codes, slot, kvh);
      float2 sz;
      kv::load_params(base_ptr + L.param(kind ? L.v_params : L.k_params, slot, kvh), bits, sz.x,
                      sz.y);
      uint32_t packed[kPer / 2];
#pragma unroll
      for (int c = 0; c < kPer; c += 2) {
        const int i = lane * kPer + c;
        const float x0 =
            __fsub_rn(__fmul_rn(static_cast<float>(unpack_code(row, bits, i)), sz.x), sz.y);
        const float x1 =
            __fsub_rn(__fmul_rn(static_cast<float>(unpack_code(row, bits, i + 1)), sz.x), sz.y);
        packed[c / 2] = pack_bf16(x0, x1);
      }
      __nv_bfloat16* dst = (kind ? p.ws_v : p.ws_k) + (ws_row0 + t) * kD + lane * kPer;
      if constexpr (kPer == 4) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
      } else {
        *reinterpret_cast<uint32_t*>(dst) = packed[0];
      }
    }
    base += total;
    __syncthreads();  // s_start is rewritten by the next round
  }
}

// Rounds step rows r0 .. r0 + kCvRows - 1 (those < num_rows) of KV head kvh to bf16 into their
// workspace rows; consecutive threads take consecutive 16-byte chunks of a row (coalesced).
template <int kD>
__device__ __forceinline__ void convert_rows(const DequantParams& p, int kvh, int r0,
                                             int64_t* s_dst) {
  constexpr int kChunks = kD / 8;
  const int nr = min(kCvRows, p.num_rows - r0);
  if (static_cast<int>(threadIdx.x) < nr) {
    const int r = r0 + static_cast<int>(threadIdx.x);
    // The sequence of row r: the largest s with seq_starts[s] <= r (empty sequences share their
    // start with the next one, so this is the non-empty sequence holding r).
    int lo = 0, hi = p.num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (p.seq_starts[mid] <= r) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    s_dst[threadIdx.x] = (int64_t{kvh} * p.total_keys + p.cached_starts[lo + 1] + r) * kD;
  }
  __syncthreads();
#pragma unroll 1
  for (int o = static_cast<int>(threadIdx.x); o < nr * kChunks * 2; o += kDqThreads) {
    const int c = o % kChunks, rest = o / kChunks, kind = rest & 1, rl = rest >> 1;
    const float* src =
        (kind ? p.v : p.k) + int64_t{r0 + rl} * p.kv_stride + int64_t{kvh} * kD + c * 8;
    const float4 x0 = __ldg(reinterpret_cast<const float4*>(src));
    const float4 x1 = __ldg(reinterpret_cast<const float4*>(src + 4));
    *reinterpret_cast<uint4*>((kind ? p.ws_v : p.ws_k) + s_dst[rl] + c * 8) = make_uint4(
        pack_bf16(x0.x, x0.y), pack_bf16(x0.z, x0.w), pack_bf16(x1.x, x1.y), pack_bf16(x1.z, x1.w));
  }
}

template <int kD>
__global__ void __launch_bounds__(kDqThreads) prefill_keys_kernel(const DequantParams p) {
  __shared__ __align__(8) int s_start[kDqThreads];
  __shared__ int s_warp[kDqWarps];
  const int kvh = blockIdx.y;
  if (static_cast<int>(blockIdx.x) >= p.dq_blocks) {
    static_assert(kCvRows * sizeof(int64_t) <= sizeof(s_start), "s_start holds the row targets");
    convert_rows<kD>(p, kvh, (static_cast<int>(blockIdx.x) - p.dq_blocks) * kCvRows,
                     reinterpret_cast<int64_t*>(s_start));
    return;
  }
  const int g0 = blockIdx.x * kDqChunk;
  const int g1 = min(g0 + kDqChunk, p.total_cached);
  // The sequence holding cached token g0: the largest s < num_seqs with cached_starts[s] <= g0
  // (it is non-empty: cached_starts[s + 1] > g0 by maximality, or s + 1 == num_seqs).
  int lo = 0, hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.cached_starts[mid] <= g0) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  int s = lo;
  // Uniform over the CTA (every value comes from global memory), so the barriers inside are safe.
  for (int g = g0; g < g1;) {
    while (p.cached_starts[s + 1] <= g)  // skip sequences without cached tokens
      ++s;
    const int cs = p.cached_starts[s];
    const int t1 = min(g1, p.cached_starts[s + 1]) - cs;
    dequant_range<kD>(p, s, kvh, g - cs, t1, int64_t{kvh} * p.total_keys + cs + p.seq_starts[s],
                      s_start, s_warp);
    g = cs + t1;
  }
}

// ---- Kernel 2: causal flash attention ---------------------------------------------------------
// CTA = 4 warps = 64 packed rows R0 .. R0 + 63 of one (sequence, KV head); packed row R is
// (step row R / G, query head kvh * G + R % G). Warp w owns rows R0 + 16 w .. + 15 as the M rows of
// its mma tiles: lane (gid, tig) holds rows gid ("a") and gid + 8 ("b").
// Per 64-key tile, double-buffered in shared memory (bf16, [64 keys][kD], 16-byte chunks
// XOR-swizzled by key & 7 so that ldmatrix reads are conflict free):
//   S = Q K^T       A = Q (registers, bf16), B = K via ldmatrix (k: dims, n: keys)
//   online softmax in the log2 domain on the S accumulators (masks only on boundary tiles)
//   O += P V        A = P (the S accumulator layout of two n-tiles is the A layout of one k-step),
//                   B = V via ldmatrix.trans (k: keys, n: dims)
// Keys j < cached + n are the sequence's workspace rows (cp.async, cached tokens then the step's
// rows); keys >= cached + n are zeros (always masked: j > every row's token; zeros keep 0 * V
// finite).
// The CTA's packed-row tile and KV head come from blockIdx.x (KV head fastest, heaviest tiles of
// a causal sequence first), the sequence from blockIdx.z.
inline constexpr int kWarps = 4;
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kRows = kPrefillRowsPerCta;
inline constexpr int kKeys = kPrefillKeysPerTile;
static_assert(kRows == kWarps * 16, "one 16-row mma tile per warp");

struct AttnParams {
  const __nv_bfloat16* ws_k;  // [num_kv_heads][total_keys][kD]
  const __nv_bfloat16* ws_v;
  int32_t total_keys;
  int32_t num_kv_heads;
  int32_t row_tiles;
  int32_t group;
  int32_t sliding_window;
  float scale_log2;  // softmax scale * log2(e)
  const int32_t* seq_starts;
  const int32_t* seq_cached;
  const int32_t* cached_starts;
  const float* q;
  int64_t q_stride;
  __nv_bfloat16* out;
  int64_t out_stride;  // num_heads * kD
};

template <int kD>
struct Smem {
  static constexpr int kRowBytes = kD * 2;
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per key row
  static constexpr int kTileBytes = kKeys * kRowBytes;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K tile, then V tile
  static constexpr int kBytes = 2 * kStageBytes;      // two stages
  static_assert(kChunks >= 8, "the swizzle needs 8 chunks per row");
};

// Byte offset of 16-byte chunk c of key row r in a tile.
template <int kD>
__device__ __forceinline__ int swz(int r, int c) {
  return r * Smem<kD>::kRowBytes + ((c ^ (r & 7)) << 4);
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// Per-CTA facts of its sequence.
struct SeqInfo {
  int row0;     // first step row of the sequence
  int n;        // step rows of the sequence
  int cached;   // cached tokens
  int keys;     // cached + n: keys 0 .. keys - 1 are in the workspace
  int64_t ws0;  // workspace row of key 0 of this (sequence, KV head)
};

// Stages key tile kb (keys kb * 64 ..) of K and V. Each thread handles kKeys * kChunks / kThreads
// chunks of each; consecutive threads take consecutive chunks of a row (coalesced reads).
template <int kD>
__device__ __forceinline__ void load_tile(uint8_t* stage, const AttnParams& p, const SeqInfo& si,
                                          int kb) {
  using S = Smem<kD>;
  constexpr int kOps = kKeys * S::kChunks;
  static_assert(kOps % kThreads == 0, "whole rounds of chunks");
#pragma unroll
  for (int i = 0; i < kOps / kThreads; ++i) {
    const int o = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = o / S::kChunks, c = o % S::kChunks;
    const int j = kb * kKeys + r;
    uint8_t* dk = stage + swz<kD>(r, c);
    uint8_t* dv = dk + S::kTileBytes;
    if (j < si.keys) {
      const int64_t src = (si.ws0 + j) * kD + c * 8;
      cp_async16(dk, p.ws_k + src);
      cp_async16(dv, p.ws_v + src);
    } else {
      *reinterpret_cast<uint4*>(dk) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(dv) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Two consecutive fp32 of a q row as bf16x2 (0 for a padding row).
__device__ __forceinline__ uint32_t q_pair(const float* row, bool valid, int d) {
  if (!valid) return 0u;
  const float2 x = __ldg(reinterpret_cast<const float2*>(row + d));
  return pack_bf16(x.x, x.y);
}

template <int kD>
__global__ void __launch_bounds__(kThreads, 2) prefill_attn_kernel(const AttnParams p) {
  using S = Smem<kD>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int seq = blockIdx.z, G = p.group;
  const int kvh = static_cast<int>(blockIdx.x) % p.num_kv_heads;
  SeqInfo si;
  si.row0 = p.seq_starts[seq];
  si.n = p.seq_starts[seq + 1] - si.row0;
  // Row tiles in reverse: the late (longest) tiles of a causal sequence start first.
  const int R0 = (p.row_tiles - 1 - static_cast<int>(blockIdx.x) / p.num_kv_heads) * kRows;
  const int nrows = si.n * G;
  if (R0 >= nrows) return;
  si.cached = p.seq_cached[seq];
  si.keys = si.cached + si.n;
  si.ws0 = int64_t{kvh} * p.total_keys + p.cached_starts[seq] + si.row0;
  const int W = p.sliding_window;
  // Tokens of the CTA's first and last valid rows; the keys any row sees lie in
  // [t_lo - W + 1 (window) or 0, t_hi].
  const int t_lo = si.cached + R0 / G;
  const int t_hi = si.cached + min(R0 + kRows - 1, nrows - 1) / G;
  const int kb_lo = (W > 0 ? max(0, t_lo - W + 1) : 0) / kKeys;
  const int kb_hi = t_hi / kKeys;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int ra = R0 + warp * 16 + gid, rb = ra + 8;
  const bool va = ra < nrows, vb = rb < nrows;
  // Padding rows take the last row's token: finite, never written.
  const int ia = min(ra / G, si.n - 1), ib = min(rb / G, si.n - 1);
  const int ha = kvh * G + ra % G, hb = kvh * G + rb % G;
  const int ta = si.cached + ia, tb = si.cached + ib;

  // Q as A fragments: [kt][0] row a dims 16kt + 2tig (+1), [1] row b, [2]/[3] the same + 8.
  uint32_t qf[kD / 16][4];
  {
    const float* qa = p.q + int64_t{si.row0 + ia} * p.q_stride + int64_t{ha} * kD + 2 * tig;
    const float* qb = p.q + int64_t{si.row0 + ib} * p.q_stride + int64_t{hb} * kD + 2 * tig;
#pragma unroll
    for (int kt = 0; kt < kD / 16; ++kt) {
      qf[kt][0] = q_pair(qa, va, 16 * kt);
      qf[kt][1] = q_pair(qb, vb, 16 * kt);
      qf[kt][2] = q_pair(qa, va, 16 * kt + 8);
      qf[kt][3] = q_pair(qb, vb, 16 * kt + 8);
    }
  }
  // O accumulators: n-tile dt holds dims 8 dt + 2 tig (+1) of row a ([0], [1]) and row b.
  float o[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
    o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  // Running max of the raw scores q.k (-inf until a visible key) and this lane's part of the row
  // sums (its 2 columns of every n-tile; all 4 lanes of a row scale by the same alpha).
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

  const int ntiles = kb_hi - kb_lo + 1;
  load_tile<kD>(smem, p, si, kb_lo);
  cp_async_commit();
  for (int it = 0; it < ntiles; ++it) {
    const int kb = kb_lo + it;
    // Stage (it + 1) & 1 was last read in iteration it - 1, which ended with a barrier.
    if (it + 1 < ntiles) load_tile<kD>(smem + ((it + 1) & 1) * S::kStageBytes, p, si, kb + 1);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile it have landed
    __syncthreads();     // ... and everyone's (cp.async and the zero stores)
    const uint8_t* sk = smem + (it & 1) * S::kStageBytes;
    const uint8_t* sv = sk + S::kTileBytes;

    // ---- S = Q K^T: n-tile nt = keys 8 nt .. 8 nt + 7. ldmatrix x4: matrices 0, 1 are the dims
    // 16 kt .. + 15 of k-step kt = 2 kt2 (b0, b1), matrices 2, 3 those of kt + 1.
    float sacc[kKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) {
      sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.0f;
#pragma unroll
      for (int kt2 = 0; kt2 < kD / 32; ++kt2) {
        uint32_t b[4];
        ldsm_x4(b, sk + swz<kD>(8 * nt + (lane & 7), 4 * kt2 + (lane >> 3)));
        mma_bf16(sacc[nt], qf[2 * kt2], b[0], b[1]);
        mma_bf16(sacc[nt], qf[2 * kt2 + 1], b[2], b[3]);
      }
    }

    // ---- scores, masks, online softmax. Element e of n-tile nt is key j0 + 8 nt + 2 tig + (e & 1)
    // of row a (e < 2) or b. A tile needs masks only if some key lies after the CTA's first token
    // or (window) before its last token's window start; elsewhere every key is visible to every
    // row.
    const int j0 = kb * kKeys;
    const bool need_mask = (j0 + kKeys - 1 > t_lo) || (W > 0 && j0 <= t_hi - W);
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sacc[nt][e];
        if (need_mask) {
          const int j = j0 + 8 * nt + 2 * tig + (e & 1);
          const int t = e < 2 ? ta : tb;
          if (j > t || (W > 0 && t - j >= W)) x = -INFINITY;
        }
        sacc[nt][e] = x;
        if (e < 2) {
          mx_a = fmaxf(mx_a, x);
        } else {
          mx_b = fmaxf(mx_b, x);
        }
      }
    }
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    // The weights are 2^(s * scale_log2 - mu) with mu the running max in the log2 domain (the scale
    // is positive, so it is the scaled max). A row without a visible key so far keeps max -inf;
    // subtracting 0 instead keeps p = 0 (not NaN) and alpha = 0 (its sums are 0 anyway). The
    // unfused products make alpha exactly 1 while the max stays.
    const float sl = p.scale_log2;
    const float mu_a = mn_a == -INFINITY ? 0.0f : __fmul_rn(mn_a, sl);
    const float mu_b = mn_b == -INFINITY ? 0.0f : __fmul_rn(mn_b, sl);
    const float alpha_a = ex2(__fmul_rn(m_a, sl) - mu_a), alpha_b = ex2(__fmul_rn(m_b, sl) - mu_b);
    m_a = mn_a;
    m_b = mn_b;

    // P as bf16 A fragments of k-step kk (keys 16 kk .. + 15): n-tiles 2 kk and 2 kk + 1. The row
    // sums add the rounded weights, so the output is an exact convex combination of the bf16 P.
    uint32_t pa[kKeys / 16][4];
    float ps_a = 0.0f, ps_b = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float* sc = sacc[2 * kk + h];
        const __nv_bfloat162 pa2 =
            __floats2bfloat162_rn(ex2(fmaf(sc[0], sl, -mu_a)), ex2(fmaf(sc[1], sl, -mu_a)));
        const __nv_bfloat162 pb2 =
            __floats2bfloat162_rn(ex2(fmaf(sc[2], sl, -mu_b)), ex2(fmaf(sc[3], sl, -mu_b)));
        pa[kk][2 * h] = bf16x2_bits(pa2);
        pa[kk][2 * h + 1] = bf16x2_bits(pb2);
        const float2 fa = __bfloat1622float2(pa2), fb = __bfloat1622float2(pb2);
        ps_a += fa.x + fa.y;
        ps_b += fb.x + fb.y;
      }
    }
    l_a = fmaf(l_a, alpha_a, ps_a);
    l_b = fmaf(l_b, alpha_b, ps_b);
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      o[dt][0] *= alpha_a;
      o[dt][1] *= alpha_a;
      o[dt][2] *= alpha_b;
      o[dt][3] *= alpha_b;
    }

    // ---- O += P V. ldmatrix.trans x4: matrix m covers keys 16 kk + 8 (m & 1) .. + 7 and dims
    // 8 (2 dt2 + (m >> 1)) .. + 7, giving b0, b1 of n-tile 2 dt2 and b0, b1 of n-tile 2 dt2 + 1.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const int mi = lane >> 3;
      const int r = 16 * kk + 8 * (mi & 1) + (lane & 7);
#pragma unroll
      for (int dt2 = 0; dt2 < kD / 16; ++dt2) {
        uint32_t b[4];
        ldsm_x4_trans(b, sv + swz<kD>(r, 2 * dt2 + (mi >> 1)));
        mma_bf16(o[2 * dt2], pa[kk], b[0], b[1]);
        mma_bf16(o[2 * dt2 + 1], pa[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration's load
  }
  cp_async_wait<0>();  // only empty groups can be pending here

  // ---- normalize and write: lane holds dims 8 dt + 2 tig (+1) of rows a and b.
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  if (va) {
    __nv_bfloat16* dst = p.out + int64_t{si.row0 + ia} * p.out_stride + int64_t{ha} * kD + 2 * tig;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const float x = l_a > 0.0f ? o[dt][0] / l_a : 0.0f;
      const float y = l_a > 0.0f ? o[dt][1] / l_a : 0.0f;
      *reinterpret_cast<uint32_t*>(dst + 8 * dt) = pack_bf16(x, y);
    }
  }
  if (vb) {
    __nv_bfloat16* dst = p.out + int64_t{si.row0 + ib} * p.out_stride + int64_t{hb} * kD + 2 * tig;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const float x = l_b > 0.0f ? o[dt][2] / l_b : 0.0f;
      const float y = l_b > 0.0f ? o[dt][3] / l_b : 0.0f;
      *reinterpret_cast<uint32_t*>(dst + 8 * dt) = pack_bf16(x, y);
    }
  }
}

template <int kD>
cudaError_t launch_d(const PrefillParams& P, cudaStream_t stream) {
  const int32_t total_keys = P.total_cached + P.num_rows;  // checked to fit by the caller
  const int64_t kv_elems = int64_t{P.num_kv_heads} * total_keys * kD;
  __nv_bfloat16* ws_k = static_cast<__nv_bfloat16*>(P.workspace);
  __nv_bfloat16* ws_v = ws_k + kv_elems;
  const int group = P.num_heads / P.num_kv_heads;
  {
    DequantParams dp;
    dp.pool = static_cast<const uint8_t*>(P.pool);
    dp.page_bytes = P.page_bytes;
    dp.geom = kv::PageGeometry{P.num_kv_heads, kD, P.tokens16};
    dp.num_seqs = P.num_seqs;
    dp.total_cached = P.total_cached;
    dp.cached_starts = P.cached_starts;
    dp.page_starts = P.page_starts;
    dp.page_ids = P.page_ids;
    dp.page_bits = P.page_bits;
    dp.page_tokens = P.page_tokens;
    dp.ws_k = ws_k;
    dp.ws_v = ws_v;
    dp.num_rows = P.num_rows;
    dp.total_keys = total_keys;
    dp.dq_blocks = (P.total_cached + kDqChunk - 1) / kDqChunk;
    dp.seq_starts = P.seq_starts;
    dp.k = P.k;
    dp.v = P.v;
    dp.kv_stride = P.kv_stride;
    const dim3 grid(dp.dq_blocks + (P.num_rows + kCvRows - 1) / kCvRows, P.num_kv_heads);
    prefill_keys_kernel<kD><<<grid, kDqThreads, 0, stream>>>(dp);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  AttnParams ap;
  ap.ws_k = ws_k;
  ap.ws_v = ws_v;
  ap.total_keys = total_keys;
  ap.num_kv_heads = P.num_kv_heads;
  ap.group = group;
  ap.sliding_window = P.sliding_window;
  ap.scale_log2 = P.scale * 1.4426950408889634f;
  ap.seq_starts = P.seq_starts;
  ap.seq_cached = P.seq_cached;
  ap.cached_starts = P.cached_starts;
  ap.q = P.q;
  ap.q_stride = P.q_stride;
  ap.out = reinterpret_cast<__nv_bfloat16*>(P.out);
  ap.out_stride = int64_t{P.num_heads} * kD;
  const int64_t row_tiles = (int64_t{P.max_rows_per_seq} * group + kRows - 1) / kRows;
  if (row_tiles * P.num_kv_heads > 0x7fffffff) return cudaErrorInvalidValue;
  ap.row_tiles = static_cast<int32_t>(row_tiles);
  cudaError_t e = cudaFuncSetAttribute(
      prefill_attn_kernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem<kD>::kBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(row_tiles * P.num_kv_heads), 1, P.num_seqs);
  prefill_attn_kernel<kD><<<grid, kThreads, Smem<kD>::kBytes, stream>>>(ap);
  return cudaGetLastError();
}

bool misaligned(const void* ptr, uintptr_t a) {
  return reinterpret_cast<uintptr_t>(ptr) % a != 0;
}

}  // namespace prefill_detail

int64_t prefill_workspace_bytes(int32_t total_cached, int32_t num_rows, int32_t num_kv_heads,
                                int32_t head_dim) {
  // K and V, bf16, of every key: the cached tokens and the step's rows.
  const int64_t b = 2 * (int64_t{total_cached} + num_rows) * num_kv_heads * head_dim * 2;
  return (b + 255) / 256 * 256;
}

cudaError_t launch_prefill(const PrefillParams& P, cudaStream_t stream) {
  using prefill_detail::misaligned;
  if ((P.head_dim != 64 && P.head_dim != 128) || P.num_kv_heads < 1 || P.num_heads < 1 ||
      P.num_heads % P.num_kv_heads != 0 || P.num_seqs < 0 || P.num_seqs > 65535 || P.num_rows < 0 ||
      P.max_rows_per_seq < 0 || P.total_cached < 0 || P.sliding_window < 0) {
    return cudaErrorInvalidValue;
  }
  if (P.num_seqs == 0 || P.num_rows == 0) return cudaSuccess;  // no query row: nothing to write
  if (misaligned(P.q, 8) || P.q_stride % 2 != 0 || misaligned(P.k, 16) || misaligned(P.v, 16) ||
      P.kv_stride % 4 != 0 || misaligned(P.out, 4) || P.max_rows_per_seq < 1) {
    return cudaErrorInvalidValue;
  }
  if (int64_t{P.total_cached} + P.num_rows > 0x7fffffff || P.workspace == nullptr ||
      misaligned(P.workspace, 16) ||
      P.workspace_bytes <
          prefill_workspace_bytes(P.total_cached, P.num_rows, P.num_kv_heads, P.head_dim)) {
    return cudaErrorInvalidValue;
  }
  if (P.total_cached > 0 && (P.pool == nullptr || P.page_bytes % 16 != 0 || P.tokens16 < 1)) {
    return cudaErrorInvalidValue;
  }
  return P.head_dim == 64 ? prefill_detail::launch_d<64>(P, stream)
                          : prefill_detail::launch_d<128>(P, stream);
}

}  // namespace pmkv::kernels
