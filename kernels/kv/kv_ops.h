#pragma once
// Byte work on the KV pool besides attention, bit-exact with the CPU backend
// (engine/backend/cpu/kv_page_ops.cpp, engine/kv/kv_codec.cpp):
//  - launch_kv_write: quantizes new K/V rows into their page slots (kv::quantize_group);
//  - launch_requant: a batch of window flushes (kv::RequantOp, apply_requant);
//  - launch_demote: a batch of in-place demotions (kv::DemoteOp, apply_demote).
// Ops inside one batch must be independent (no op reads or writes a page another op writes);
// the KvCacheManager guarantees that for each flush set and each demotion wave.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernels_common.h"
#include "kernels/kv_page_layout.h"

namespace pmkv::kernels {

struct KvPoolRef {
  void* base = nullptr;  // page p starts at base + p * page_bytes (16-byte aligned)
  int64_t page_bytes = 0;
  kv::PageGeometry geometry;
};

// Field for field the layout of pmkv::kv::RequantOp (engine/kv/page_ops.h): re-codes `count`
// tokens from slots [src_slot, ...) of page `src` (src_bits) into slots [dst_slot, ...) of page
// `dst` at dst_bits <= src_bits by repeated integer halving. src != dst.
struct KvRequantOp {
  int32_t src;
  int32_t src_bits;
  int32_t src_slot;
  int32_t dst;
  int32_t dst_bits;
  int32_t dst_slot;
  int32_t count;
};

// Field for field the layout of pmkv::kv::DemoteOp: the first tokens[i] tokens of pages
// src[0..num_src) (from_bits, token order) become the first sum(tokens) tokens of page src[0] at
// to_bits; the rest of src[0] is zeroed.
struct KvDemoteOp {
  static constexpr int kMaxSources = 8;
  int32_t src[kMaxSources];
  int32_t tokens[kMaxSources];
  int32_t num_src;
  int32_t from_bits;
  int32_t to_bits;
};

// One launch for the batch; ops: device array [num_ops].
cudaError_t launch_requant(const KvPoolRef& pool, const KvRequantOp* ops, int32_t num_ops,
                           cudaStream_t stream);

// One launch for the batch (one CTA per op); ops: device array [num_ops]. Each CTA stages the
// used bytes of src[0] at from_bits in shared memory before it writes src[0], so the pool's
// page_used_bytes must fit the device's per-block shared memory (cudaErrorInvalidValue if not).
cudaError_t launch_demote(const KvPoolRef& pool, const KvDemoteOp* ops, int32_t num_ops,
                          cudaStream_t stream);

// The same two launches for a CUDA graph: the batch's {first, count} is read from `range` (device,
// two int32) when the kernel runs, and `ctas` CTAs loop over the ops (count 0: they exit), so one
// captured launch serves every step.
cudaError_t launch_requant_ranged(const KvPoolRef& pool, const KvRequantOp* ops,
                                  const int32_t* range, int32_t ctas, cudaStream_t stream);
cudaError_t launch_demote_ranged(const KvPoolRef& pool, const KvDemoteOp* ops, const int32_t* range,
                                 int32_t ctas, cudaStream_t stream);

struct KvWriteParams {
  KvPoolRef pool;
  int32_t num_rows = 0;
  const void* k = nullptr;  // [num_rows, num_kv_heads * head_dim] with row stride k_stride
  const void* v = nullptr;  // same with v_stride
  int64_t k_stride = 0;     // elements
  int64_t v_stride = 0;
  DType dtype = DType::kF32;          // of k and v (bf16 values are quantized as their fp32 value)
  const int32_t* page_ids = nullptr;  // [num_rows] page of each row (device)
  const int32_t* bits = nullptr;      // [num_rows] its bit-width
  const int32_t* slots = nullptr;     // [num_rows] token slot inside the page
};

// Quantizes each row's K and V of every KV head into its slot (one warp per (row, head, K|V)).
// head_dim <= 256.
cudaError_t launch_kv_write(const KvWriteParams& params, cudaStream_t stream);

}  // namespace pmkv::kernels
