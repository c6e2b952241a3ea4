#pragma once
// Device code of decode attention (see decode.h for the contract, kernels/README.md for the
// design). One CTA = one (work item, KV head) of one bit-width; its 4 warps each walk a contiguous
// range of the item's tiles with their own cp.async ring in shared memory and their own
// online-softmax state; the CTA combines the 4 states at the end.
//
// Per 16-token tile a warp runs two mma.sync phases:
//   K phase: S[head][token] = q~ . x   8/16 bits (m16n8k16, fp32 accumulate): A = q~ (rows: heads,
//            hi parts; rows + 8: lo parts of an fp32 q), B = K codes as the exact fp16 1024 + byte
//            (k: dims, n: tokens), so S - kcorr = q . code. 2/4 bits (m16n8k32, int8 in, int32
//            accumulate): A = q in 16-bit fixed point as int8 limbs (rows: hi, rows + 8: lo), B =
//            the raw codes as u8, so S = 256 hi + lo = Q . code exactly (see load_q_int); groups
//            of at most 4 run it swapped, codes as A and q as B (k_phase_swap)
//   V phase: O^T[dim][col] += x[dim][token] P'[token][col]   A = V codes (m: dims, k: tokens; 2/4
//            bits the bf16 subnormal c 2^pos 2^-133, see small_raw; 8/16 bits code - mid), B = P' =
//            p * v_scale split into bf16 hi and lo columns (see Acc)
// The scales and zeros enter in fp32: score = k_scale * (S - kcorr) - k_zero * sum(q),
// out = (sum P' code - sum p v_zero) / sum p (mid subtracted; raw codes have no offset).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/attention/decode.h"
#include "kernels/cp_async.cuh"
#include "kernels/kv_page_layout.h"
#include "kernels/pdl.cuh"

namespace pmkv::kernels::decode_detail {

inline constexpr int kTile = kDecodeTileTokens;

struct KernelParams {
  const uint8_t* pool;
  int64_t page_bytes;
  int32_t num_kv_heads;
  int32_t group;
  int32_t tokens16;
  const int32_t* page_ids;        // [num_pages]
  const int32_t* page_tokens;     // [num_pages]
  const DecodeLayerPlan* layer;   // device: the layer's offsets and counts
  const DecodeWorkItem* items;    // every layer's items (layer->item_begin: this layer's first)
  const int32_t* bit_items;       // every layer's per-bits item lists
  const DecodeMergeItem* merges;  // every layer's merge entries (layer->merge_begin: this layer's)
  int32_t* merge_counters;  // [layer merges * num_kv_heads]: items done; zero between launches
  float* partial_lse;       // [layer items * num_kv_heads, group]
  float* partial_o;         // [layer items * num_kv_heads, group, head_dim]
  const void* q;            // [num_seqs, num_heads, head_dim]
  void* out;                // [num_seqs, num_heads, head_dim]
  DType out_dtype;
  float scale_log2;  // softmax scale * log2(e)
#ifdef PMKV_DECODE_TRACE
  uint64_t* trace;  // set_decode_trace(): [CTAs of the launch][kTraceSlots], or null
#endif
};

// PMKV_DECODE_TRACE (a build-time probe, off in every normal build; bench/README.md): thread 0 of
// each CTA (lane 0 of each warp for the loop ends) writes %globaltimer (ns) at fixed points of its
// last item into row blockIdx.x + gridDim.x * blockIdx.y of the trace buffer: 0 the SM id, 1
// entry, 2 q loaded, 3 first tile ready (warp 0), 4-7 each warp's loop end (8-warp CTAs: warps
// 4-7 at 11-14), 8 epilogue done, 9 merge done (or skipped), 10 item | tiles << 32, 15 past the
// PDL wait, 16 lane offsets computed, 17 the ring's first slots issued (16 bits: before q), 18
// q's values arrived (warp 0), 19 every warp past its loop (epilogue), 20 the warps' states in
// shared memory, 21 counted in (the merging CTA only).
// bench_decode_attention built with it writes the rows of a launch; bench/decode_trace_report.py
// summarizes them.
#ifdef PMKV_DECODE_TRACE
inline constexpr int kTraceSlots = kDecodeTraceSlots;
__device__ __forceinline__ void trace_put(const KernelParams& p, int slot, uint64_t v) {
  if (p.trace != nullptr) p.trace[(blockIdx.x + gridDim.x * blockIdx.y) * kTraceSlots + slot] = v;
}
__device__ __forceinline__ void trace_time(const KernelParams& p, int slot, bool cond) {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  if (cond) trace_put(p, slot, t);
}
#else
__device__ __forceinline__ void trace_put(const KernelParams&, int, uint64_t) {}
__device__ __forceinline__ void trace_time(const KernelParams&, int, bool) {}
#endif

inline constexpr int kMaxStages = 16;

// Per bit-width: resident CTAs per SM (the register budget of __launch_bounds__: 168 registers at
// 3 CTAs of 128 threads; groups above 4 query heads always use 3) and cp.async ring stages per warp
// (stages - 1 tiles in flight while one computes).
// Build-time knob for experiments: 4 caps the 2/4-bit kernels at 128 registers; measured on the
// H100 it is 15-40% slower than 3 (the cap forces rematerialization; bench/RESULTS.md).
#ifndef PMKV_DECODE_LOWBIT_CTAS_PER_SM
#define PMKV_DECODE_LOWBIT_CTAS_PER_SM 3
#endif
// Pairs of 2/4-bit tiles run software-pipelined (kPipelinePairs): a step scores the next pair's
// tokens (its K phase) while it finishes the current one's softmax and V phase, so a warp has two
// independent chains to issue from where it waited on the softmax's dependent steps. Measured on
// the H200 (bench/RESULTS.md, twenty-second session): 1-3% faster at batch >= 16 and 16K-64K
// tokens, 1-2% slower at batch 1 (the first pair's K phase waits alone), with the next K phase
// after the max vote (PMKV_DECODE_NEXT_AT 1; 0, before the scores, was slower at batch 1) and 6
// stages at 4 bits (8, to keep as many tiles in flight as before the pipeline, gained nothing).
// Once the 4-bit copies were fixed (swz below) the 4-bit kernel measured within -3% to +1% of no
// pipeline at every point; the 2-bit one keeps its gain.
// Pair steps whose two tiles are full and in one page issue them together (issue_full_pair);
// PMKV_DECODE_FULL_PAIRS=0 issues every tile alone (A/B).
#ifndef PMKV_DECODE_FULL_PAIRS
#define PMKV_DECODE_FULL_PAIRS 1
#endif
inline constexpr bool kFullPairs = PMKV_DECODE_FULL_PAIRS != 0;
// Build-time knobs for A/B runs: PMKV_DECODE_PIPELINE (0 or 1), PMKV_DECODE_NEXT_AT,
// PMKV_DECODE_STAGES4 / PMKV_DECODE_STAGES2 (ring stages per warp).
#ifndef PMKV_DECODE_PIPELINE
#define PMKV_DECODE_PIPELINE 1
#endif
#ifndef PMKV_DECODE_STAGES4
#define PMKV_DECODE_STAGES4 6
#endif
#ifndef PMKV_DECODE_STAGES2
#define PMKV_DECODE_STAGES2 8
#endif
// Ring slots a kernel issues before it loads q (see kCopiesFirst in run_item): 16 bits all of
// them; the default (3-CTA) 2-bit kernel one, which took 2 bits at 16 x 16K from 55.7 to 54.1 us
// and 16 x 4K from 22.8 to 22.5 (batch 1 even); the dense 2-bit kernel lost 1.6% at 64 x 16K with
// it and 4 bits moved -1% to +0.4%, so those and 8 bits load q first (bench/RESULTS.md,
// thirty-second and thirty-third sessions). Groups of 5-8 (kCols 2) were not measured: q first.
// PMKV_DECODE_EARLY_SLOTS=E overrides the 2/4/8-bit kernels' count for A/B runs.
template <int kBits, int kCols, bool kDense>
__host__ __device__ constexpr int early_slots(int slots) {
#ifdef PMKV_DECODE_EARLY_SLOTS
  return kBits == 16 ? slots : PMKV_DECODE_EARLY_SLOTS;
#else
  return kBits == 16 ? slots : kBits == 2 && kCols == 1 && !kDense ? 1 : 0;
#endif
}
#ifndef PMKV_DECODE_NEXT_AT
#define PMKV_DECODE_NEXT_AT 1
#endif
inline constexpr bool kPipelinePairs = PMKV_DECODE_PIPELINE != 0;

template <int kBits>
struct BitsConfig {
  static constexpr int kWarps = decode_warps(kBits);  // see decode.h
  static constexpr int kThreads = kWarps * 32;
  // 8-warp CTAs (decode.h): one an SM. 16 bits: 2 CTAs of 3 stages (more bytes in flight per
  // warp) beat 3 CTAs of 2 by 2-13% (bench/RESULTS.md, fourth session).
  static constexpr int kCtasPerSm = kBits <= 4    ? PMKV_DECODE_LOWBIT_CTAS_PER_SM
                                    : kWarps == 8 ? 1
                                    : kBits == 16 ? 2
                                                  : 3;
  // Launch bounds for groups of 5-8 query heads (two column tiles): 3 CTAs of 4 warps (168
  // registers), or one of 8.
  static constexpr int kCtasPerSmWide = kWarps == 8 ? 1 : 3;
  // The dense variant of 2/4 bits (groups of at most 4): 4 CTAs an SM (128 registers). The SM's
  // throughput is the same as with 3; what changes is how many of a launch's CTAs fit one wave
  // (528 against 396 on 132 SMs). The plan picks it where one item a sequence fits a dense wave
  // and not a 3-CTA one (decode_plan.cpp, dense_pays): batch 56-64 x 4K at 4 bits 13-17% faster,
  // 64 x 16K 3.5-6% (bench/RESULTS.md, twenty-seventh session).
  static constexpr bool kHasDense = kBits <= 4;
  static constexpr int kCtasPerSmDense = 4;
  static constexpr int kStages = kBits == 16  ? 3
                                 : kBits == 8 ? 3
                                 : kBits == 4 ? PMKV_DECODE_STAGES4
                                              : PMKV_DECODE_STAGES2;
};

template <int kBits, int kD>
struct Tile {
  static constexpr int kRow = kD * kBits / 8;  // bytes of a code row (a multiple of 16)
  static constexpr int kChunks = kRow / 16;    // 16-byte chunks per row
  // Row t + 8 of a stage sits 8 rows after row t (the same swizzle, see swz; not with 16 chunks):
  // a lane's reads of rows r and r + 8 take one address and an immediate offset.
  static constexpr bool kPlus8 = kChunks <= 8;
  static constexpr int kKBytes = kRow / 4;  // per lane and token in the K phase (kD/4 codes)
  static constexpr int kVBytes = kRow / 8;  // per lane and token in the V phase (kD/8 codes)
  // Bytes of a token's {scale, zero} in the page and in a stage: two f32, or two bf16 at 4 and 2
  // bits (kv_page_layout.h), expanded to f32 where they are read (params4).
  static constexpr int kPar = static_cast<int>(kv::param_bytes(kBits));
  static constexpr int kStage = kTile * (2 * kRow + 2 * kPar);
  static constexpr int kStages = BitsConfig<kBits>::kStages;
  static constexpr int kRingBytes = kStages * kStage;  // per warp
  static constexpr int kWarps = BitsConfig<kBits>::kWarps;
  static constexpr int kSmemBytes = kWarps * (kRingBytes + kMaxStages * 4);  // rings, then meta
  static constexpr int kKOff = 0;                  // [16][kRow] K codes (swizzled chunks)
  static constexpr int kVOff = kTile * kRow;       // [16][kRow] V codes
  static constexpr int kKPOff = 2 * kTile * kRow;  // [16] {scale, zero} of K
  static constexpr int kVPOff = kKPOff + kTile * kPar;
  static constexpr float kMid = kBits == 16 ? 32896.0f : 128.0f;  // 8 and 16 bits, see kParts
  static_assert(kRow % 16 == 0, "code rows must be whole 16-byte chunks");
  static_assert(kStages >= 2 && kStages <= kMaxStages, "2 to 16 stages");
};

// Chunk c of token row t lives at chunk c ^ swz(t): spreads a warp's reads over the banks.
// The rows that share a 128-byte line of the page (two 64-byte rows at 4 bits) take the same XOR:
// a warp's cp.async of one line into two differently permuted rows went to L2 as more, smaller
// requests, and the 4-bit loop's copies alone ran at ~80% of a plain read of the same bytes
// (9-17% slower than now at batch >= 16 and 16K-64K tokens; bench/RESULTS.md, twenty-second
// session). At 4 bits, rows 2m and 2m + 1 take (m & 1) * 2: the V phase's 8-byte reads of rows
// t and t + 2 (one bank half) stay apart, and the K phase's reads cover whole lines. The 2-bit
// rows (four a line) measured the same with and without their swizzle; 8 and 16 bits have one or
// two lines a row.
template <class Tr>
__device__ __forceinline__ int swz(int t) {
  if constexpr (Tr::kChunks == 4) return ((t >> 1) & 1) << 1;
  return Tr::kChunks > 1 ? (t & (Tr::kChunks - 1)) : 0;
}

// Token order inside a tile: mma column / k index k holds token sigma(k) (bank-conflict free
// reads of the 2- and 4-bit tiles).
__device__ __forceinline__ int sigma(int k) {
  return k ^ ((k >> 2) & 1);
}

// ---- small PTX wrappers --------------------------------------------------------------------
using kernels::cp_async16;  // kernels/cp_async.cuh
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
// Asks L2 to fetch [p, p + bytes) (16-byte aligned, a multiple of 16): one bulk request from one
// thread, no completion to wait for.
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// m16n8k16 in fp16 (kF16) or bf16, fp32 accumulation.
template <bool kF16>
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                      uint32_t b1) {
  if constexpr (kF16) {
    mma_f16(d, a, b0, b1);
  } else {
    mma_bf16(d, a, b0, b1);
  }
}

