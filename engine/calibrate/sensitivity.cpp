#include "engine/calibrate/sensitivity.h"

#include <cmath>
#include <vector>

#include "engine/kv/kv_codec.h"
#include "engine/sampling/sampler.h"

namespace pmkv::calibrate {

void fake_quantize_rows(float* x, int64_t rows, int64_t stride, int32_t num_kv_heads,
                        int32_t head_dim, int bits) {
  std::vector<std::byte> row(kv::row_bytes(head_dim, bits));
  for (int64_t r = 0; r < rows; ++r) {
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      const std::span<float> g(x + r * stride + int64_t{h} * head_dim, head_dim);
      const kv::GroupParams p = kv::quantize_group(g, bits, row);
      kv::dequantize_group(row, bits, p, g);
    }
  }
}

namespace {

// Mean KL(p || q) over rows, p given as log-probabilities, q as raw logits.
double mean_kl(const std::vector<float>& logp, const std::vector<float>& logits_q, int64_t vocab) {
  const int64_t rows = static_cast<int64_t>(logp.size()) / vocab;
  std::vector<float> logq(vocab);
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* lp = logp.data() + r * vocab;
    Sampler::log_softmax({logits_q.data() + r * vocab, static_cast<size_t>(vocab)}, logq);
    double kl = 0;
    for (int64_t i = 0; i < vocab; ++i)
      kl += std::exp(double(lp[i])) * (double(lp[i]) - logq[i]);
    total += std::max(0.0, kl);
  }
  return rows > 0 ? total / static_cast<double>(rows) : 0.0;
}

}  // namespace

Sensitivity measure_sensitivity(LocalModel& model, const CalibrationSet& data,
                                const SensitivityOptions& o) {
  const auto& cfg = model.config;
  const int64_t vocab = cfg.vocab_size;
  const int32_t layers = static_cast<int32_t>(cfg.num_layers);
  Sensitivity s;
  s.bits = o.bits;
  for (int b : o.bits) {
    s.k[b].assign(layers, 0.0);
    s.v[b].assign(layers, 0.0);
  }
  const int64_t total = static_cast<int64_t>(data.samples.size()) * layers * o.bits.size() * 2;
  int64_t done = 0;
  const int64_t max_len = static_cast<int64_t>(data.samples.front().size());
  CpuBackend& backend = model.cpu_backend(max_len + 64);
  for (const auto& sample : data.samples) {
    backend.set_attention_probe(nullptr);
    const std::vector<float> fp = forward_sample(model, sample, data.stretch, true);
    std::vector<float> logp(fp.size());
    for (size_t r = 0; r * vocab < fp.size(); ++r) {
      Sampler::log_softmax({fp.data() + r * vocab, static_cast<size_t>(vocab)},
                           {logp.data() + r * vocab, static_cast<size_t>(vocab)});
    }
    for (int32_t l = 0; l < layers; ++l) {
      for (int b : o.bits) {
        for (int kind = 0; kind < 2; ++kind) {
          backend.set_attention_probe(
              [&](int32_t layer, int64_t rows, float*, float* k, float* v, int64_t stride) {
                if (layer != l) return;
                fake_quantize_rows(kind == 0 ? k : v, rows, stride,
                                   static_cast<int32_t>(cfg.num_kv_heads),
                                   static_cast<int32_t>(cfg.head_dim), b);
              });
          const double kl = mean_kl(logp, forward_sample(model, sample, data.stretch, true), vocab);
          (kind == 0 ? s.k : s.v)[b][l] += kl / static_cast<double>(data.samples.size());
          if (o.on_progress) o.on_progress(++done, total);
        }
      }
    }
  }
  backend.set_attention_probe(nullptr);
  return s;
}

}  // namespace pmkv::calibrate
