#include "engine/calibrate/key_scales.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>

#include "engine/backend/cpu/paged_attention.h"
#include "engine/calibrate/sensitivity.h"
#include "engine/common/error.h"
#include "engine/model/safetensors.h"

namespace pmkv::calibrate {

namespace {

std::string tensor_name(int64_t layer, const char* what) {
  return "model.layers." + std::to_string(layer) + ".self_attn." + what;
}

// A minimal F32 safetensors writer (header sorted by name, contiguous data).
void write_f32_safetensors(
    const std::filesystem::path& file,
    const std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>& tensors,
    const std::map<std::string, std::string>& metadata) {
  nlohmann::json header;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const uint64_t bytes = t.second.size() * sizeof(float);
    header[name] = {
        {"dtype", "F32"}, {"shape", t.first}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();
  while (h.size() % 8 != 0)
    h.push_back(' ');
  std::ofstream out(file, std::ios::binary);
  if (!out) throw InvalidArgument("cannot write " + file.string());
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);  // little-endian hosts only (x86-64, arm64)
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& [name, t] : tensors) {
    out.write(reinterpret_cast<const char*>(t.second.data()),
              static_cast<std::streamsize>(t.second.size() * sizeof(float)));
  }
  if (!out) throw InvalidArgument("cannot write " + file.string());
}

PerLayer read_per_layer(const std::filesystem::path& file, const ModelConfig& cfg, const char* what,
                        const std::vector<int64_t>& shape) {
  const auto f = SafetensorsFile::open(file);
  PerLayer out;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string name = tensor_name(l, what);
    const SafetensorsTensor* t = f.find(name);
    if (!t) throw LoadError("missing tensor " + name + " in " + file.string());
    if (t->dtype != DType::kF32 || t->shape != shape) {
      throw LoadError("tensor " + name + " in " + file.string() +
                      " must be F32 of the model's shape");
    }
    std::vector<float> v(t->num_bytes() / sizeof(float));
    std::memcpy(v.data(), f.data(*t).data(), t->num_bytes());
    out.push_back(std::move(v));
  }
  return out;
}

}  // namespace

PerLayer measure_key_maxima(LocalModel& model, const CalibrationSet& data,
                            const std::function<void(int64_t, int64_t)>& on_progress) {
  const auto& cfg = model.config;
  const int64_t H = cfg.num_kv_heads, d = cfg.head_dim, half = d / 2;
  PerLayer maxima(cfg.num_layers, std::vector<float>(H * half, 0.0f));
  CpuBackend& backend = model.cpu_backend(static_cast<int64_t>(data.samples.front().size()) + 64);
  backend.set_attention_probe([&](int32_t layer, int64_t rows, float*, float* k, float*,
                                  int64_t stride) {
    auto& m = maxima[layer];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < H; ++h) {
        const float* kh = k + r * stride + h * d;
        for (int64_t j = 0; j < half; ++j) {
          m[h * half + j] = std::max({m[h * half + j], std::abs(kh[j]), std::abs(kh[j + half])});
        }
      }
    }
  });
  int64_t done = 0;
  for (const auto& sample : data.samples) {
    forward_sample(model, sample, data.stretch, false);
    if (on_progress) on_progress(++done, static_cast<int64_t>(data.samples.size()));
  }
  backend.set_attention_probe(nullptr);
  return maxima;
}

std::vector<float> scales_from_maxima(const std::vector<float>& maxima, int32_t num_kv_heads,
                                      int32_t head_dim, double alpha) {
  const int32_t half = head_dim / 2;
  std::vector<float> s(static_cast<size_t>(num_kv_heads) * head_dim);
  for (int32_t h = 0; h < num_kv_heads; ++h) {
    for (int32_t j = 0; j < half; ++j) {
      const double m = std::max<double>(maxima[h * half + j], 0.0);
      const float v = static_cast<float>(std::clamp(std::pow(m, alpha), 1e-4, 1e4));
      s[h * head_dim + j] = v;
      s[h * head_dim + j + half] = v;
    }
  }
  return s;
}