// m16n8k32, A int8 (row), B uint8 (col), int32 accumulation: exact.
__device__ __forceinline__ void mma_s8u8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// m16n8k32, A uint8 (row), B int8 (col), int32 accumulation: exact.
__device__ __forceinline__ void mma_u8s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 8x8 b16 matrix whose row gid, columns 2 tig and 2 tig + 1 this lane holds, transposed.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t f16x2_bits(__half2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ __half2 as_f16x2(uint32_t x) {
  return *reinterpret_cast<__half2*>(&x);
}
// (lo, hi) packed as bf16x2, round to nearest (exact for the small integers we pack).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return bf16x2_bits(__floats2bfloat162_rn(lo, hi));
}
// (x & mask) | magic in one LOP3.
__device__ __forceinline__ uint32_t and_or(uint32_t x, uint32_t mask, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(x), "r"(mask), "r"(magic));
  return d;
}
// x ~= hi + lo with hi, lo bf16 (relative error 2^-17).
__device__ __forceinline__ void split_bf16(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  hi = bf16x2_bits(h);
  lo = pack_bf16(a - hf.x, b - hf.y);
}
// x ~= hi + lo with hi, lo fp16: relative error 2^-23 for |x| >= 2^-2 (lo still normal), an
// absolute 2^-25 below.
__device__ __forceinline__ void split_f16(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  const float2 hf = __half22float2(h);
  hi = f16x2_bits(h);
  lo = f16x2_bits(__floats2half2_rn(a - hf.x, b - hf.y));
}
// Both fp16 halves of x times 256 (exact below 256: no overflow, no rounding).
__device__ __forceinline__ uint32_t f16x2_times256(uint32_t x) {
  return f16x2_bits(__hmul2(as_f16x2(x), __float2half2_rn(256.0f)));
}
// Byte k of a and byte k of b as the fp16x2 (byte - 128), exactly: one PRMT brings them to bytes
// 0 and 2, one LOP3 makes the fp16 1024 + byte, one HADD2 takes 1152 off.
__device__ __forceinline__ uint32_t bytes_centered_f16(uint32_t a, uint32_t b, int k) {
  const uint32_t x = and_or(__byte_perm(a, b, k | ((4 + k) << 8)), 0x00FF00FFu, 0x64006400u);
  return f16x2_bits(__hadd2(as_f16x2(x), __float2half2_rn(-1152.0f)));
}

// In the V phase, 2- and 4-bit codes enter the mma raw, as small bf16 numbers: code j (bits j*b ..
// j*b + b - 1) of both 16-bit halves of x, b = 2 or 4, becomes the bf16x2 (c 2^pos 2^-133) with
// at most one shift and one AND: the shift brings the code to bits pos .. pos + b - 1 <= 7 of its
// half, the mask drops everything else (bits a shift moves across the halves included). The bf16
// bit patterns 0..255 are exactly the values n 2^-133 (0..127 subnormal, 128..255 the first normal
// binade, 2^-126 (1 + m/128) = (128 + m) 2^-133), so a code may use bit 7, the exponent's lowest
// bit. No offset to take out later: the tensor cores take subnormal bf16 inputs exactly, and the
// P' columns carry 2^kRawPScaleLog2 so that the products c P' 2^(pos - 133 + 80) stay normal fp32
// (P' down to 2^-73). The epilogue scales by 2^(53 - pos) (raw_unit).
// Shifts a word: one, by 8 bits: 2 bits, j = 0..3 at pos 0, 2, 4, 6 and j = 4..7 shifted; 4 bits,
// j = 0, 1 at pos 0, 4 and j = 2, 3 shifted. (Mantissa bits only, pos + b - 1 <= 6, took two
// shifts a word at 2 bits and three at 4; before that, the bf16 128 + c 2^pos with its offset
// taken out by an extra mma against ones took four: bench/RESULTS.md, twenty-sixth and
// twenty-seventh sessions.)
template <int kBits>
__device__ __forceinline__ constexpr int small_shift(int j) {
  return kBits == 2 ? 8 * (j / 4) : 8 * (j / 2);
}
template <int kBits>
__device__ __forceinline__ constexpr int small_pos(int j) {
  return j * kBits - small_shift<kBits>(j);
}
template <int kBits>
__device__ __forceinline__ uint32_t small_raw(uint32_t x, int j) {
  const int pos = small_pos<kBits>(j), sh = small_shift<kBits>(j);
  const uint32_t mask = (((1u << kBits) - 1u) << pos) * 0x00010001u;
  return (x >> sh) & mask;
}
// P' = p * v_scale enters the raw V phase times 2^kRawPScaleLog2 (see small_raw).
inline constexpr int kRawPScaleLog2 = 80;
// What one unit of a raw V accumulator is worth, inverted: 2^(133 - kRawPScaleLog2 - pos).
__device__ __forceinline__ constexpr float raw_unit(int pos) {
  return static_cast<float>(1ull << (133 - kRawPScaleLog2 - pos));
}
// Raw codes (2 and 4 bits): see small_raw.
template <int kBits>
inline constexpr bool kRaw = kBits <= 4;

// ---- Code parts of the V phase (k_part below: the K phase of 8/16 bits). A b-bit code is the sum
// of kParts(b) exact parts:
//   2, 4 bits:  the bf16 subnormal c 2^pos 2^-133 (raw, see small_raw);
//   8 bits:     fp16 c - 128 (bytes_centered_f16: three instructions a register);
//   16 bits:    fp16 high byte - 128 (its mma's P' columns carry the factor 256) and low byte -
//               128 (mid 32896), one mma each.
// 8 and 16 bits run their V phase in fp16 (P' in fp16 hi and lo parts): about five instructions
// a register less than the bf16 route (the fp32 2^23 + byte, an FADD and a packing convert each
// pair), the bulk of those kernels' loops. fp16 P' needs a bounded range: see kVHalf.
template <int kBits>
inline constexpr int kParts = kBits == 16 ? 2 : 1;

// The K phase of 8- and 16-bit pages runs in fp16: a byte b becomes the fp16 1024 + b with one
// LOP3 ((x & 0x00FF00FF) | 0x64006400, two bytes at a time), against about five instructions a
// pair through the fp32 2^23 trick and a packing convert. q goes to fp16 (scaled by a power of two
// when its largest element passes 2^14, see load_q) and the offset leaves through kcorr:
// dot = sum q code + kK sum q, kK = 1024 (8 bits) or 256 * 1024 + 1024 (16 bits: hi and lo bytes
// in two chains, dot = 256 hi + lo). The V phase stays in bf16 (P' needs bf16's range).
template <int kBits>
inline constexpr bool kKHalf = kBits >= 8;
template <int kBits>
inline constexpr float kKOffset = kBits == 16 ? 263168.0f : 1024.0f;

// Dims (relative to the lane's chunk of kD/4 codes) of K pair p of 8/16 bits; the q fragments use
// the same map.
template <int kBits>
__device__ __forceinline__ constexpr int pair_dim_lo(int p) {
  return kBits == 8 ? 4 * (p / 2) + p % 2 : 2 * p;
}
template <int kBits>
__device__ __forceinline__ constexpr int pair_dim_hi(int p) {
  return pair_dim_lo<kBits>(p) + (kBits == 8 ? 2 : 1);
}

// K phase of 8/16 bits: part r of pair p of the lane's words of one token row.
template <int kBits, int kPart>
__device__ __forceinline__ uint32_t k_part(const uint32_t* w, int p) {
  static_assert(kBits >= 8, "2/4 bits: k_codes_u8");
  if constexpr (kBits == 8) {  // bytes (0, 2) or (1, 3) of word p / 2, fp16 1024 + b
    return and_or(w[p / 2] >> (8 * (p % 2)), 0x00FF00FFu, 0x64006400u);
  } else {  // codes 2p, 2p + 1 are the halves of word p: part 0 their high bytes, part 1 low
    return and_or(kPart == 0 ? w[p] >> 8 : w[p], 0x00FF00FFu, 0x64006400u);
  }
}

// V phase: part r of code j of the lane's chunk, token a in the low half, b in the high half.
template <int kBits, int kPart>
__device__ __forceinline__ uint32_t v_part(const uint32_t* a, const uint32_t* b, int j) {
  if constexpr (kBits == 2) {
    const uint32_t x = (j < 8) ? __byte_perm(a[0], b[0], 0x5410) : __byte_perm(a[0], b[0], 0x7632);
    return small_raw<2>(x, j % 8);
  } else if constexpr (kBits == 4) {
    const int w = j / 8, k = j % 8;
    const uint32_t x = (k < 4) ? __byte_perm(a[w], b[w], 0x5410) : __byte_perm(a[w], b[w], 0x7632);
    return small_raw<4>(x, k % 4);
  } else if constexpr (kBits == 8) {
    return bytes_centered_f16(a[j / 4], b[j / 4], j % 4);
  } else {
    const int w = j / 2, k = 2 * (j % 2) + (kPart == 0 ? 1 : 0);
    return bytes_centered_f16(a[w], b[w], k);
  }
}

// 2^pos of raw V code j of the lane's chunk.
template <int kBits>
__device__ __forceinline__ constexpr int v_pos(int j) {
  return kBits == 2 ? small_pos<2>(j % 8) : small_pos<4>(j % 4);
}

