#include "engine/backend/cpu/cpu_backend.h"

#include <cblas.h>
#include <omp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <new>
#include <string>

#include "engine/backend/cpu/cpu_ops.h"
#include "engine/backend/cpu/kv_page_ops.h"
#include "engine/backend/key_scale_fold.h"
#include "engine/common/error.h"
#include "engine/sampling/sampler.h"

namespace pmkv {

namespace {

std::string layer_name(int64_t l, const char* rest) {
  return "model.layers." + std::to_string(l) + "." + rest;
}

void append(std::vector<float>& dst, const std::vector<float>& src) {
  dst.insert(dst.end(), src.begin(), src.end());
}

// MemAvailable of /proc/meminfo in bytes; -1 where it cannot be read.
int64_t available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return -1;
}

std::string mib(uint64_t bytes) {
  return std::to_string(bytes >> 20) + " MiB";
}

}  // namespace

CpuBackend::CpuBackend(const ModelConfig& config, const WeightStore& weights,
                       kv::PageGeometry geometry, int32_t num_pages, CpuBackendOptions options)
    : cfg_(config), geometry_(geometry), page_bytes_(kv::page_bytes(geometry)) {
  if (geometry.num_kv_heads != cfg_.num_kv_heads || geometry.head_dim != cfg_.head_dim) {
    throw InvalidArgument("CpuBackend: KV page geometry does not match the model");
  }
  if (options.num_threads > 0) {
    omp_set_num_threads(options.num_threads);
    openblas_set_num_threads(options.num_threads);
  }
  load(weights);
  inv_freq_ = rope_inv_freq(cfg_);
  // The pool is zero-filled, so all of it is touched now: one larger than the memory available
  // ended in std::bad_alloc ("pmkv serve: error: std::bad_alloc", kv_cache.memory 100G on a 24 GB
  // machine) or, within overcommit, in the OOM killer.
  const uint64_t pool_bytes = static_cast<uint64_t>(num_pages) * static_cast<uint64_t>(page_bytes_);
  const int64_t available = available_memory_bytes();
  if (available >= 0 && pool_bytes > static_cast<uint64_t>(available)) {
    throw InvalidArgument("the KV pool (" + mib(pool_bytes) + ", kv_cache.memory) is larger than " +
                          "the memory this machine has available (" +
                          mib(static_cast<uint64_t>(available)) + ")");
  }
  try {
    kv_pool_.resize(pool_bytes);
  } catch (const std::bad_alloc&) {
    throw InvalidArgument("cannot allocate the KV pool (" + mib(pool_bytes) + ", kv_cache.memory)");
  }
}

void CpuBackend::load(const WeightStore& w) {
  const int64_t H = cfg_.hidden_size, I = cfg_.intermediate_size, V = cfg_.vocab_size;
  const int64_t q = cfg_.q_width(), kvw = cfg_.kv_width();
  auto load = [&](const std::string& name, std::initializer_list<int64_t> shape) {
    const std::vector<int64_t> s(shape);
    return w.load_f32(name, s);
  };
  // Tied checkpoints may store the shared matrix under either name.
  const bool has_embed = w.contains("model.embed_tokens.weight");
  const bool has_head = w.contains("lm_head.weight");
  if (has_embed || !cfg_.tie_word_embeddings || !has_head) {
    embed_ = load("model.embed_tokens.weight", {V, H});
  } else {
    embed_ = load("lm_head.weight", {V, H});
  }
  if (!cfg_.tie_word_embeddings) lm_head_ = load("lm_head.weight", {V, H});
  final_norm_ = load("model.norm.weight", {H});

  layers_.resize(cfg_.num_layers);
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    Layer& L = layers_[l];
    L.attn_norm = load(layer_name(l, "input_layernorm.weight"), {H});
    L.mlp_norm = load(layer_name(l, "post_attention_layernorm.weight"), {H});
    append(L.wqkv, load(layer_name(l, "self_attn.q_proj.weight"), {q, H}));
    append(L.wqkv, load(layer_name(l, "self_attn.k_proj.weight"), {kvw, H}));
    append(L.wqkv, load(layer_name(l, "self_attn.v_proj.weight"), {kvw, H}));
    if (cfg_.qkv_bias) {
      append(L.bqkv, load(layer_name(l, "self_attn.q_proj.bias"), {q}));
      append(L.bqkv, load(layer_name(l, "self_attn.k_proj.bias"), {kvw}));
      append(L.bqkv, load(layer_name(l, "self_attn.v_proj.bias"), {kvw}));
    }
    L.wo = load(layer_name(l, "self_attn.o_proj.weight"), {H, q});
    if (cfg_.o_bias) L.bo = load(layer_name(l, "self_attn.o_proj.bias"), {H});
    append(L.w_gate_up, load(layer_name(l, "mlp.gate_proj.weight"), {I, H}));
    append(L.w_gate_up, load(layer_name(l, "mlp.up_proj.weight"), {I, H}));
    L.w_down = load(layer_name(l, "mlp.down_proj.weight"), {H, I});
    if (cfg_.mlp_bias) {
      append(L.b_gate_up, load(layer_name(l, "mlp.gate_proj.bias"), {I}));
      append(L.b_gate_up, load(layer_name(l, "mlp.up_proj.bias"), {I}));
      L.b_down = load(layer_name(l, "mlp.down_proj.bias"), {H});
    }
  }
}

