#pragma once
// CpuBackend: the full decoder in fp32 with OpenBLAS GEMMs and OpenMP loops. The correctness oracle
// for every other backend, and what CI runs.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/backend/cpu/paged_attention.h"
#include "engine/model/weight_store.h"
#include "kernels/kv_page_layout.h"

namespace pmkv {

struct CpuBackendOptions {
  int32_t num_threads = 0;  // 0: every core
};

class CpuBackend final : public Backend {
 public:
  // Loads every weight the config calls for (LoadError naming the tensor otherwise) and allocates
  // a KV pool of `num_pages` pages of `geometry`.
  CpuBackend(const ModelConfig& config, const WeightStore& weights, kv::PageGeometry geometry,
             int32_t num_pages, CpuBackendOptions options = {});

  std::string name() const override { return "cpu"; }
  const ModelConfig& config() const override { return cfg_; }
  void forward(const StepBatch& batch, std::span<float> logits) override;
  // Sampling inside the backend, on the host: forward() then, per row, a Sampler seeded from the
  // row's (seed, sampled) pair, so the tokens do not depend on what ran before (the contract of
  // DeviceSampling). The engine uses it when asked to run steps ahead (engine.async_steps: on);
  // by default it samples the CPU backend's logits itself.
  // Log-probabilities come from the raw row through Sampler::token_logprob and top_logprobs.
  using Backend::forward_sample;
  void forward_sample(const StepBatch& batch, std::span<const DeviceSampling> rows,
                      std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs) override;

  int64_t kv_pool_bytes() const override { return static_cast<int64_t>(kv_pool_.size()); }
  int64_t weight_bytes() const override;

  // Calibration (pmkv calibrate). The probe sees each layer's attention inputs after RoPE and
  // before attention: q [rows, q_width], k and v [rows, kv_width], rows `stride` floats apart; it
  // may change k and v in place (fake quantization), which this step's attention then uses.
  using AttentionProbe = std::function<void(int32_t layer, int64_t rows, float* q, float* k,
                                            float* v, int64_t stride)>;
  void set_attention_probe(AttentionProbe probe) { probe_ = std::move(probe); }
  // Key reparameterization: folds per-layer key scales into q_proj/k_proj
  // (engine/backend/key_scale_fold.h).
  void fold_key_scales(const std::vector<std::vector<float>>& scales);
  // out [rows, hidden] = attn [rows, q_width] o_proj^T (+ bias) of one layer.
  void apply_o_proj(int32_t layer, const float* attn, int64_t rows, float* out) const;

 private:
  struct Layer {
    std::vector<float> attn_norm;  // [hidden]
    std::vector<float> wqkv;       // [q_width + 2 kv_width, hidden]: q, k, v rows stacked
    std::vector<float> bqkv;       // [q_width + 2 kv_width] or empty
    std::vector<float> wo;         // [hidden, q_width]
    std::vector<float> bo;         // [hidden] or empty
    std::vector<float> mlp_norm;   // [hidden]
    std::vector<float> w_gate_up;  // [2 intermediate, hidden]: gate rows, then up rows
    std::vector<float> b_gate_up;  // [2 intermediate] or empty
    std::vector<float> w_down;     // [hidden, intermediate]
    std::vector<float> b_down;     // [hidden] or empty
  };
  void load(const WeightStore& w);
  void attention_layer(const StepBatch& batch, int32_t layer, const float* qkv, float* out);

  ModelConfig cfg_;
  std::vector<float> embed_;       // [vocab, hidden]
  std::vector<float> lm_head_;     // [vocab, hidden]; empty when tied to embed_
  std::vector<float> final_norm_;  // [hidden]
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
  kv::PageGeometry geometry_;
  int64_t page_bytes_;
  std::vector<std::byte> kv_pool_;  // [num_pages * page_bytes_]
  AttentionProbe probe_;
  std::vector<float> sample_logits_;  // forward_sample's logits
  std::vector<float> raw_;            // forward_sample's raw row (log-probabilities)
};

}  // namespace pmkv