// Loads kBytes (2, 4, 8 or 16) at p into 32-bit words (kBytes == 2: the low half of w[0]).
template <int kBytes>
__device__ __forceinline__ void lds_at(const uint8_t* p, uint32_t* w) {
  if constexpr (kBytes == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else if constexpr (kBytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else if constexpr (kBytes == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    static_assert(kBytes == 2, "unsupported read width");
    w[0] = *reinterpret_cast<const uint16_t*>(p);
  }
}

// Byte offset inside a stage's (swizzled) code tile of byte x of token row t.
template <class Tr>
__device__ __forceinline__ int code_offset(int t, int x) {
  return t * Tr::kRow + (((x >> 4) ^ swz<Tr>(t)) << 4) + (x & 15);
}

// Hides x's origin from the compiler: without it, ptxas re-derives every per-lane offset below
// from the thread index in every tile (about 60 instructions a tile at 2 bits) instead of keeping
// them in registers it has to spare.
template <bool kHide = true>
__device__ __forceinline__ int opaque(int x) {
  if constexpr (kHide) asm volatile("" : "+r"(x));
  return x;
}

// Everything a lane reads from or copies into a stage, as byte offsets from the stage, computed
// once per CTA. K phase: n-tile j, 16-byte piece i of the lane's kKBytes of row sigma(8j + gid);
// V phase: group g of the lane's kVBytes of rows sigma(2 tig), sigma(2 tig + 1), sigma(2 tig +
// 8), sigma(2 tig + 9); params: the two entries at positions 8j + 2 tig, + 1 (K; V at + kTile *
// kPar);
// valid-mask bits of the lane's 4 scores. Copies: chunk op i of the tile's rows (source offset from
// the tile's first row, destination, row), and the lane's {scale, zero} (K for lanes 0-15, V for
// 16-31; destination position sigma(t)).
template <class Tr>
struct LaneOffsets {
  static constexpr int kKRead = Tr::kKBytes < 16 ? Tr::kKBytes : 16;
  static constexpr int kKReads = Tr::kKBytes / kKRead;
  static constexpr int kVRead = Tr::kVBytes < 16 ? Tr::kVBytes : 16;
  static constexpr int kVReads = Tr::kVBytes / kVRead;
  static constexpr int kOps = kTile * Tr::kChunks;
  static constexpr int kCopies = (kOps + 31) / 32;
  int k[2][kKReads];
  int v[kVReads][4];
  int params;
  uint32_t vbit[4];
  int cp_src[kCopies], cp_dst[kCopies], cp_row[kCopies];
  int par_dst, par_src, par_row;

  // swap: the 2/4-bit layout of groups of at most 4 (k_phase_swap): a lane scores tokens rows gid
  // and gid + 8 of both tiles of a step for head tig; their params sit side by side.
  __device__ __forceinline__ LaneOffsets(const kv::PageLayout& L, int lane, bool swap) {
    const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < kKReads; ++i)
        k[j][i] =
            opaque(Tr::kKOff + code_offset<Tr>(sigma(8 * j + gid), tig * Tr::kKBytes + i * kKRead));
    }
    const int rows[4] = {sigma(2 * tig), sigma(2 * tig + 1), sigma(2 * tig + 8),
                         sigma(2 * tig + 9)};
#pragma unroll
    for (int g = 0; g < kVReads; ++g) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
        v[g][r] = opaque(Tr::kVOff + code_offset<Tr>(rows[r], gid * Tr::kVBytes + g * kVRead));
    }
    params = opaque(Tr::kKPOff + 2 * Tr::kPar * (swap ? gid : tig));
#pragma unroll
    for (int i = 0; i < 4; ++i)
      vbit[i] = static_cast<uint32_t>(
          opaque(1 << (swap ? sigma(gid + 8 * (i % 2)) : sigma(8 * (i / 2) + 2 * tig + i % 2))));
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int o = lane + 32 * i;
      const int t = o / Tr::kChunks, c = o % Tr::kChunks;
      // Head-major page: a tile's rows are contiguous. Kept in registers only where they are few
      // (8 and 16 bits have 4 and 8 copies a lane and the registers to spare for neither).
      cp_src[i] = opaque<kCopies <= 2>(t * Tr::kRow + c * 16);
      cp_dst[i] = opaque<kCopies <= 2>(t * Tr::kRow + ((c ^ swz<Tr>(t)) << 4));
      cp_row[i] = opaque<kCopies <= 2>(kOps % 32 == 0 || o < kOps ? t : kTile);  // kTile: none
    }
    const int kind = lane >> 4, t = lane & 15;
    // Position of token t's params: sigma(t) (its mma column), or with swap 2 (r % 8) + r / 8 for
    // its A row r = sigma(t), so rows gid and gid + 8 are one 16-byte read.
    const int pos = swap ? 2 * (sigma(t) % 8) + sigma(t) / 8 : sigma(t);
    par_dst = opaque(Tr::kKPOff + kind * (kTile * Tr::kPar) + pos * Tr::kPar);
    par_src = opaque(static_cast<int>(kind ? L.v_params : L.k_params) + t * Tr::kPar);
    par_row = opaque(t);
  }
};

// The {scale, zero} of two consecutive stage positions as {s0, z0, s1, z1}: one 16-byte read of
// f32 pairs, or one 8-byte read of bf16 pairs (scale in the low half of each word, see
// kv_page_layout.h), whose expansion to f32 is a shift and a mask. kScaleLog2 (bf16 pairs only):
// the scales come out times 2^kScaleLog2, an exponent add folded into the shift's IMAD (exact:
// the codec keeps every scale in [1e-5, 1e5], normal numbers; the zero params of masked rows turn
// into 2^(kScaleLog2 - 127), which their p = 0 cancels).
template <int kPar, int kScaleLog2 = 0>
__device__ __forceinline__ float4 params4(const uint8_t* at) {
  if constexpr (kPar == 8) {
    static_assert(kScaleLog2 == 0, "f32 params are read as they are");
    return *reinterpret_cast<const float4*>(at);
  } else {
    constexpr uint32_t kExp = static_cast<uint32_t>(kScaleLog2) << 23;
    const uint2 w = *reinterpret_cast<const uint2*>(at);
    return make_float4(__uint_as_float((w.x << 16) + kExp), __uint_as_float(w.x & 0xffff0000u),
                       __uint_as_float((w.y << 16) + kExp), __uint_as_float(w.y & 0xffff0000u));
  }
}

// Issues the cp.async copies of one tile (valid rows only) into a stage. The {scale, zero} of
// token t go to position sigma(t) (the order the lanes read them in); rows past nvalid get zero
// params, so masked tokens contribute exactly 0 to the V phase. Offsets inside a page fit 32 bits.
// tok0: the tile's first row of the page's head-major rows (head * tokens + tile * 16).
template <class Tr>
__device__ __forceinline__ void issue_tile(uint8_t* st, const uint8_t* page,
                                           const kv::PageLayout& L, const LaneOffsets<Tr>& lo,
                                           int tok0, int nvalid) {
  const uint8_t* kc = page + static_cast<int>(L.k_codes) + tok0 * Tr::kRow;
  const uint8_t* vc = page + static_cast<int>(L.v_codes) + tok0 * Tr::kRow;
#pragma unroll
  for (int i = 0; i < LaneOffsets<Tr>::kCopies; ++i) {
    if (lo.cp_row[i] < nvalid) {
      cp_async16(st + Tr::kKOff + lo.cp_dst[i], kc + lo.cp_src[i]);
      cp_async16(st + Tr::kVOff + lo.cp_dst[i], vc + lo.cp_src[i]);
    }
  }
  uint8_t* dst = st + lo.par_dst;
  if constexpr (Tr::kPar == 8) {
    if (lo.par_row < nvalid) {
      cp_async8(dst, page + lo.par_src + tok0 * 8);
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(0u, 0u);
    }
  } else {
    if (lo.par_row < nvalid) {
      cp_async4(dst, page + lo.par_src + tok0 * 4);
    } else {
      *reinterpret_cast<uint32_t*>(dst) = 0u;
    }
  }
}

// Two full tiles of one page (tok0 and tok0 + kTile) into two consecutive stages (st, st +
// kStage): what a pair step of 2/4 bits issues almost always (with 32-token pages a 2-bit page
// holds 16 tiles, a 4-bit one 8). One set of addresses serves both tiles and nothing is predicated
// on valid rows: ~47 instructions a pair where two issue_tile calls and their page checks took
// ~85; the 2-bit kernel 5-9% faster at batch >= 16 (bench/RESULTS.md, twenty-sixth session).
template <class Tr>
__device__ __forceinline__ void issue_full_pair(uint8_t* st, const uint8_t* page,
                                                const kv::PageLayout& L, const LaneOffsets<Tr>& lo,
                                                int tok0) {
  using LO = LaneOffsets<Tr>;
  const uint8_t* kc = page + static_cast<int>(L.k_codes) + tok0 * Tr::kRow;
  const uint8_t* vc = page + static_cast<int>(L.v_codes) + tok0 * Tr::kRow;
  constexpr int kNext = kTile * Tr::kRow;  // the second tile's rows
#pragma unroll
  for (int i = 0; i < LO::kCopies; ++i) {
    if (LO::kOps % 32 == 0 || lo.cp_row[i] < kTile) {
      cp_async16(st + Tr::kKOff + lo.cp_dst[i], kc + lo.cp_src[i]);
      cp_async16(st + Tr::kVOff + lo.cp_dst[i], vc + lo.cp_src[i]);
      cp_async16(st + Tr::kStage + Tr::kKOff + lo.cp_dst[i], kc + lo.cp_src[i] + kNext);
      cp_async16(st + Tr::kStage + Tr::kVOff + lo.cp_dst[i], vc + lo.cp_src[i] + kNext);
    }
  }
  const uint8_t* par = page + lo.par_src + tok0 * Tr::kPar;
  if constexpr (Tr::kPar == 8) {
    cp_async8(st + lo.par_dst, par);
    cp_async8(st + Tr::kStage + lo.par_dst, par + kTile * 8);
  } else {
    cp_async4(st + lo.par_dst, par);
    cp_async4(st + Tr::kStage + lo.par_dst, par + kTile * 4);
  }
}

// kCols = 1 (group <= 4): the V phase's 8 columns are the group's heads' hi parts (0-3) and lo
// parts (4-7); kCols = 2 (group 5-8): two column tiles, heads' hi parts and lo parts.
template <int kD, int kCols>
struct Acc {
  float o[kD / 16][kCols][4];  // O^T accumulators: [m-tile of 16 dims][column tile][c0..c3]
  // Of the lane's K-phase row (head gid): max (log2 domain), sum p, and the zero term: sum p (vs *
  // mid - vz) for 8 and 16 bits, -sum p vz for raw codes.
  float m, l, z;
};

// Online softmax: how far (log2 units) a score may pass the running max before it moves.
inline constexpr float kMaxSlack = 8.0f;
// The V phase of 8- and 16-bit pages takes P' = p * v_scale in fp16 (hi and lo parts), whose range
// ends at 65504 (and 256 P' must fit, see v_phase) and whose lo parts stay exact above 2^-2. So
// there the softmax reference m is a running max of s + log2(v_scale) rather than of s: P' =
// 2^(s - m) v_scale is about 1 for the token that set m and moves m again when it passes
// kPHalfMax. P' is then proportional to a token's weight in the output, and an fp16 part's
// absolute error (2^-25 where lo is subnormal) is relative to the largest weight. p = 2^(s - m)
// itself stays in fp32 (at most kPHalfMax / 1e-5, the smallest v_scale the codec writes).
template <int kBits>
inline constexpr bool kVHalf = kBits >= 8;
inline constexpr float kPHalfMax = 128.0f;