int64_t CpuBackend::weight_bytes() const {
  int64_t n = static_cast<int64_t>(embed_.size() + lm_head_.size() + final_norm_.size());
  for (const Layer& L : layers_) {
    n += static_cast<int64_t>(L.attn_norm.size() + L.wqkv.size() + L.bqkv.size() + L.wo.size() +
                              L.bo.size() + L.mlp_norm.size() + L.w_gate_up.size() +
                              L.b_gate_up.size() + L.w_down.size() + L.b_down.size());
  }
  return n * static_cast<int64_t>(sizeof(float));
}

void CpuBackend::attention_layer(const StepBatch& b, int32_t layer, const float* qkv, float* out) {
  const int64_t q_width = cfg_.q_width(), kv_width = cfg_.kv_width();
  const int64_t qkv_width = q_width + 2 * kv_width;
  const cpu::KvPoolView pool{kv_pool_.data(), page_bytes_, geometry_};
  const cpu::AttentionShape shape{
      static_cast<int32_t>(cfg_.num_heads), static_cast<int32_t>(cfg_.num_kv_heads),
      static_cast<int32_t>(cfg_.head_dim), static_cast<int32_t>(cfg_.sliding_window.value_or(0)),
      1.0f / std::sqrt(static_cast<float>(cfg_.head_dim))};
  const int32_t num_seqs = b.num_seqs();
  // 1. The new tokens' K/V into their 16-bit slots.
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t row0 = b.seq_starts[s], n = b.seq_starts[s + 1] - row0;
    const int32_t w0 = b.write_starts[layer * num_seqs + s];
    const int32_t w1 = b.write_starts[layer * num_seqs + s + 1];
    const float* rows = qkv + row0 * qkv_width;
    cpu::write_kv_slots(pool, {b.writes.data() + w0, static_cast<size_t>(w1 - w0)}, n,
                        rows + q_width, qkv_width, rows + q_width + kv_width, qkv_width);
  }
  // 2. Attention: cached tokens through the tables as they were before this step's flushes and
  // demotions (KvCacheManager::attention_table), this step's tokens exact (a step attends to its
  // own K/V at full precision, as PM-KVQ does).
  std::vector<float> k, v;
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t row0 = b.seq_starts[s], n = b.seq_starts[s + 1] - row0;
    const int32_t cached = b.seq_cached[s];
    const int32_t first = b.page_starts[layer * num_seqs + s];
    const int32_t last = b.page_starts[layer * num_seqs + s + 1];
    const std::span<const kv::PageRef> table(b.pages.data() + first, last - first);
    const float* rows = qkv + row0 * qkv_width;
    k.resize(static_cast<size_t>(cached + n) * kv_width);
    v.resize(k.size());
    cpu::read_kv(pool, table, cached, k.data(), v.data());
    for (int32_t i = 0; i < n; ++i) {
      std::memcpy(&k[(cached + i) * kv_width], rows + i * qkv_width + q_width,
                  kv_width * sizeof(float));
      std::memcpy(&v[(cached + i) * kv_width], rows + i * qkv_width + q_width + kv_width,
                  kv_width * sizeof(float));
    }
    cpu::causal_attention(shape, rows, qkv_width, n, cached, k.data(), v.data(),
                          out + row0 * q_width, q_width);
  }
  // 3. This layer's flushes, then its demotion waves (they rewrite pages attention just read).
  if (!b.kv_ops.layers.empty()) {
    const kv::KvLayerOps& ops = b.kv_ops.layers[layer];
    for (const kv::RequantOp& op : ops.requant)
      cpu::apply_requant(pool, op);
    for (const auto& wave : ops.demote_waves) {
      for (const kv::DemoteOp& op : wave)
        cpu::apply_demote(pool, op);
    }
  }
}

