#pragma once
// On-GPU token selection for a batch of rows of logits, with the CPU Sampler's semantics
// (engine/sampling/sampler.cpp): repetition penalty -> frequency and presence penalties ->
// greedy argmax (lowest id on ties) | temperature -> top-k -> top-p -> min-p -> one seeded draw.
// NaN logits count as -inf; a row without a finite logit answers token 0.
//
// One CTA per row; asynchronous on the stream, no host synchronization, no allocation, so a
// launch can be captured in a CUDA graph. The kept set of a row is the CPU's (top-k keeps ties at
// the k-th value; top-p keeps the shortest head in (probability desc, id asc) order whose mass
// reaches top_p; min-p drops p < min_p * p_max), up to the rounding of expf (at most 2 ulp on the
// GPU) and of the probability sums (fixed point with 2^-40 resolution on the GPU, double on the
// CPU): a token whose membership depends on a margin below about 1e-6 of the row's mass may be
// decided differently. The draw itself differs from the CPU's (Philox, not mt19937).
//
// Log-probabilities (a row's `logprobs` >= 0) come from the row's logits as they were before the
// launch (vLLM's "raw_logprobs"; Sampler::token_logprob and Sampler::top_logprobs): the sampled
// token's, and the `logprobs` most likely tokens (most likely first, lowest id first on ties).
// logsumexp runs in double like the CPU's, so values agree up to its summation order.
#include <cuda_runtime.h>

#include <cstdint>

namespace pmkv::kernels {

// Top log-probabilities a row may ask for (OpenAI's limit).
inline constexpr int32_t kMaxSamplingLogprobs = 20;

// One row's parameters: the SamplingParams fields, plus where its random number comes from.
struct SamplingRow {
  float temperature;  // < 1e-5: greedy
  int32_t top_k;      // <= 0: disabled
  float top_p;        // >= 1: disabled
  float min_p;        // <= 0: disabled
  float repetition_penalty;
  float presence_penalty;
  float frequency_penalty;
  int32_t logprobs;  // -1: none; 0: the sampled token's; n <= kMaxSamplingLogprobs: also the top n
  // Rows with logprobs >= 0 whose logits the launch rewrites (sampling_rewrites_row) keep a copy of
  // their raw logits in the workspace, at slot logprob_slot (0 .. copies - 1); -1 otherwise.
  int32_t logprob_slot;
  int32_t pad;
  uint64_t seed;    // Philox key of the row's sequence
  uint64_t offset;  // Philox counter: tokens the sequence has sampled so far, so a seeded
                    // sequence gets the same tokens whatever else is in the batch
};

// Whether a launch rewrites the row's logits (penalties, or a temperature division): a row with
// logprobs then needs a raw copy (logprob_slot). `history` says whether the launch passes one.
__host__ __device__ inline bool sampling_rewrites_row(const SamplingRow& r, bool history) {
  const bool penalties =
      r.repetition_penalty != 1.0f || r.presence_penalty != 0.0f || r.frequency_penalty != 0.0f;
  return (history && penalties) || (r.temperature >= 1e-5f && r.temperature != 1.0f);
}

struct SamplingLaunch {
  float* logits = nullptr;  // device [rows, vocab] fp32; rewritten in place: penalties, then
                            // (non-greedy rows only) the division by a temperature != 1
  int32_t rows = 0;
  int32_t vocab = 0;                    // 1 .. kMaxSamplingVocab
  const SamplingRow* params = nullptr;  // device [rows]
  // Penalty history, CSR over rows (device), or hist_starts == nullptr when no row has a penalty.
  // Row r's entries are [hist_starts[r], hist_starts[r + 1]), each a DISTINCT token id of the
  // row's prompt or output with its number of occurrences among the generated tokens (0 for a
  // prompt-only token) and whether it occurs in the prompt.
  const int32_t* hist_starts = nullptr;         // [rows + 1]
  const int32_t* hist_ids = nullptr;            // [hist_starts[rows]], in [0, vocab)
  const int32_t* hist_output_counts = nullptr;  // [hist_starts[rows]]
  const uint8_t* hist_in_prompt = nullptr;      // [hist_starts[rows]], 0 or 1
  // Steps run ahead: a row's newest generated token may not be in its history yet (the host has
  // not seen it). hist_last_row[r] >= 0 says it is tokens[hist_last_row[r]], one more output
  // occurrence on top of the CSR entries; -1: none. Both null: no such row.
  const int32_t* hist_last_row = nullptr;  // [rows]
  const int32_t* tokens = nullptr;         // the step's input token ids
  int32_t* out_tokens = nullptr;           // device [rows]
  // Log-probabilities of the rows with logprobs >= 0: the sampled token's, and in row r's first
  // `logprobs` entries of [r * kMaxSamplingLogprobs, (r + 1) * kMaxSamplingLogprobs) the top
  // tokens and theirs. All three null: no row's are computed (launch_sampling rejects a mix).
  float* out_logprob = nullptr;       // device [rows]
  int32_t* out_top_ids = nullptr;     // device [rows * kMaxSamplingLogprobs]
  float* out_top_logprobs = nullptr;  // device [rows * kMaxSamplingLogprobs]
  // Raw copies the rows' logprob_slot values address (0 .. logprob_copies - 1); a row whose logits
  // the launch rewrites without a valid slot gets a NaN log-probability for its token.
  int32_t logprob_copies = 0;
  // At least sampling_workspace_bytes(rows, vocab, logprob_copies) bytes (nullptr if that is 0).
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

inline constexpr int32_t kMaxSamplingVocab = 1 << 22;

// Device scratch that launch_sampling needs for this shape: the raw copies of `logprob_copies`
// rows (everything else lives in shared memory).
int64_t sampling_workspace_bytes(int32_t rows, int32_t vocab, int32_t logprob_copies);

// Samples one token per row into out_tokens. cudaErrorInvalidValue for a bad shape, a missing
// pointer or a workspace smaller than sampling_workspace_bytes; otherwise the launch status.
// rows == 0 launches nothing.
cudaError_t launch_sampling(const SamplingLaunch& launch, cudaStream_t stream);

// Steps run ahead of the host (Backend::launch_sample): tokens[r] = sampled[src[r]] where
// src[r] >= 0, unchanged where src[r] < 0, for r < n. The caller keeps src[r] below the number of
// rows the previous step sampled. n == 0 launches nothing.
cudaError_t launch_gather_sampled(int32_t* tokens, const int32_t* src, const int32_t* sampled,
                                  int32_t n, cudaStream_t stream);

}  // namespace pmkv::kernels