// The lane's K code words of one tile: w[0] token row sigma(gid), w[1] row sigma(8 + gid).
template <class Tr>
__device__ __forceinline__ void load_k_words(const uint8_t* st, const LaneOffsets<Tr>& lo,
                                             uint32_t (&w)[2][Tr::kKBytes / 4]) {
  using LO = LaneOffsets<Tr>;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int i = 0; i < LO::kKReads; ++i)
      lds_at<LO::kKRead>(st + (Tr::kPlus8 && j == 1 ? lo.k[0][i] + 8 * Tr::kRow : lo.k[j][i]),
                         w[j] + i * (LO::kKRead / 4));
  }
}

// K phase of one 16-token tile of 8/16 bits (fp16): s_acc[j] = the C fragment of n-tile j
// (column n is token sigma(8j + n)).
template <int kBits, int kD>
__device__ __forceinline__ void k_phase(const uint8_t* st, const uint32_t (&aq)[kD / 16][4],
                                        const LaneOffsets<Tile<kBits, kD>>& lo,
                                        float (&s_acc)[2][4]) {
  static_assert(kKHalf<kBits>, "2/4 bits: k_phase_int");
  constexpr int kKWords = Tile<kBits, kD>::kKBytes / 4;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      s_acc[j][i] = 0.0f;
  }
  uint32_t w[2][kKWords];
  load_k_words(st, lo, w);
  constexpr auto mma = mma_f16;
  if constexpr (kParts<kBits> == 1) {  // one accumulation chain per n-tile, interleaved
#pragma unroll
    for (int kt = 0; kt < kD / 16; ++kt) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
        mma(s_acc[j], aq[kt], k_part<kBits, 0>(w[j], 2 * kt), k_part<kBits, 0>(w[j], 2 * kt + 1));
    }
  } else {  // 16 bits: high and low bytes in two chains per n-tile, dot = 256 hi + lo
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kt = 0; kt < kD / 16; ++kt) {
        mma(s_acc[j], aq[kt], k_part<kBits, 0>(w[j], 2 * kt), k_part<kBits, 0>(w[j], 2 * kt + 1));
        mma(c1, aq[kt], k_part<kBits, 1>(w[j], 2 * kt), k_part<kBits, 1>(w[j], 2 * kt + 1));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
        s_acc[j][i] = fmaf(256.0f, s_acc[j][i], c1[i]);
    }
  }
}

// ---- K phase of 2- and 4-bit pages on int8 tensor cores. A lane's K codes of one token (the
// kD/4 dims of its chunk, b bits each, packed LSB first) become kD/16 registers of four u8 codes:
// register j is (word j / (8/b) >> b (j % (8/b))) & (2^b - 1) 0x01010101, one SHF and one LOP3
// (no offset to take out later, no position factor: the codes are the integers themselves). k-step
// s of m16n8k32 takes registers 2s (k 4 tig + e) and 2s + 1 (k 16 + 4 tig + e); load_q_int lays q
// out in the same order. Against the bf16 route (one LOP3 per two codes, a shift per two or four,
// twice the mma) the loop's ALU work for K drops by 40-60%.
template <int kBits, int kD>
inline constexpr int kQSteps = kRaw<kBits> ? kD / 32 : kD / 16;  // A fragments of q

// kGroups = 2: registers j < kD/32 hold codes at their value (group 0), the others at
// kGroupFactor times it (group 1): (w >> 4 r) & 0x03030303 and & 0x0C0C0C0C at 2 bits (w &
// 0x0F0F0F0F and & 0xF0F0F0F0 at 4 bits), one shift a word fewer; the groups' sums go to two
// accumulators, combined as kGroupFactor * sum0 + sum1. The swapped K phase takes it at 2 bits
// (kSwapGroups; 2-4% faster at batch >= 16, bench/RESULTS.md); at 4 bits it measured the same as
// one group (within 1%), which stays.
template <int kBits, int kGroups>
inline constexpr int kGroupFactor = kGroups == 1 ? 1
                                    : kBits == 2 ? 4
                                                 : 16;
template <int kBits>
inline constexpr int kSwapGroups = kBits == 2 ? 2 : 1;

template <int kBits, int kD = 128, int kGroups = 1>
__device__ __forceinline__ uint32_t k_codes_u8(const uint32_t* w, int j) {
  if constexpr (kGroups == 1) {
    constexpr int kPer = 8 / kBits;  // codes a byte holds
    constexpr uint32_t kMask = ((1u << kBits) - 1u) * 0x01010101u;
    return (w[j / kPer] >> (kBits * (j % kPer))) & kMask;
  } else {
    const int g = j / (kD / 32), r = j % (kD / 32);
    if constexpr (kBits == 2) {
      const uint32_t x = (r % 2) ? w[r / 2] >> 4 : w[r / 2];
      return x & (g ? 0x0C0C0C0Cu : 0x03030303u);
    } else {
      return w[r] & (g ? 0xF0F0F0F0u : 0x0F0F0F0Fu);
    }
  }
}
// The dim (inside the lane's chunk of kD/4) of byte e of register j of k_codes_u8.
template <int kBits, int kD = 128, int kGroups = 1>
__device__ __forceinline__ constexpr int k_u8_dim(int j, int e) {
  if constexpr (kGroups == 1) {
    constexpr int kPer = 8 / kBits;
    return (j / kPer) * (32 / kBits) + e * kPer + j % kPer;
  } else {
    const int g = j / (kD / 32), r = j % (kD / 32);
    return kBits == 2 ? 16 * (r / 2) + 4 * e + 2 * (r % 2) + g : 8 * r + 2 * e + g;
  }
}

// s[j]: the int32 C fragment of n-tile j (column n is token sigma(8j + n)); rows gid: sum hi c,
// rows gid + 8: sum lo c.
template <int kBits, int kD>
__device__ __forceinline__ void k_phase_int(const uint8_t* st, const uint32_t (&aq)[kD / 32][4],
                                            const LaneOffsets<Tile<kBits, kD>>& lo,
                                            int (&s)[2][4]) {
  constexpr int kKWords = Tile<kBits, kD>::kKBytes / 4;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      s[j][i] = 0;
  }
  uint32_t w[2][kKWords];
  load_k_words(st, lo, w);
#pragma unroll
  for (int ks = 0; ks < kD / 32; ++ks) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
      mma_s8u8(s[j], aq[ks], k_codes_u8<kBits>(w[j], 2 * ks), k_codes_u8<kBits>(w[j], 2 * ks + 1));
  }
}

// The swapped K phase (2/4 bits, groups of at most 4): S^T[token][col] = codes . q. A = the codes
// (m: token rows r = sigma(...) as k_phase_int loads them, rows gid and gid + 8; k: dims), B = q
// (columns 2h and 2h + 1: head h's hi and lo limbs, see load_q_int). c0 / c1: token row gid,
// head tig's hi / lo sums; c2 / c3: row gid + 8. Every lane's result is a useful score, with half
// the mma of k_phase_int over a pair of tiles and no selects.
template <int kBits, int kD, int kGroups = kSwapGroups<kBits>>
__device__ __forceinline__ void k_phase_swap(const uint8_t* st, const uint32_t (&bq)[kD / 32][4],
                                             const LaneOffsets<Tile<kBits, kD>>& lo,
                                             int (&c)[kGroups][4]) {
  constexpr int kKWords = Tile<kBits, kD>::kKBytes / 4;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      c[g][i] = 0;
  }
  uint32_t w[2][kKWords];
  load_k_words(st, lo, w);
#pragma unroll
  for (int ks = 0; ks < kD / 32; ++ks) {
    const uint32_t a[4] = {k_codes_u8<kBits, kD, kGroups>(w[0], 2 * ks),
                           k_codes_u8<kBits, kD, kGroups>(w[1], 2 * ks),
                           k_codes_u8<kBits, kD, kGroups>(w[0], 2 * ks + 1),
                           k_codes_u8<kBits, kD, kGroups>(w[1], 2 * ks + 1)};
    mma_u8s8(c[ks / (kD / 32 / kGroups)], a, bq[ks][0], bq[ks][1]);
  }
}

// V phase of one 16-token tile, transposed: O^T[dim][col] += sum_k V[token sigma(k)][dim]
// P'^T[k][col]. A = V codes (m: 16 dims, k: tokens), B = bp (P', k: tokens, n: 8 columns, see
// Acc). Row gid of m-tile mt is code 2 mt of the lane's chunk of kD/8 dims, row gid + 8 code
// 2 mt + 1.
template <int kBits, int kD, int kCols>
__device__ __forceinline__ void v_phase(const uint8_t* st, const uint32_t (&bp)[kCols][2],
                                        const LaneOffsets<Tile<kBits, kD>>& lo,
                                        Acc<kD, kCols>& acc) {
  using LO = LaneOffsets<Tile<kBits, kD>>;
  // 16 bits: the high-byte part's columns are 256 P' (exact: P' <= 2^7, see kVHalf).
  uint32_t bp256[kCols][2];
  if constexpr (kBits == 16) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      bp256[c][0] = f16x2_times256(bp[c][0]);
      bp256[c][1] = f16x2_times256(bp[c][1]);
    }
  }
  // Tokens a, b, c, d: sigma(2 tig), sigma(2 tig + 1), sigma(2 tig + 8), sigma(2 tig + 9).
  constexpr int kGroupBytes = LO::kVRead;
  constexpr int kGroups = LO::kVReads;
  constexpr int kGroupCodes = kGroupBytes * 8 / kBits;
  constexpr int kGroupWords = kGroupBytes < 4 ? 1 : kGroupBytes / 4;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    uint32_t wa[kGroupWords], wb[kGroupWords], wc[kGroupWords], wd[kGroupWords];
    lds_at<kGroupBytes>(st + lo.v[g][0], wa);
    lds_at<kGroupBytes>(st + lo.v[g][1], wb);
    // Rows sigma(2 tig + 8), sigma(2 tig + 9): 8 rows after the first two (sigma keeps bit 3).
    constexpr int k8 = 8 * Tile<kBits, kD>::kRow;
    constexpr bool kPlus8 = Tile<kBits, kD>::kPlus8;
    lds_at<kGroupBytes>(st + (kPlus8 ? lo.v[g][0] + k8 : lo.v[g][2]), wc);
    lds_at<kGroupBytes>(st + (kPlus8 ? lo.v[g][1] + k8 : lo.v[g][3]), wd);
#pragma unroll
    for (int i = 0; i < kGroupCodes / 2; ++i) {
      const int mt = g * (kGroupCodes / 2) + i;
#pragma unroll
      for (int part = 0; part < kParts<kBits>; ++part) {
        uint32_t a[4];
        if (part == 0) {
          a[0] = v_part<kBits, 0>(wa, wb, 2 * i);
          a[1] = v_part<kBits, 0>(wa, wb, 2 * i + 1);
          a[2] = v_part<kBits, 0>(wc, wd, 2 * i);
          a[3] = v_part<kBits, 0>(wc, wd, 2 * i + 1);
        } else {
          a[0] = v_part<kBits, 1>(wa, wb, 2 * i);
          a[1] = v_part<kBits, 1>(wa, wb, 2 * i + 1);
          a[2] = v_part<kBits, 1>(wc, wd, 2 * i);
          a[3] = v_part<kBits, 1>(wc, wd, 2 * i + 1);
        }
        const uint32_t(*b)[2] = kBits == 16 && part == 0 ? bp256 : bp;
#pragma unroll
        for (int c = 0; c < kCols; ++c)
          mma16<kVHalf<kBits>>(acc.o[mt][c], a, b[c][0], b[c][1]);
      }
    }
  }
}

