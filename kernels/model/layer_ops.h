#pragma once
// The small per-layer kernels of the decoder forward (Llama / Mistral / Qwen2) besides the GEMMs
// and attention: embedding gather, residual add + RMSNorm, bias + RoPE + KV-cache write, SiLU-gated
// MLP activation. Semantics are those of the CPU backend (engine/backend/cpu/cpu_ops.cpp,
// cpu_backend.cpp); the KV write is byte-identical with launch_kv_write / kv::quantize_group.
//
// Every launcher only enqueues one kernel on `stream` (no host sync, no allocation, no device
// attribute queries), so it can be captured in a CUDA graph; it returns the launch error
// (cudaErrorInvalidValue for parameters it rejects, without launching). rows == 0 launches
// nothing. bf16 tensors are stored as uint16_t (the bits of a __nv_bfloat16); every bf16 output is
// rounded to nearest even from an fp32 value. All pointers are device pointers.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv/kv_ops.h"

namespace pmkv::kernels {

// x[r, :] = float(table[ids[r], :]) for r < rows (exact). table: bf16 [vocab, hidden]; ids:
// [rows]; x: fp32 [rows, hidden]. The host validates ids; an id outside [0, vocab) still never
// reads out of bounds: its row is written as zeros.
cudaError_t launch_embedding(const uint16_t* table_bf16, int32_t vocab, const int32_t* ids,
                             int32_t rows, int32_t hidden, float* x, cudaStream_t stream);

struct AddRmsNormParams {
  float* x = nullptr;             // residual stream, fp32 [*, dim]
  const float* delta = nullptr;   // fp32 [*, dim] added to x (a sublayer's output), or null
  const float* bias = nullptr;    // fp32 [dim] added with delta (o_proj / down_proj bias), or null
  const float* weight = nullptr;  // fp32 [dim]
  float eps = 1e-6f;
  int32_t rows = 0;                    // output rows
  int32_t dim = 0;                     // <= 16384 recommended (any positive dim works)
  const int32_t* row_index = nullptr;  // [rows] source row of each output row, or null (row r)
  uint16_t* out = nullptr;             // bf16 [rows, dim]
};

// For output row r < rows, source row s = row_index ? row_index[r] : r:
//   y = x[s] + (delta ? delta[s] + (bias ? bias : 0) : 0)          (fp32, that order)
//   out[r] = bf16(weight * (y * (1 / sqrt(sum(y^2) / dim + eps))))  (fp32, as cpu::rms_norm)
// With row_index == null and delta != null, x[s] = y is stored (the residual add; y is exactly
// the fp32 value the CPU's `x += tmp` produces). With row_index != null x is read-only (the final
// norm over the rows whose logits are wanted; rows may repeat). The sum of squares is a parallel
// fp32 reduction (not the CPU's serial order). out must not alias x, delta or weight.
cudaError_t launch_add_rmsnorm(const AddRmsNormParams& params, cudaStream_t stream);

struct RopeKvWriteParams {
  float* qkv = nullptr;         // fp32 [rows, q_width + 2 kv_width]: q | k | v columns
  int64_t qkv_stride = 0;       // elements between rows, >= q_width + 2 kv_width
  const float* bias = nullptr;  // fp32 [q_width + 2 kv_width] (q | k | v), or null
  int32_t rows = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;            // must equal pool.geometry.num_kv_heads
  int32_t head_dim = 0;                // even, <= 256; must equal pool.geometry.head_dim
  const int32_t* positions = nullptr;  // [rows] token positions
  const float* inv_freq = nullptr;     // fp32 [head_dim / 2] (RoPE scaling already applied)
  float* q_out = nullptr;              // fp32 [rows, q_width], contiguous
  KvPoolRef pool;
  const int32_t* page_ids = nullptr;  // [rows] page of each row's K/V
  const int32_t* bits = nullptr;      // [rows] its bit-width (16, 8, 4, 2)
  const int32_t* slots = nullptr;     // [rows] token slot inside the page
  // Programmatic dependent launch (kernels/pdl.cuh; not on the legacy default stream): the
  // kernel may start while the one before it runs; it reads positions, inv_freq, bias, page_ids,
  // bits and slots (never written by a kernel) and waits before it reads qkv or writes anything.
  // Off: a plain launch.
  bool pdl = false;
};

// Per row r, with q_width = num_heads * head_dim and kv_width = num_kv_heads * head_dim:
//  1. q, k, v += bias (fp32, when bias != null);
//  2. rotate-half RoPE of every q head and every k head, exactly as cpu::rope_inplace:
//     angle_i = float(positions[r]) * inv_freq[i] (fp32), c = cosf, s = sinf (accurate, not the
//     __cosf/__sinf intrinsics), out[i] = x[i] c - x[i + d/2] s, out[i + d/2] = x[i + d/2] c +
//     x[i] s for i < d/2, each product and sum rounded separately (no FMA contraction);
//  3. q_out[r] = rotated q; the rotated k and the biased v are stored back into qkv's k and v
//     columns (the prefill attention reads the step's own K/V from there at full precision);
//     qkv's q columns are left as they were;
//  4. k and v of every KV head are quantized into slot slots[r] of page page_ids[r] at bits[r]
//     bits, byte-identical with launch_kv_write (dtype f32) on the stored k and v. A row whose
//     bits are not 16/8/4/2 or whose slot is outside the page is not written to the pool (steps
//     1-3 still happen); page ids are trusted.
// Rows must use distinct (page, slot) pairs. One warp per (row, head of q | k | v).
cudaError_t launch_rope_kv_write(const RopeKvWriteParams& params, cudaStream_t stream);

// Column order of a fused gate/up projection's output (= row order of its weight).
enum class GateUpLayout {
  kStacked,       // [gate 0..n) | up 0..n)]
  kInterleaved8,  // groups of 16: gate 8q..8q+7, then up 8q..8q+7 (n % 8 == 0); the skinny
                  // GEMM's SwiGLU epilogue needs a gate row and its up row in one 16-row tile
};

// out[r, i] = bf16(silu(g) * u) for r < rows, i < n, where g = float(gate_up[r, gate col of i]) +
// bias[i] and u = float(gate_up[r, up col of i]) + bias[n + i] (gate col i and up col n + i when
// stacked; 16 (i / 8) + i % 8 and that + 8 when interleaved; bias terms 0 when bias is null) and
// silu(g) = g / (1 + expf(-g)) (IEEE division, accurate expf), as cpu::silu_mul.
// gate_up: bf16 [rows, 2n] (gate | up); bias: fp32 [2n] or null; out: bf16 [rows, n].
// 16-byte loads when n % 8 == 0 and the pointers are 16-byte aligned.
cudaError_t launch_silu_mul(const uint16_t* gate_up, const float* bias, int32_t rows, int32_t n,
                            uint16_t* out, cudaStream_t stream,
                            GateUpLayout layout = GateUpLayout::kStacked);

}  // namespace pmkv::kernels