void CpuBackend::forward(const StepBatch& b, std::span<float> logits) {
  const int64_t N = b.num_tokens(), H = cfg_.hidden_size, I = cfg_.intermediate_size;
  const int64_t V = cfg_.vocab_size, q_width = cfg_.q_width(), kv_width = cfg_.kv_width();
  const int64_t qkv_width = q_width + 2 * kv_width;
  if (static_cast<int64_t>(logits.size()) != static_cast<int64_t>(b.logit_rows.size()) * V) {
    throw std::invalid_argument("CpuBackend::forward: logits buffer has the wrong size");
  }
  std::vector<float> x(N * H), h(N * H), qkv(N * qkv_width), attn(N * q_width), gu(N * 2 * I),
      act(N * I), tmp(N * H);
  for (int64_t r = 0; r < N; ++r) {
    const int32_t id = b.token_ids[r];
    if (id < 0 || id >= V)
      throw InvalidArgument("token id " + std::to_string(id) + " out of range");
    std::memcpy(&x[r * H], &embed_[id * H], H * sizeof(float));
  }
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  for (int32_t l = 0; l < static_cast<int32_t>(cfg_.num_layers); ++l) {
    const Layer& L = layers_[l];
    cpu::rms_norm(x.data(), N, H, L.attn_norm.data(), eps, h.data());
    cpu::matmul_wt(h.data(), N, H, L.wqkv.data(), qkv_width, qkv.data(), L.bqkv);
#pragma omp parallel for if (N > 4)
    for (int64_t r = 0; r < N; ++r) {
      float* row = &qkv[r * qkv_width];
      cpu::rope_inplace(row, cfg_.num_heads, cfg_.head_dim, b.positions[r], inv_freq_);
      cpu::rope_inplace(row + q_width, cfg_.num_kv_heads, cfg_.head_dim, b.positions[r], inv_freq_);
    }
    if (probe_) {
      probe_(l, N, qkv.data(), qkv.data() + q_width, qkv.data() + q_width + kv_width, qkv_width);
    }
    attention_layer(b, l, qkv.data(), attn.data());
    cpu::matmul_wt(attn.data(), N, q_width, L.wo.data(), H, tmp.data(), L.bo);
    for (int64_t i = 0; i < N * H; ++i)
      x[i] += tmp[i];
    cpu::rms_norm(x.data(), N, H, L.mlp_norm.data(), eps, h.data());
    cpu::matmul_wt(h.data(), N, H, L.w_gate_up.data(), 2 * I, gu.data(), L.b_gate_up);
    cpu::silu_mul(gu.data(), N, I, act.data());
    cpu::matmul_wt(act.data(), N, I, L.w_down.data(), H, tmp.data(), L.b_down);
    for (int64_t i = 0; i < N * H; ++i)
      x[i] += tmp[i];
  }
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  std::vector<float> last(R * H);
  for (int64_t i = 0; i < R; ++i) {
    std::memcpy(&last[i * H], &x[int64_t{b.logit_rows[i]} * H], H * sizeof(float));
  }
  cpu::rms_norm(last.data(), R, H, final_norm_.data(), eps, last.data());
  const auto& head = lm_head_.empty() ? embed_ : lm_head_;
  cpu::matmul_wt(last.data(), R, H, head.data(), V, logits.data());
}

void CpuBackend::forward_sample(const StepBatch& b, std::span<const DeviceSampling> rows,
                                std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs) {
  const size_t R = b.logit_rows.size(), V = static_cast<size_t>(cfg_.vocab_size);
  if (rows.size() != R || tokens.size() != R || (!logprobs.empty() && logprobs.size() != R)) {
    throw std::invalid_argument("CpuBackend::forward_sample: one sampling row per logit row");
  }
  sample_logits_.resize(R * V);
  forward(b, sample_logits_);
  for (size_t r = 0; r < R; ++r) {
    const DeviceSampling& d = rows[r];
    if (d.params == nullptr) throw std::invalid_argument("forward_sample: row without params");
    SamplingParams p = *d.params;
    // splitmix64 of (seed, sampled): one independent draw per (sequence, position).
    uint64_t x = d.seed ^ (d.sampled * 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    p.seed = x ^ (x >> 31);
    Sampler sampler(std::move(p));
    std::span<const int32_t> output = d.output_ids;
    std::vector<int32_t> with_last;  // the newest token the caller has not seen (launch_sample)
    if (d.last_token_row >= 0) {
      if (d.last_token_row >= b.num_tokens()) {
        throw std::invalid_argument("forward_sample: last_token_row is not a row of the step");
      }
      with_last.assign(output.begin(), output.end());
      with_last.push_back(b.token_ids[d.last_token_row]);
      output = with_last;
    }
    const std::span<float> row = std::span(sample_logits_).subspan(r * V, V);
    const bool want = !logprobs.empty() && d.logprobs >= 0;
    if (want) {
      if (d.logprobs > kMaxDeviceLogprobs) {
        throw std::invalid_argument("forward_sample: more than " +
                                    std::to_string(kMaxDeviceLogprobs) + " logprobs");
      }
      raw_.assign(row.begin(), row.end());  // sample() rewrites the row
    }
    tokens[r] = sampler.sample(row, d.prompt_ids, output);
    if (!logprobs.empty()) logprobs[r] = {};
    if (want) {
      logprobs[r].logprob = Sampler::token_logprob(raw_, tokens[r]);
      if (d.logprobs > 0) logprobs[r].top = Sampler::top_logprobs(raw_, d.logprobs);
    }
  }
}

void CpuBackend::fold_key_scales(const std::vector<std::vector<float>>& scales) {
  validate_key_scales(cfg_, scales);
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    fold_key_scales_layer(cfg_, scales[l], layers_[l].wqkv, layers_[l].bqkv);
  }
}

void CpuBackend::apply_o_proj(int32_t layer, const float* attn, int64_t rows, float* out) const {
  const Layer& L = layers_.at(layer);
  cpu::matmul_wt(attn, rows, cfg_.q_width(), L.wo.data(), cfg_.hidden_size, out, L.bo);
}

}  // namespace pmkv