// The K phase of a pair (2/4 bits, groups of at most 4 query heads; see compute_tile): the lane's
// 4 raw dots, value i: tile i / 2 (st, st2), token row gid + 8 (i % 2), head tig.
template <int kBits, int kD>
__device__ __forceinline__ void pair_dots(const uint8_t* st, const uint8_t* st2,
                                          const uint32_t (&aq)[kQSteps<kBits, kD>][4],
                                          const LaneOffsets<Tile<kBits, kD>>& lo,
                                          float (&dots)[4]) {
  constexpr int kG = kSwapGroups<kBits>;
  int c[2][kG][4];
  k_phase_swap<kBits, kD>(st, aq, lo, c[0]);
  k_phase_swap<kBits, kD>(st2, aq, lo, c[1]);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int(&ct)[kG][4] = c[i / 2];
    const int r = 2 * (i % 2);
    int d = ct[0][r] * 256 + ct[0][r + 1];
    if constexpr (kG == 2) d = d * kGroupFactor<kBits, 2> + ct[1][r] * 256 + ct[1][r + 1];
    dots[i] = __int2float_rn(d);
  }
}

struct NoNext {
  __device__ __forceinline__ void operator()() const {}
};

// One step: K phase, online softmax, V phase, over one tile (st) or, kPair, two (st and st2).
// Pairs (2/4 bits, groups of at most 4 query heads) run the swapped K phase (k_phase_swap): lane
// (gid, tig) scores head tig on token rows gid and gid + 8 of both tiles, so every lane's softmax
// work is useful; the 8 lanes of a head share its running max and add their sums at the end.
// Pairs take their dots from the caller (pair_dots: pair_dots_in), and run `next` inside the step
// (the software pipeline's K phase of the following pair, see kPipelinePairs; a no-op otherwise).
// valid_mask / valid_mask2: the visible tokens of st / st2.
template <int kBits, int kD, bool kQLo, int kCols, bool kPair, class Next = NoNext>
__device__ __forceinline__ void compute_tile(const uint8_t* st, const uint8_t* st2,
                                             const uint32_t (&aq)[kQSteps<kBits, kD>][4],
                                             float qsum, float kcorr, float scale_log2,
                                             uint32_t valid_mask, uint32_t valid_mask2,
                                             const LaneOffsets<Tile<kBits, kD>>& lo, int gid,
                                             int tig, Acc<kD, kCols>& acc,
                                             const float (&pair_dots_in)[4], Next next = {}) {
  using Tr = Tile<kBits, kD>;
  static_assert(!kPair || (kCols == 1 && kRaw<kBits>), "pairs: 2/4 bits, groups of at most 4");
  constexpr bool kSwap = kPair;  // pairs run the swapped K phase
  // dots[i]: the lane's 4 raw dots, value i = 2j + e of n-tile j (see below).
  float dots[4];
  if constexpr (kSwap) {  // value i: tile i / 2, token row gid + 8 (i % 2), head tig
#pragma unroll
    for (int i = 0; i < 4; ++i)
      dots[i] = pair_dots_in[i];
    if constexpr (PMKV_DECODE_NEXT_AT == 0) next();
  } else if constexpr (kRaw<kBits>) {
    int si[2][4];
    k_phase_int<kBits, kD>(st, aq, lo, si);
    // Q . code = 256 hi + lo: |.| < 2^26, exact in int32, rounded once to fp32.
#pragma unroll
    for (int i = 0; i < 4; ++i)
      dots[i] = __int2float_rn(si[i / 2][i % 2] * 256 + si[i / 2][2 + i % 2]);
  } else {
    float s_acc[2][4];
    k_phase<kBits, kD>(st, aq, lo, s_acc);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      dots[i] = kQLo ? s_acc[i / 2][i % 2] + s_acc[i / 2][2 + i % 2] : s_acc[i / 2][i % 2];
  }
  // ---- scores of this lane's 4 tokens: value i = 2j + e is token sigma(8j + 2 tig + e), whose
  // params sit at position 8j + 2 tig + e.
  // K params; V params kTile * kPar bytes after.
  // Swap: kp[j] / vp[j] hold tile j's rows gid (x, y) and gid + 8 (z, w), the same indexing.
  const uint8_t* par = st + lo.params;
  const uint8_t* par1 = kSwap ? st2 + lo.params : par + 8 * Tr::kPar;
  const float4 kp[2] = {params4<Tr::kPar>(par), params4<Tr::kPar>(par1)};
  // Raw codes: v_scale comes times 2^kRawPScaleLog2, as P' enters their V phase (small_raw).
  constexpr int kVScaleLog2 = kRaw<kBits> ? kRawPScaleLog2 : 0;
  const float4 vp[2] = {params4<Tr::kPar, kVScaleLog2>(par + kTile * Tr::kPar),
                        params4<Tr::kPar, kVScaleLog2>(par1 + kTile * Tr::kPar)};
  float s[4];
  float tmax = -INFINITY;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int j = i / 2, e = i % 2;
    const bool valid = ((kSwap && i >= 2 ? valid_mask2 : valid_mask) & lo.vbit[i]) != 0u;
    const float ksc = e ? kp[j].z : kp[j].x, kz = e ? kp[j].w : kp[j].y;
    // dot - kcorr = sum q code (2/4 bits: in units of 2^-E, kcorr = 0 and qsum = sum Q, see
    // load_q_int; 8/16 bits: see kKHalf).
    const float raw = fmaf(ksc, dots[i] - kcorr, -kz * qsum);
    // 2/4 bits keep the scores unscaled: the scale enters once in each exponent's FFMA (exps)
    // and the max test, instead of a multiply a score.
    s[i] = valid ? (kVHalf<kBits> ? raw * scale_log2 : raw) : -INFINITY;
    tmax = fmaxf(tmax, s[i]);
  }
  // Rescales the state to the running max m_new (>= acc.m) of the lane's head. acc.m is the same
  // on the 4 lanes of a head (tig; 8 with pairs), and they move it together.
  auto move_max = [&](float m_new) {
    const float alpha = ex2(acc.m - m_new);
    // The lane's O^T columns 2 tig, 2 tig + 1 belong to heads h0, h0 + 1 (see Acc).
    // Swap: both columns are the lane's own head tig.
    const int h0 = kCols == 1 ? 2 * (tig & 1) : 2 * tig;
    const float a0 = kSwap ? alpha : __shfl_sync(0xffffffffu, alpha, 4 * h0);
    const float a1 = kSwap ? alpha : __shfl_sync(0xffffffffu, alpha, 4 * h0 + 4);
#pragma unroll
    for (int mt = 0; mt < kD / 16; ++mt) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        acc.o[mt][c][0] *= a0;
        acc.o[mt][c][1] *= a1;
        acc.o[mt][c][2] *= a0;
        acc.o[mt][c][3] *= a1;
      }
    }
    acc.l *= alpha;
    acc.z *= alpha;
    acc.m = m_new;
  };
  // Masked tokens: p = 0; tokens past nvalid also have zero V params (see issue_tile), tokens
  // before the window have real ones: P' and the zero term are 0 either way.
  float pe[4], pp[4];
  auto exps = [&] {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      pe[i] = ex2(kVHalf<kBits> ? s[i] - acc.m : fmaf(s[i], scale_log2, -acc.m));
      pp[i] = pe[i] * (i % 2 ? vp[i / 2].z : vp[i / 2].x);  // raw codes: times 2^80
    }
  };
  if constexpr (!kVHalf<kBits>) {
    // The running max moves only when a score passes it by more than kMaxSlack (log2 units): p
    // stays below 2^kMaxSlack, and most tiles skip the lanes' max reduction and the rescale.
    tmax *= scale_log2;  // the scores are unscaled here (see s)
    if (__any_sync(0xffffffffu, tmax > acc.m + kMaxSlack)) {
      if constexpr (kSwap) {  // the 8 lanes of head tig
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 4));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 8));
      } else {
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
      }
      if constexpr (kPair) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 16));
      move_max(fmaxf(acc.m, tmax));
    }
    if constexpr (kSwap && PMKV_DECODE_NEXT_AT == 1) next();
    exps();
  } else {
    // fp16 P' (see kVHalf): the reference acc.m is a running max of s + log2(v_scale), moved
    // when some P' = 2^(s - m) v_scale passes kPHalfMax, to where the largest P' is about 1.
    exps();
    float pmax = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      pmax = fmaxf(pmax, pp[i]);
    if (__any_sync(0xffffffffu, !(pmax <= kPHalfMax))) {  // also +inf: the first tile
      float xmax = -INFINITY;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        xmax = fmaxf(xmax, s[i] + __log2f(i % 2 ? vp[i / 2].z : vp[i / 2].x));
      xmax = fmaxf(xmax, __shfl_xor_sync(0xffffffffu, xmax, 1));
      xmax = fmaxf(xmax, __shfl_xor_sync(0xffffffffu, xmax, 2));
      move_max(fmaxf(acc.m, xmax));
      exps();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int j = i / 2, e = i % 2;
    const float vsc = e ? vp[j].z : vp[j].x, vz = e ? vp[j].w : vp[j].y;
    acc.l += pe[i];
    acc.z = kRaw<kBits> ? fmaf(pe[i], -vz, acc.z) : fmaf(pe[i], fmaf(vsc, Tr::kMid, -vz), acc.z);
  }
  // ---- V phase. B column gid is the lane's own K-phase row (hi part) or, for kCols = 1 and gid >=
  // 4, the lo part of head gid - 4: the lane's own (its rows repeat the group's q).
  if constexpr (kSwap) {
    // P' of (token row r, head tig) as the bf16x2 (hi, lo): row r, columns 2 tig and 2 tig + 1 of
    // an 8x8 matrix per 8 rows; transposed, the lane holds P' of rows 2 tig, 2 tig + 1 in column
    // gid: the V phase's B fragment (column 2h: head h's hi parts, 2h + 1: its lo parts).
    // hi: P' truncated to bf16 (one AND), lo: the exact rest rounded to bf16, so P' = hi + lo
    // to 2^-17 of P' (2^-18 with a rounded hi, one instruction more a value).
    uint32_t pk[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float h = __uint_as_float(__float_as_uint(pp[i]) & 0xffff0000u);
      pk[i] = pack_bf16(h, pp[i] - h);
    }
    const uint32_t b1[1][2] = {{movmatrix_trans(pk[0]), movmatrix_trans(pk[1])}};
    const uint32_t b2[1][2] = {{movmatrix_trans(pk[2]), movmatrix_trans(pk[3])}};
    v_phase<kBits, kD, kCols>(st, b1, lo, acc);
    v_phase<kBits, kD, kCols>(st2, b2, lo, acc);
    return;
  }
  uint32_t hi0, lo0, hi1, lo1;
  if constexpr (kVHalf<kBits>) {
    split_f16(pp[0], pp[1], hi0, lo0);
    split_f16(pp[2], pp[3], hi1, lo1);
  } else {
    split_bf16(pp[0], pp[1], hi0, lo0);
    split_bf16(pp[2], pp[3], hi1, lo1);
  }
  uint32_t bp[kCols][2];
  if constexpr (kCols == 1) {  // lanes gid >= 4 score head gid - 4 (see load_q's call)
    bp[0][0] = gid < 4 ? hi0 : lo0;
    bp[0][1] = gid < 4 ? hi1 : lo1;
  } else {
    bp[0][0] = hi0;
    bp[0][1] = hi1;
    bp[1][0] = lo0;
    bp[1][1] = lo1;
  }
  v_phase<kBits, kD, kCols>(st, bp, lo, acc);
}

// The lane's kN consecutive elements of q at src as fp32, in 16-byte loads (decode.h: q is 16-byte
// aligned; src sits at a multiple of kN elements, kN * sizeof(TQ) a multiple of 16): a quarter
// (fp32) or an eighth (bf16) of the load instructions on the path from the wait to the first tile.
template <int kN, typename TQ>
__device__ __forceinline__ void load_q_chunk(const TQ* src, float (&q)[kN]) {
  static_assert(kN * sizeof(TQ) % 16 == 0, "whole 16-byte loads");
  if constexpr (sizeof(TQ) == 4) {
#pragma unroll
    for (int i = 0; i < kN / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      q[4 * i] = v.x;
      q[4 * i + 1] = v.y;
      q[4 * i + 2] = v.z;
      q[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kN / 8; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(src)[i];
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
        q[8 * i + 2 * j] = f.x;
        q[8 * i + 2 * j + 1] = f.y;
      }
    }
  }
}