namespace {

struct LayerInputs {
  std::vector<float> q, k, v;  // [rows, q_width] / [rows, kv_width], one per sample
};

// MSE between o_proj(attention(q, k, v)) and the same with k / s, q * s and K/V fake-quantized.
double quantized_mse(CpuBackend& backend, const ModelConfig& cfg, int32_t layer,
                     const std::vector<LayerInputs>& inputs, const std::vector<float>* scales,
                     const RepScaleOptions& o, const std::vector<std::vector<float>>& reference) {
  const int64_t qw = cfg.q_width(), kvw = cfg.kv_width(), d = cfg.head_dim;
  const int64_t group = cfg.group_size();
  const cpu::AttentionShape shape{static_cast<int32_t>(cfg.num_heads),
                                  static_cast<int32_t>(cfg.num_kv_heads), static_cast<int32_t>(d),
                                  static_cast<int32_t>(cfg.sliding_window.value_or(0)),
                                  1.0f / std::sqrt(static_cast<float>(d))};
  double sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const LayerInputs& in = inputs[i];
    const int64_t rows = static_cast<int64_t>(in.k.size()) / kvw;
    std::vector<float> q = in.q, k = in.k, v = in.v;
    if (scales) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < qw; ++c)
          q[r * qw + c] *= (*scales)[(c / d / group) * d + c % d];
        for (int64_t c = 0; c < kvw; ++c)
          k[r * kvw + c] /= (*scales)[c];
      }
    }
    fake_quantize_rows(k.data(), rows, kvw, static_cast<int32_t>(cfg.num_kv_heads),
                       static_cast<int32_t>(d), o.k_bits);
    fake_quantize_rows(v.data(), rows, kvw, static_cast<int32_t>(cfg.num_kv_heads),
                       static_cast<int32_t>(d), o.v_bits);
    std::vector<float> attn(rows * qw), out(rows * cfg.hidden_size);
    cpu::causal_attention(shape, q.data(), qw, static_cast<int32_t>(rows), 0, k.data(), v.data(),
                          attn.data(), qw);
    backend.apply_o_proj(layer, attn.data(), rows, out.data());
    for (size_t j = 0; j < out.size(); ++j) {
      const double e = double(out[j]) - reference[i][j];
      sum += e * e;
    }
    count += static_cast<int64_t>(out.size());
  }
  return count ? sum / static_cast<double>(count) : 0.0;
}

}  // namespace

