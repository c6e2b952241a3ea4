#pragma once
// Prefill attention (many query rows per sequence: prompts, chunked prefill, multi-token steps)
// over the mixed-bit paged KV cache plus the step's own K/V.
//
// Semantics (engine/backend/cpu/cpu_backend.cpp attention_layer + paged_attention.cpp
// causal_attention): row i of sequence s is token seq_cached[s] + i; it attends causally over the
// first seq_cached[s] tokens of the sequence's page table (pages in token order, each with its own
// bit-width and token count, value = code * scale - zero), followed by the step's own rows 0..i of
// s taken from k/v (exact fp32, never the pages). With sliding_window = W > 0, key j is visible
// from token t iff t - W < j <= t. Softmax in fp32 with max subtraction; a row with no visible key
// writes zeros (cannot happen: a row always sees its own token).
//
// Two kernels on the stream, nothing on the host but the launches:
//  1. keys: every sequence's cached tokens (dequantized, a single pass over the pages) and then its
//     step rows (the fp32 K/V rounded) -> workspace, bf16, one contiguous [cached + rows, head_dim]
//     run per (KV head, sequence);
//  2. flash attention (online softmax, bf16 mma.sync with fp32 accumulation), one CTA per
//     (64 packed query rows, KV head, sequence) where a packed row is a (token, query head of this
//     KV head) pair, so all query heads of a KV head share each loaded K/V tile (GQA). All keys
//     come from the workspace (cp.async, double-buffered), in 64-key tiles.
// Precision: q, K, V and the softmax weights enter the tensor cores as bf16 (relative rounding
// up to 2^-8 each), scores and sums are fp32; the output is bf16.
//
// Requires: head_dim 64 or 128; num_heads a multiple of num_kv_heads; q 8-byte aligned with an even
// q_stride; k and v 16-byte aligned with kv_stride a multiple of 4; out 4-byte aligned; workspace
// 16-byte aligned; num_rows == seq_starts[num_seqs]; total_cached + num_rows < 2^31; num_seqs <=
// 65535; every page of a table holds at most its capacity and the tables cover at least seq_cached
// tokens. Returns cudaErrorInvalidValue on an unsupported shape.
#include <cuda_runtime.h>

#include <cstdint>

namespace pmkv::kernels {

inline constexpr int kPrefillRowsPerCta = 64;  // packed (token, query head) rows per CTA
inline constexpr int kPrefillKeysPerTile = 64;

struct PrefillParams {
  const void* pool = nullptr;  // page p starts at pool + p * page_bytes (kernels/kv_page_layout.h)
  int64_t page_bytes = 0;
  int32_t tokens16 = 0;
  int32_t num_heads = 0, num_kv_heads = 0, head_dim = 0;  // query head h uses KV head h / group
  int32_t sliding_window = 0;  // 0: none; else key j visible from query i iff i - j < window
  float scale = 0.0f;          // softmax scale
  int32_t num_seqs = 0, num_rows = 0;              // host values
  int32_t max_rows_per_seq = 0, total_cached = 0;  // host values (grid and workspace sizing)
  const int32_t* seq_starts = nullptr;             // device [num_seqs + 1]: rows of s
  const int32_t* seq_cached = nullptr;     // device [num_seqs]: tokens of s cached before the step
  const int32_t* cached_starts = nullptr;  // device [num_seqs + 1]: prefix sums of seq_cached
  const int32_t* page_starts = nullptr;    // device [num_seqs + 1]: this layer's page table CSR
  const int32_t* page_ids = nullptr;       // device [num_pages]
  const int32_t* page_bits = nullptr;      // device [num_pages] 16, 8, 4 or 2
  const int32_t* page_tokens = nullptr;    // device [num_pages] valid tokens of each page
  const float* q = nullptr;  // [num_rows, num_heads * head_dim] post-RoPE fp32, row stride q_stride
  int64_t q_stride = 0;
  const float* k = nullptr;  // [num_rows, num_kv_heads * head_dim] the step's own K (exact fp32)
  const float* v = nullptr;  // same for V; both with row stride kv_stride
  int64_t kv_stride = 0;
  uint16_t* out = nullptr;      // bf16 [num_rows, num_heads * head_dim], contiguous
  void* workspace = nullptr;    // always needed (the step's own K/V go there too)
  int64_t workspace_bytes = 0;  // >= prefill_workspace_bytes(total_cached, num_rows, ...)
};

// Bytes of the workspace: bf16 K and V of all keys (cached tokens and step rows) of all KV heads.
int64_t prefill_workspace_bytes(int32_t total_cached, int32_t num_rows, int32_t num_kv_heads,
                                int32_t head_dim);

// Enqueues the dequantization (when total_cached > 0) and the attention kernel on `stream`.
// Returns the first launch error; cudaErrorInvalidValue on unsupported shapes or a short workspace.
cudaError_t launch_prefill(const PrefillParams& params, cudaStream_t stream);

}  // namespace pmkv::kernels