// The q rows of a KV head's query heads as K-phase A fragments (row gid = query head gid of the
// group; fp32 q: rows gid + 8 hold the residual q - hi(q), bf16 q: an opaque copy of hi(q), whose
// scores are not read: zeros there are constants that ptxas re-creates with MOVs before every
// mma), sum(q) of the lane's head and kcorr = kKOffset * sum(q~), q~ what the fragments hold (hi +
// lo: the correction must match the mma's operand, not q, or the offset times the split error
// would remain). 8/16 bits only (2/4 bits: load_q_int): fp16, and q is first scaled by 2^-s so
// that the head's largest |q| is at most 2^14 (exact; fp16 ends at 65504): qscale = 2^s goes into
// the score scale. Returns qscale.
template <int kBits, int kD, typename TQ>
__device__ __forceinline__ float load_q(const KernelParams& p, int seq, int kvh, int head, int tig,
                                        uint32_t (&aq)[kD / 16][4], float& qsum, float& kcorr) {
  static_assert(kKHalf<kBits>, "2/4 bits: load_q_int");
  qsum = 0.0f;
  kcorr = 0.0f;
#pragma unroll
  for (int kt = 0; kt < kD / 16; ++kt)
    aq[kt][0] = aq[kt][1] = aq[kt][2] = aq[kt][3] = 0u;
  float qa[kD / 8], qb[kD / 8];
#pragma unroll
  for (int pi = 0; pi < kD / 8; ++pi)
    qa[pi] = qb[pi] = 0.0f;
  const bool has_head = head < p.group;
  if (has_head) {
    const int64_t row =
        ((int64_t{seq} * p.num_kv_heads + kvh) * p.group + head) * kD + tig * (kD / 4);
    float q[kD / 4];
    load_q_chunk(static_cast<const TQ*>(p.q) + row, q);
#pragma unroll
    for (int pi = 0; pi < kD / 8; ++pi) {
      qa[pi] = q[pair_dim_lo<kBits>(pi)];
      qb[pi] = q[pair_dim_hi<kBits>(pi)];
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int pi = 0; pi < kD / 8; ++pi)
    amax = fmaxf(amax, fmaxf(fabsf(qa[pi]), fabsf(qb[pi])));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  trace_time(p, 18, threadIdx.x == 0);
  int e = 0;
  frexpf(amax, &e);  // amax < 2^e
  const int sh = e > 14 ? e - 14 : 0;
  const float qscale = ldexpf(1.0f, sh), down = ldexpf(1.0f, -sh);
  // Lanes without a head keep zero fragments (constants; a branch, not selects: the register
  // allocation of the whole kernel depends on it).
#pragma unroll
  for (int pi = 0; pi < kD / 8 && has_head; ++pi) {
    float a = qa[pi] * down, b = qb[pi] * down;
    qsum += a + b;
    uint32_t hi, lo;
    split_f16(a, b, hi, lo);
    const float2 h = __half22float2(as_f16x2(hi));
    float2 l = __half22float2(as_f16x2(lo));
    if constexpr (sizeof(TQ) != 4) l = make_float2(0.0f, 0.0f);  // bf16 q: no lo rows
    kcorr += kKOffset<kBits> * ((h.x + l.x) + (h.y + l.y));
    aq[pi / 2][2 * (pi % 2)] = hi;
    aq[pi / 2][2 * (pi % 2) + 1] =
        sizeof(TQ) == 4 ? lo : static_cast<uint32_t>(opaque(static_cast<int>(hi)));
  }
  qsum += __shfl_xor_sync(0xffffffffu, qsum, 1);
  qsum += __shfl_xor_sync(0xffffffffu, qsum, 2);
  kcorr += __shfl_xor_sync(0xffffffffu, kcorr, 1);
  kcorr += __shfl_xor_sync(0xffffffffu, kcorr, 2);
  return qscale;
}

// 2/4 bits (k_phase_int): the q row of the lane's head (row gid: hi limbs, row gid + 8: lo limbs)
// in 16-bit fixed point, Q = rint(q u) with |Q| <= 32639 (= 127 * 256 + 127, what two int8 limbs
// hold). bf16 q: u = 2^E, the largest power of two that fits, exact for elements down to 2^-7 of
// the head's largest (8 significant bits). fp32 q: u = 32639 / max |q|, an absolute error of 2^-16
// of the head's largest |q| (the GPU test measured up to 3.4e-4 relative L2 in the output on its
// data, 5.4e-4 with a power-of-two u; bf16 output rounding alone is ~2e-3). Q = 256 hi + lo, lo in
// [-128, 127]. qsum = sum Q (exact in fp32) and the return value 1 / u, the unit of the dots, for
// the score scale. kcorr: no offset, 0. Swap (k_phase_swap): B fragments instead, aq[s][0] /
// aq[s][1] = b0 / b1 of k-step s for column gid: head gid / 2 (pass it as head), its hi limbs for
// even gid, lo for odd; qsum and the return value are those of head tig (the lane's scores).
template <int kBits, int kD, typename TQ, bool kSwap = false>
__device__ __forceinline__ float load_q_int(const KernelParams& p, int seq, int kvh, int head,
                                            int tig, uint32_t (&aq)[kD / 32][4], float& qsum,
                                            float& kcorr) {
  constexpr int kN = kD / 4;                          // the lane's dims
  constexpr int kG = kSwap ? kSwapGroups<kBits> : 1;  // code groups of the K phase
  float q[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i)
    q[i] = 0.0f;
  if (head < p.group) {
    const int64_t row = ((int64_t{seq} * p.num_kv_heads + kvh) * p.group + head) * kD + tig * kN;
    load_q_chunk(static_cast<const TQ*>(p.q) + row, q);
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kN; ++i)
    amax = fmaxf(amax, fabsf(q[i]));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  trace_time(p, 18, threadIdx.x == 0);
  int e = 0;
  frexpf(amax, &e);  // amax < 2^e, so amax 2^(15 - e) < 2^15
  int E = 15 - e;
  if (ldexpf(amax, E) > 32639.0f) --E;
  // bf16 q: a power of two keeps it exact. fp32 q: the whole range (a third less rounding error).
  const float up = sizeof(TQ) == 4 && amax > 0.0f ? 32639.0f / amax : ldexpf(1.0f, E);
  int isum = 0;
#pragma unroll
  for (int j = 0; j < kD / 16; ++j) {
    uint32_t hw = 0u, lw = 0u;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int Q = __float2int_rn(q[k_u8_dim<kBits, kD, kG>(j, b)] * up);
      const int hi = (Q + 128) >> 8, lo = Q - hi * 256;
      hw |= (static_cast<uint32_t>(hi) & 0xFFu) << (8 * b);
      lw |= (static_cast<uint32_t>(lo) & 0xFFu) << (8 * b);
      isum += Q;
    }
    if constexpr (kSwap) {
      aq[j / 2][j % 2] = (threadIdx.x >> 2) & 1 ? lw : hw;
    } else {
      aq[j / 2][2 * (j % 2)] = hw;      // a0 / a2: row gid, k 4 tig + b / 16 + 4 tig + b
      aq[j / 2][2 * (j % 2) + 1] = lw;  // a1 / a3: row gid + 8
    }
  }
  isum += __shfl_xor_sync(0xffffffffu, isum, 1);
  isum += __shfl_xor_sync(0xffffffffu, isum, 2);
  qsum = static_cast<float>(isum);
  kcorr = 0.0f;
  float unit = 1.0f / up;
  if constexpr (kSwap) {  // head tig's: a lane with gid = 2 tig; the dots carry the group factor
    qsum *= kGroupFactor<kBits, kG>;
    unit /= kGroupFactor<kBits, kG>;
    qsum = __shfl_sync(0xffffffffu, qsum, 8 * tig);
    unit = __shfl_sync(0xffffffffu, unit, 8 * tig);
  }
  return unit;
}

__device__ __forceinline__ void store_out(const KernelParams& p, int64_t o, float val) {
  if (p.out_dtype == DType::kF32) {
    static_cast<float*>(p.out)[o] = val;
  } else {
    static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16_rn(val);
  }
}

// Four consecutive outputs (o = their first index) as store_out does them.
__device__ __forceinline__ void store_out4(const KernelParams& p, int64_t o, float4 v) {
  store_out(p, o, v.x);
  store_out(p, o + 1, v.y);
  store_out(p, o + 2, v.z);
  store_out(p, o + 3, v.w);
}

// After a CTA has written its partial state of a (sequence, KV head) cut into several items: the
// CTA that finishes the last of them (over all bit-width launches of the layer) combines them,
// out = sum_i 2^(lse_i - max) o_i / sum_i 2^(lse_i - max), and resets the counter for the next
// launch. The fences order the partial stores before the count (writers) and the count before the
// loads (the merger); the loads go to L2. It runs at the tail of a launch, so it is built for
// latency: each thread takes 4 consecutive outputs (of one head) and folds the items into them
// in item order (online: a rescale when the running max moves, so the bytes are the same
// whichever CTA merges), kMergeBatch items' loads at a time, all independent of one another; no
// thread waits for another after the count. (Warps taking items and adding their sums through
// shared memory took the merging CTA ~2 us longer from its epilogue to its stores at batch 1:
// 5.0-5.7 against 3.1-3.9 us, bench/RESULTS.md, seventeenth session.)
inline constexpr int kMergeBatch = 8;

template <int kD, int kWarps>
__device__ __forceinline__ void merge_if_last(const KernelParams& p, const DecodeWorkItem& it,
                                              int kvh, uint8_t* smem) {
  constexpr int kThreads = kWarps * 32;
  const DecodeMergeItem mi = p.merges[p.layer->merge_begin + it.merge];
  int* counter = p.merge_counters + int64_t{it.merge} * p.num_kv_heads + kvh;
  int* flag = reinterpret_cast<int*>(smem);
  __threadfence();
  __syncthreads();  // also: every thread is done with the epilogue's shared memory
  if (threadIdx.x == 0) *flag = atomicAdd(counter, 1) == mi.num_items - 1;
  __syncthreads();
  if (*flag == 0) return;
  trace_time(p, 21, threadIdx.x == 0);
  __threadfence();
  const int G = p.group, H = p.num_kv_heads, n = mi.num_items;
  const int64_t slot0 = int64_t{mi.item_begin} * H + kvh;  // item i's slot: slot0 + i H
  const int64_t out0 = (int64_t{mi.seq} * H + kvh) * G * kD;
  for (int e = 4 * static_cast<int>(threadIdx.x); e < G * kD; e += 4 * kThreads) {
    const int h = e / kD;  // kD is a multiple of 4: the 4 outputs share a head
    float m = -INFINITY, den = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int i0 = 0; i0 < n; i0 += kMergeBatch) {
      float lse[kMergeBatch];
      float4 o[kMergeBatch];
#pragma unroll
      for (int b = 0; b < kMergeBatch; ++b) {
        const int64_t slot = slot0 + int64_t{i0 + b} * H;
        const bool in = i0 + b < n;
        lse[b] = in ? __ldcg(p.partial_lse + slot * G + h) : -INFINITY;
        o[b] = in ? __ldcg(reinterpret_cast<const float4*>(p.partial_o + slot * G * kD + e))
                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int b = 0; b < kMergeBatch; ++b) {
        // An item without a visible token has lse -inf (and zero outputs): weight 0.
        if (lse[b] > m) {
          const float a = exp2f(m - lse[b]);  // 0 while m is -inf
          den *= a;
          acc = make_float4(acc.x * a, acc.y * a, acc.z * a, acc.w * a);
          m = lse[b];
        }
        const float f = lse[b] > -INFINITY ? exp2f(lse[b] - m) : 0.0f;
        den += f;
        acc = make_float4(fmaf(f, o[b].x, acc.x), fmaf(f, o[b].y, acc.y), fmaf(f, o[b].z, acc.z),
                          fmaf(f, o[b].w, acc.w));
      }
    }
    if (den > 0.0f) acc = make_float4(acc.x / den, acc.y / den, acc.z / den, acc.w / den);
    store_out4(p, out0 + e, acc);  // no visible token in any item: zeros, as a direct item
  }
  if (threadIdx.x == 0) *counter = 0;
}