RepScales search_rep_scales(LocalModel& model, const CalibrationSet& data,
                            const PerLayer& key_maxima, const RepScaleOptions& o) {
  const auto& cfg = model.config;
  const int32_t layers = static_cast<int32_t>(cfg.num_layers);
  const int64_t qw = cfg.q_width(), kvw = cfg.kv_width();
  CpuBackend& backend = model.cpu_backend(static_cast<int64_t>(data.samples.front().size()) + 64);
  // Full-precision inputs of every layer for every sample (one forward per sample).
  std::vector<std::vector<LayerInputs>> inputs(layers);
  backend.set_attention_probe(
      [&](int32_t layer, int64_t rows, float* q, float* k, float* v, int64_t stride) {
        LayerInputs in;
        for (int64_t r = 0; r < rows; ++r) {
          in.q.insert(in.q.end(), q + r * stride, q + r * stride + qw);
          in.k.insert(in.k.end(), k + r * stride, k + r * stride + kvw);
          in.v.insert(in.v.end(), v + r * stride, v + r * stride + kvw);
        }
        inputs[layer].push_back(std::move(in));
      });
  for (const auto& sample : data.samples)
    forward_sample(model, sample, data.stretch, false);
  backend.set_attention_probe(nullptr);

  RepScales out;
  const int64_t total = int64_t{layers} * (o.grid + 1);
  int64_t done = 0;
  for (int32_t l = 0; l < layers; ++l) {
    // Reference outputs: exact K/V (no quantization: bits 16 keeps them within 1e-5 relative,
    // but exact is simpler and what PM-KVQ compares against).
    std::vector<std::vector<float>> reference;
    const cpu::AttentionShape shape{
        static_cast<int32_t>(cfg.num_heads), static_cast<int32_t>(cfg.num_kv_heads),
        static_cast<int32_t>(cfg.head_dim), static_cast<int32_t>(cfg.sliding_window.value_or(0)),
        1.0f / std::sqrt(static_cast<float>(cfg.head_dim))};
    for (const LayerInputs& in : inputs[l]) {
      const int64_t rows = static_cast<int64_t>(in.k.size()) / kvw;
      std::vector<float> attn(rows * qw), o_out(rows * cfg.hidden_size);
      cpu::causal_attention(shape, in.q.data(), qw, static_cast<int32_t>(rows), 0, in.k.data(),
                            in.v.data(), attn.data(), qw);
      backend.apply_o_proj(l, attn.data(), rows, o_out.data());
      reference.push_back(std::move(o_out));
    }
    const double plain = quantized_mse(backend, cfg, l, inputs[l], nullptr, o, reference);
    if (o.on_progress) o.on_progress(++done, total);
    double best = plain, best_alpha = 0;
    std::vector<float> best_scales(kvw, 1.0f);
    for (int32_t n = 0; n < o.grid; ++n) {
      const double alpha = 1.0 - static_cast<double>(n) / o.grid;
      const auto s = scales_from_maxima(key_maxima[l], static_cast<int32_t>(cfg.num_kv_heads),
                                        static_cast<int32_t>(cfg.head_dim), alpha);
      const double mse = quantized_mse(backend, cfg, l, inputs[l], &s, o, reference);
      if (mse < best) {
        best = mse;
        best_alpha = alpha;
        best_scales = s;
      }
      if (o.on_progress) o.on_progress(++done, total);
    }
    out.scales.push_back(std::move(best_scales));
    out.alpha.push_back(best_alpha);
    out.mse_plain.push_back(plain);
    out.mse_scaled.push_back(best);
  }
  return out;
}

void write_key_maxima(const std::filesystem::path& file, const PerLayer& maxima,
                      const ModelConfig& cfg) {
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> t;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    t[tensor_name(l, "key_max")] = {{cfg.num_kv_heads, cfg.head_dim / 2}, maxima.at(l)};
  }
  write_f32_safetensors(file, t, {{"format", "pmkv key maxima"}});
}

PerLayer read_key_maxima(const std::filesystem::path& file, const ModelConfig& cfg) {
  return read_per_layer(file, cfg, "key_max", {cfg.num_kv_heads, cfg.head_dim / 2});
}

void write_key_scales(const std::filesystem::path& file, const RepScales& scales,
                      const ModelConfig& cfg) {
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> t;
  nlohmann::json alphas = scales.alpha;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    t[tensor_name(l, "key_scale")] = {{cfg.kv_width()}, scales.scales.at(l)};
  }
  write_f32_safetensors(file, t, {{"format", "pmkv key scales"}, {"alpha", alphas.dump()}});
}

PerLayer read_key_scales(const std::filesystem::path& file, const ModelConfig& cfg) {
  PerLayer s = read_per_layer(file, cfg, "key_scale", {cfg.kv_width()});
  const int64_t d = cfg.head_dim;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    for (int64_t c = 0; c < cfg.kv_width(); ++c) {
      const float x = s[l][c];
      if (!std::isfinite(x) || x <= 0) {
        throw LoadError("tensor " + tensor_name(l, "key_scale") + " in " + file.string() +
                        ": scales must be finite and positive");
      }
      if (c % d < d / 2 && s[l][c] != s[l][c + d / 2]) {
        throw LoadError("tensor " + tensor_name(l, "key_scale") + " in " + file.string() +
                        ": the two channels of a RoPE pair (i, i + head_dim/2) must share a scale");
      }
    }
  }
  return s;
}

}  // namespace pmkv::calibrate