// The mask of a tile's visible tokens: [first, nvalid) (first > 0 only before the sliding window).
__device__ __forceinline__ uint32_t visible_tokens(int nvalid, int first) {
  return ((1u << nvalid) - 1u) & ~((1u << first) - 1u);
}

template <int kBits, int kD, typename TQ, int kCols, bool kDense>
__device__ __forceinline__ void run_item(const KernelParams& p, const DecodeWorkItem* items,
                                         const DecodeWorkItem& it, int item, uint8_t* smem) {
  using Tr = Tile<kBits, kD>;
  constexpr int kWarps = BitsConfig<kBits>::kWarps, kThreads = BitsConfig<kBits>::kThreads;
  constexpr bool kQLo = sizeof(TQ) == 4;
  constexpr bool kPair = kCols == 1 && kBits <= 4;  // two tiles a step, see compute_tile
  constexpr bool kSwap = kPair;                     // pairs run k_phase_swap
  constexpr int kStep = kPair ? 2 : 1;              // tiles (ring stages) a step
  constexpr int kSlots = Tr::kStages / kStep;       // steps the ring holds
  static_assert(Tr::kStages % kStep == 0, "pairs need an even ring");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int kvh = blockIdx.y;
  const kv::PageLayout L = kv::page_layout({p.num_kv_heads, kD, p.tokens16}, kBits);
  uint8_t* ring = smem + opaque(warp * Tr::kRingBytes);

  // This warp's contiguous tile range, located by the plan. Page info of the next page is loaded
  // one page ahead (its latency hides behind a tile's work); the consumer reads each tile's mask
  // of visible tokens from shared memory, written when the tile was issued (a constant for full
  // tiles: the consumer no longer builds it from counts, ~10 instructions a pair step).
  uint32_t* meta =
      reinterpret_cast<uint32_t*>(smem + kWarps * Tr::kRingBytes) + opaque(warp * kMaxStages);
  // 16 bits keep the old form, (valid tokens) | (first visible token) << 8, expanded by the
  // consumer: with the mask its one-CTA-an-SM points (16 x 1K-4K) ran 3.4% slower, the loop's
  // instruction count unchanged (bench/RESULTS.md, twenty-seventh session).
  constexpr bool kMetaCounts = kBits == 16;
  const bool lane0 = opaque(lane) == 0;
  const DecodeWorkItem* itg = items + item;  // per-warp fields: read from global, not a
  const int n_my = itg->warp_tiles[warp];    // local copy (dynamic index -> stack)
  int page = itg->warp_page[warp], tile = itg->warp_tile[warp], ntok = 0, next_tok = 0, lo = 0;
  // int32: an int64 here is sign-extended right at its load, which then waits out the load's
  // whole latency once a page (13% of the 16-bit loop's stall samples, ncu); widened at use.
  int32_t next_id = 0;
  const uint8_t* pptr = p.pool;
  if (n_my > 0) {
    ntok = p.page_tokens[page];
    pptr = p.pool + int64_t{p.page_ids[page]} * p.page_bytes;
    if (page + 1 < it.page_end) {
      next_tok = p.page_tokens[page + 1];
      next_id = p.page_ids[page + 1];
    }
    lo = warp == 0 ? it.lo_first : 0;
  }
  // The lane's offsets and the accumulators depend on nothing a kernel writes: set up before
  // the wait, off the critical path of a launch that starts early.
  const LaneOffsets<Tr> offs(L, lane, kSwap);
  trace_time(p, 16, threadIdx.x == 0);
  Acc<kD, kCols> acc;
#pragma unroll
  for (int mt = 0; mt < kD / 16; ++mt) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      acc.o[mt][c][0] = acc.o[mt][c][1] = acc.o[mt][c][2] = acc.o[mt][c][3] = 0.0f;
    }
  }
  acc.m = -INFINITY;
  acc.l = 0.0f;
  acc.z = 0.0f;
  // Everything above reads the plan and the page tables, which the host uploaded before the step's
  // kernels. q and the pages' contents (the new token's K and V) come from the kernels before
  // this one: launched with programmatic dependent launch (DecodeParams::pdl), the CTA gets here
  // while they may still run, and waits for them now.
  pdl_wait();
  trace_time(p, 15, threadIdx.x == 0);
  const int head_tok0 = kvh * L.tokens;  // head kvh's first row in a page
  // Issues the tile at (page, tile) into `slot`, then steps to the range's next tile.
  // 16 bits: params ({scale, zero}, 8 bytes a token) are a tile's smallest reads, 128 bytes each
  // of K and V away from its 8 KB of codes (the kernel at batch 16 x 4K ran 11% faster with their
  // copies dropped). Lanes 0 and 1 ask L2 for the next kPrefetchTiles tiles' params of the page in
  // one bulk request each, so the tiles' copies hit L2: 2-3% at one CTA an SM (bench/RESULTS.md).
  // The other bit-widths are instruction-bound and lost 1-7% to it. pf_end: the page's first
  // token (of this head) not yet asked for.
  constexpr int kPrefetchTiles = 16;
  int pf_end = 0;
  // Steps to the range's next page (and past empty ones), and loads the one after it.
  auto next_page = [&] {
    tile = 0;
    if constexpr (kBits == 16) pf_end = 0;
    ++page;
    ntok = next_tok;
    pptr = p.pool + int64_t{next_id} * p.page_bytes;
    while (ntok == 0 && page + 1 < it.page_end) {  // empty pages (rare)
      ++page;
      ntok = p.page_tokens[page];
      pptr = p.pool + int64_t{p.page_ids[page]} * p.page_bytes;
    }
    if (page + 1 < it.page_end) {
      next_tok = p.page_tokens[page + 1];
      next_id = p.page_ids[page + 1];
    }
  };
  auto issue_next = [&](int slot) {
    if (kBits == 16 && tile * kTile >= pf_end) {  // constant false for the other bit-widths
      pf_end = min(tile * kTile + kPrefetchTiles * kTile, (ntok + kTile - 1) & ~(kTile - 1));
      if (lane < 2) {
        const int64_t first = static_cast<int64_t>(head_tok0 + tile * kTile) * Tr::kPar;
        prefetch_l2_bulk(pptr + (lane == 0 ? L.k_params : L.v_params) + first,
                         static_cast<uint32_t>(pf_end - tile * kTile) * Tr::kPar);
      }
    }
    const int nvalid = min(kTile, ntok - tile * kTile);
    issue_tile<Tr>(ring + slot * Tr::kStage, pptr, L, offs, head_tok0 + tile * kTile, nvalid);
    if (lane0) meta[slot] = kMetaCounts ? nvalid | (lo << 8) : visible_tokens(nvalid, lo);
    lo = 0;
    if (++tile * kTile >= ntok) next_page();
  };
  // Issues the tiles of ring slot `slot` (kStep stages); past the range's end, pairs get empty
  // stages (no copies, zero params, 0 valid tokens) so the step's second tile is all masked.
  int issued = 0;
  auto issue_slot = [&](int slot) {
    if constexpr (kPair && kFullPairs) {
      if (issued + 2 <= n_my && (tile + 2) * kTile <= ntok) {  // two full tiles of this page
        issue_full_pair<Tr>(ring + 2 * slot * Tr::kStage, pptr, L, offs, head_tok0 + tile * kTile);
        if (lane0) {
          meta[2 * slot] = visible_tokens(kTile, lo);
          meta[2 * slot + 1] = visible_tokens(kTile, 0);
        }
        lo = 0;
        issued += 2;
        tile += 2;
        if (tile * kTile >= ntok) next_page();
        return;
      }
    }
#pragma unroll
    for (int i = 0; i < kStep; ++i) {
      const int stage = slot * kStep + i;
      if (issued < n_my) {
        issue_next(stage);
        ++issued;
      } else if (kPair) {
        issue_tile<Tr>(ring + stage * Tr::kStage, pptr, L, offs, 0, 0);
        if (lane0) meta[stage] = 0;
      }
    }
  };
  auto issue_first_slots = [&](int from, int to) {
#pragma unroll
    for (int s = from; s < to; ++s) {
      if (s * kStep < n_my) issue_slot(s);
      cp_async_commit();
    }
  };
  // 16 bits: the ring's first copies go out before q is loaded, so that their latency and q's
  // (L2, then the fp16 split: ~2.5 us a CTA at batch 1, the probe's slot 2) overlap; at batch 1
  // the first tile used to arrive ~1-1.5 us after q. The 2-bit kernel lost 5-6% with all of them
  // first (bench/RESULTS.md, sixth session); its default variant issues one (early_slots).
  constexpr int kEarlySlots = early_slots<kBits, kCols, kDense>(kSlots - 1);
  constexpr bool kCopiesFirst = kEarlySlots > 0;
  constexpr bool kAllEarly = kEarlySlots == kSlots - 1;  // every first slot issued before q
  if constexpr (kCopiesFirst) issue_first_slots(0, kEarlySlots);
  trace_time(p, 17, threadIdx.x == 0 && kAllEarly);
  uint32_t aq[kQSteps<kBits, kD>][4];
  float qsum, kcorr;
  // One column tile (groups of at most 4): rows 4-7 repeat the group's q, so lanes gid >= 4 hold
  // head gid - 4's scores too (pairs: of the second tile; else the same tile: their softmax state
  // is a copy, unused after the loop, and they split their own P' lo parts, see compute_tile).
  const int q_head = kSwap ? gid / 2 : kCols == 1 ? gid % 4 : gid;
  float q_unit;
  if constexpr (kRaw<kBits>) {
    q_unit = load_q_int<kBits, kD, TQ, kSwap>(p, it.seq, kvh, q_head, tig, aq, qsum, kcorr);
  } else {
    q_unit = load_q<kBits, kD, TQ>(p, it.seq, kvh, q_head, tig, aq, qsum, kcorr);
  }
  const float score_scale = p.scale_log2 * q_unit;
  trace_time(p, 2, threadIdx.x == 0);
  if constexpr (!kAllEarly) issue_first_slots(kEarlySlots, kSlots - 1);
  trace_time(p, 17, threadIdx.x == 0 && !kAllEarly);
  int slot_c = 0, slot_p = kSlots - 1;
  // Software pipeline (pairs, kPipelinePairs): step i finishes pair i with the dots that step
  // i - 1 computed, and computes pair i + 1's. So it waits for the ring's slots i and i + 1, and
  // it refills slot i - 1 (emptied by step i - 1): kSlots >= 3 keeps those three apart. Past the
  // range's end the "next" slot holds stale tiles, whose dots are never used.
  constexpr bool kPipe = kPair && kPipelinePairs;
  static_assert(!kPipe || kSlots >= 3, "the pipeline reads two slots while a third is refilled");
  float dots[4];  // the pipeline's: the K phase of the pair the next step finishes
  if constexpr (kPipe) {
    if (n_my > 0) {
      cp_async_wait<kSlots - 2>();  // slot 0
      __syncwarp();
      trace_time(p, 3, threadIdx.x == 0);
      pair_dots<kBits, kD>(ring, ring + Tr::kStage, aq, offs, dots);
    }
  }
  for (int k = 0; k < n_my; k += kStep) {
    if (issued < n_my) issue_slot(slot_p);
    cp_async_commit();
    cp_async_wait<kPipe ? kSlots - 2 : kSlots - 1>();  // slot c (pipeline: and c + 1)
    __syncwarp();
    if constexpr (!kPipe) trace_time(p, 3, threadIdx.x == 0 && k == 0);
    // The next slot (the pipeline reads it now; the others step to it at the end).
    const int slot_n = slot_c + 1 == kSlots ? 0 : slot_c + 1;
    const uint8_t* st = ring + slot_c * kStep * Tr::kStage;
    const uint32_t valid_mask =
        kMetaCounts ? visible_tokens(meta[slot_c * kStep] & 0xFF, meta[slot_c * kStep] >> 8)
                    : meta[slot_c * kStep];
    const uint32_t valid_mask2 = kPair ? meta[slot_c * kStep + 1] : 0u;
    if constexpr (kPipe) {
      const uint8_t* sn = ring + slot_n * kStep * Tr::kStage;
      float next_dots[4];
      compute_tile<kBits, kD, kQLo, kCols, kPair>(
          st, st + Tr::kStage, aq, qsum, kcorr, score_scale, valid_mask, valid_mask2, offs, gid,
          tig, acc, dots, [&] { pair_dots<kBits, kD>(sn, sn + Tr::kStage, aq, offs, next_dots); });
#pragma unroll
      for (int i = 0; i < 4; ++i)
        dots[i] = next_dots[i];
    } else {
      float step_dots[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // pairs: the K phase of this step
#ifndef PMKV_DECODE_COPY_ONLY
      if constexpr (kPair) pair_dots<kBits, kD>(st, st + Tr::kStage, aq, offs, step_dots);
      compute_tile<kBits, kD, kQLo, kCols, kPair>(st, st + Tr::kStage, aq, qsum, kcorr, score_scale,
                                                  valid_mask, valid_mask2, offs, gid, tig, acc,
                                                  step_dots);
#else
      // The copy-only probe (a build-time knob with PMKV_DECODE_PIPELINE=0, never in a normal
      // build; its outputs are wrong): the ring moves every tile and nothing is computed, which
      // times the memory side of the loop alone (bench/RESULTS.md, twenty-second session).
      acc.l += static_cast<float>(valid_mask + valid_mask2) + step_dots[0];
#endif
    }
    __syncwarp();
    // Without the pipeline, slot_n is dead until here and recomputed: kept live across the
    // tile it changed the code ptxas makes for those kernels.
    slot_c = kPipe ? slot_n : (slot_c + 1 == kSlots ? 0 : slot_c + 1);
    slot_p = slot_p + 1 == kSlots ? 0 : slot_p + 1;
  }
  cp_async_wait<0>();
  trace_time(p, warp < 4 ? 4 + warp : 7 + warp, lane == 0);

  // ---- combine the warps' states, write the output (direct) or the partial state.
  if constexpr (kSwap) {  // head tig: lanes tig + 4 gid
    acc.l += __shfl_xor_sync(0xffffffffu, acc.l, 4);
    acc.l += __shfl_xor_sync(0xffffffffu, acc.l, 8);
    acc.z += __shfl_xor_sync(0xffffffffu, acc.z, 4);
    acc.z += __shfl_xor_sync(0xffffffffu, acc.z, 8);
  } else {
    acc.l += __shfl_xor_sync(0xffffffffu, acc.l, 1);
    acc.l += __shfl_xor_sync(0xffffffffu, acc.l, 2);
    acc.z += __shfl_xor_sync(0xffffffffu, acc.z, 1);
    acc.z += __shfl_xor_sync(0xffffffffu, acc.z, 2);
  }
  if constexpr (kPair) {  // the head's other 4 lanes
    acc.l += __shfl_xor_sync(0xffffffffu, acc.l, 16);
    acc.z += __shfl_xor_sync(0xffffffffu, acc.z, 16);
  }
  __syncthreads();  // every warp is done with its ring
  trace_time(p, 19, threadIdx.x == 0);
  const int G = p.group;
  static_assert(Tr::kSmemBytes >= kWarps * (kDecodeMaxGroup * kD + 3 * kDecodeMaxGroup) * 4,
                "the epilogue and the merge reuse the rings");
  float* sm_o = reinterpret_cast<float*>(smem);             // [kWarps][G][kD]
  float* sm_m = sm_o + kWarps * G * kD;                     // [kWarps][G]
  float* sm_l = sm_m + kWarps * G;                          // [kWarps][G]
  float* sm_z = sm_l + kWarps * G;                          // [kWarps][G]
  if (kSwap ? gid == 0 && tig < G : gid < G && tig == 0) {  // the lane's head: gid (swap: tig)
    const int h = kSwap ? tig : gid;
    sm_m[warp * G + h] = acc.m;
    sm_l[warp * G + h] = acc.l;
    sm_z[warp * G + h] = acc.z;
  }
  // O^T: columns 2 tig, 2 tig + 1 are heads h0, h0 + 1; add the lo columns to the hi ones (kCols 1:
  // they sit in lane ^ 2; kCols 2: in the second column tile).
  const int h0 = kCols == 1 ? 2 * (tig & 1) : 2 * tig;
#pragma unroll
  for (int mt = 0; mt < kD / 16 && kSwap; ++mt) {  // columns 2 tig, 2 tig + 1: head tig hi, lo
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sc = raw_unit(v_pos<kBits>(2 * mt + r));
      const float v = (acc.o[mt][0][2 * r] + acc.o[mt][0][2 * r + 1]) * sc;
      if (tig < G) sm_o[(warp * G + tig) * kD + gid * (kD / 8) + 2 * mt + r] = v;
    }
  }
#pragma unroll
  for (int mt = 0; mt < kD / 16 && !kSwap; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // Row gid of m-tile mt is code 2 mt of the lane's chunk, row gid + 8 code 2 mt + 1.
      float v[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        v[c] = acc.o[mt][c][i];
        if constexpr (kRaw<kBits>) v[c] *= raw_unit(v_pos<kBits>(2 * mt + (i >> 1)));
      }
      float v0 = v[0];
      if constexpr (kCols == 1) {
        v0 += __shfl_xor_sync(0xffffffffu, v0, 2);
      } else {
        v0 += v[1];
      }
      const int h = h0 + (i & 1);
      const int d = gid * (kD / 8) + 2 * mt + (i >> 1);
      if ((kCols == 2 || tig < 2) && h < G) sm_o[(warp * G + h) * kD + d] = v0;
    }
  }
  __syncthreads();
  trace_time(p, 20, threadIdx.x == 0);
  const int64_t out_row = (int64_t{it.seq} * p.num_kv_heads + kvh) * G;  // first query head
  const int64_t slot = int64_t{item} * p.num_kv_heads + kvh;
  if constexpr (kSwap) {
    // 2/4-bit pairs: each thread combines the warps' states into 4 consecutive outputs of one
    // head (3-9% faster at batch 1-16 than one output at a time; the 8/16-bit kernels measured
    // 1-2.5% slower with it, through their codegen: bench/RESULTS.md, seventeenth session).
    for (int e = 4 * static_cast<int>(threadIdx.x); e < G * kD; e += 4 * kThreads) {
      const int h = e / kD, d = e % kD;
      float mw[kWarps];
      float mx = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        mw[w] = sm_m[w * G + h];
        mx = fmaxf(mx, mw[w]);
      }
      float den = 0.0f;
      float4 num = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = mw[w] > -INFINITY ? ex2(mw[w] - mx) : 0.0f;  // a warp without tokens: 0
        const float z = sm_z[w * G + h];
        den += sm_l[w * G + h] * f;
        const float4 o = *reinterpret_cast<const float4*>(sm_o + (w * G + h) * kD + d);
        num = make_float4(fmaf(o.x + z, f, num.x), fmaf(o.y + z, f, num.y), fmaf(o.z + z, f, num.z),
                          fmaf(o.w + z, f, num.w));
      }
      // mx -inf: an item with no visible token (zeros; as a partial, lse -inf: weight 0).
      const float4 val = mx == -INFINITY
                             ? make_float4(0.0f, 0.0f, 0.0f, 0.0f)
                             : make_float4(num.x / den, num.y / den, num.z / den, num.w / den);
      if (it.direct) {
        store_out4(p, (out_row + h) * kD + d, val);
      } else {
        *reinterpret_cast<float4*>(p.partial_o + (slot * G + h) * kD + d) = val;
        if (d == 0) p.partial_lse[slot * G + h] = mx + log2f(den);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < G * kD; idx += kThreads) {
      const int h = idx / kD, d = idx % kD;
      float mx = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w)
        mx = fmaxf(mx, sm_m[w * G + h]);
      float den = 0.0f, num = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = ex2(sm_m[w * G + h] - mx);
        den += sm_l[w * G + h] * f;
        num += (sm_o[(w * G + h) * kD + d] + sm_z[w * G + h]) * f;
      }
      const float val = mx == -INFINITY ? 0.0f : num / den;  // -inf: an empty item (no token)
      if (it.direct) {
        store_out(p, (out_row + h) * kD + d, val);
      } else {
        p.partial_o[(slot * G + h) * kD + d] = val;
        if (d == 0) p.partial_lse[slot * G + h] = mx + log2f(den);
      }
    }
  }
  trace_time(p, 8, threadIdx.x == 0);
  if (!it.direct) merge_if_last<kD, kWarps>(p, it, kvh, smem);
  trace_time(p, 9, threadIdx.x == 0);
  if (threadIdx.x == 0) trace_put(p, 10, uint64_t(item) | uint64_t(it.num_tiles) << 32);
}

// One launch per bit-width present. The layer's list of items of this bit-width is read from the
// device; CTA x takes list entries x, x + gridDim.x, ... (a launch of fixed size serves any count,
// which a CUDA graph needs). kCols: 1 for groups of at most 4 query heads, 2 for 5 to 8 (see Acc).
// kDense: the dense variant's launch bounds (BitsConfig::kCtasPerSmDense) and its early slots
// (early_slots); the arithmetic is the same.
template <int kBits, int kD, typename TQ, int kCols, bool kDense = false>
__global__ void __launch_bounds__(BitsConfig<kBits>::kThreads,
                                  kDense       ? BitsConfig<kBits>::kCtasPerSmDense
                                  : kCols == 1 ? BitsConfig<kBits>::kCtasPerSm
                                               : BitsConfig<kBits>::kCtasPerSmWide)
    decode_split_kernel(const KernelParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  pdl_trigger();  // a following o projection may start streaming its weights
  trace_time(p, 1, threadIdx.x == 0);
#ifdef PMKV_DECODE_TRACE
  if (threadIdx.x == 0) {
    uint32_t smid;
    asm("mov.u32 %0, %%smid;" : "=r"(smid));
    trace_put(p, 0, smid);
  }
#endif
  constexpr int kB = kBits == 16 ? 0 : kBits == 8 ? 1 : kBits == 4 ? 2 : 3;  // decode_bits_index
  const int count = p.layer->bits_count[kB];
  const int32_t* ids = p.bit_items + p.layer->bits_begin[kB];
  const DecodeWorkItem* items = p.items + p.layer->item_begin;
  for (int i = blockIdx.x; i < count; i += gridDim.x) {
    if (i != static_cast<int>(blockIdx.x)) __syncthreads();  // the last item's epilogue used smem
    const int item = ids[i];
    const DecodeWorkItem it = items[item];
    run_item<kBits, kD, TQ, kCols, kDense>(p, items, it, item, smem);
  }
  // A CTA without an item waits too: a grid must not complete before the kernels it follows, or
  // a dependent launch after it (the next bit-width's, the o projection) could pass its own wait
  // while those still run. (A no-op after run_item's wait, and without PDL.)
  pdl_wait();
}

}  // namespace pmkv::kernels::decode_detail
