#include "engine/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include <spdlog/spdlog.h>

#include "engine/common/error.h"

namespace pmkv {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float sanitized(float x) {
  return std::isnan(x) ? kNegInf : x;
}

// Descending logit, then ascending id: the order of "most likely first" everywhere here.
bool more_likely(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// log(sum(exp(x))) in double; -inf when every entry is -inf (or NaN).
double logsumexp(std::span<const float> logits) {
  float max = kNegInf;
  for (float x : logits) {
    max = std::max(max, sanitized(x));
  }
  if (max == kNegInf) return -std::numeric_limits<double>::infinity();
  if (std::isinf(max)) return std::numeric_limits<double>::infinity();
  double sum = 0.0;
  for (float x : logits) {
    sum += std::exp(static_cast<double>(sanitized(x)) - max);
  }
  return static_cast<double>(max) + std::log(sum);
}

float logprob_of(float logit, double lse) {
  if (std::isinf(lse)) return kNegInf;  // no finite distribution
  return static_cast<float>(static_cast<double>(sanitized(logit)) - lse);
}

void check_history_id(int32_t id, size_t vocab, const char* which) {
  if (id < 0 || static_cast<size_t>(id) >= vocab) {
    throw InvalidArgument(std::string("Sampler: ") + which + " token id " + std::to_string(id) +
                          " is outside the logits [0, " + std::to_string(vocab) + ")");
  }
}

// A uniform double in [0, 1) from the top 53 bits of one draw (fully specified, unlike
// std::uniform_real_distribution, so a seed gives the same tokens on every standard library).
double uniform01(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

// Moves to the front of cand the shortest head, in more_likely order, whose mass (sum of .first)
// reaches target (all of cand if none does; at least one entry) and returns its length. A
// quickselect on mass: expected O(n), no full sort, whatever the shape of the distribution.
size_t top_p_prefix(std::vector<std::pair<float, int32_t>>& cand, double target) {
  using Entry = std::pair<float, int32_t>;
  size_t lo = 0;
  size_t hi = cand.size();
  double before = 0.0;  // mass of cand[0, lo), all of it in the head
  while (hi - lo > 32) {
    // Median of three (deterministic, so a seed replays exactly).
    Entry a = cand[lo], b = cand[lo + (hi - lo) / 2], c = cand[hi - 1];
    if (more_likely(b, a)) std::swap(a, b);
    if (more_likely(c, b)) std::swap(b, c);
    if (more_likely(b, a)) std::swap(a, b);
    const Entry pivot = b;
    // [lo, mid): more likely than the pivot; then the pivot itself; then less likely.
    const auto first = cand.begin() + static_cast<std::ptrdiff_t>(lo);
    const auto last = cand.begin() + static_cast<std::ptrdiff_t>(hi);
    const auto mid =
        std::partition(first, last, [&](const Entry& e) { return more_likely(e, pivot); });
    std::iter_swap(mid, std::find(mid, last, pivot));
    double above = 0.0;
    for (auto it = first; it != mid; ++it) {
      above += it->first;
    }
    const auto pivot_pos = static_cast<size_t>(mid - cand.begin());
    if (before + above >= target) {
      hi = pivot_pos;  // the head ends before the pivot
    } else if (before + above + pivot.first >= target) {
      return pivot_pos + 1;  // the pivot completes the head
    } else {
      before += above + pivot.first;
      lo = pivot_pos + 1;
    }
  }
  const auto first = cand.begin() + static_cast<std::ptrdiff_t>(lo);
  std::sort(first, cand.begin() + static_cast<std::ptrdiff_t>(hi), more_likely);
  size_t keep = lo;
  while (keep < hi && before < target) {
    before += cand[keep++].first;
  }
  return std::max<size_t>(keep, 1);
}

// Puts cand (distinct ids below vocab) in id order: a sort when it is small, else a scatter into a
// vocabulary-sized row and one pass over it (a top-p of 0.95 over a flat 128K vocabulary keeps
// most of it: sorting took a draw from 5.7 to 18 ms; this pass costs about what the filters do).
void order_by_id(std::vector<std::pair<float, int32_t>>& cand, size_t vocab) {
  const auto n = static_cast<double>(cand.size());
  if (cand.size() < 2) return;
  if (n * std::log2(n) < static_cast<double>(vocab)) {
    std::sort(cand.begin(), cand.end(),
              [](const auto& a, const auto& b) { return a.second < b.second; });
    return;
  }
  thread_local std::vector<float> weight_of;  // per thread: Samplers are per sequence
  weight_of.assign(vocab, -1.0f);             // kept weights are >= 0
  for (const auto& c : cand) {
    weight_of[static_cast<size_t>(c.second)] = c.first;
  }
  cand.clear();
  for (size_t i = 0; i < vocab; ++i) {
    if (weight_of[i] >= 0.0f) cand.emplace_back(weight_of[i], static_cast<int32_t>(i));
  }
}

}  // namespace

Sampler::Sampler(SamplingParams params, std::optional<uint64_t> fallback_seed)
    : params_(std::move(params)) {
  if (params_.seed) {
    seed_ = *params_.seed;
  } else if (fallback_seed) {
    seed_ = *fallback_seed;
  } else {
    std::random_device rd;
    seed_ = (static_cast<uint64_t>(rd()) << 32) ^ static_cast<uint64_t>(rd());
  }
  rng_.seed(seed_);
  track_prompt_ = params_.repetition_penalty != 1.0f;
  track_output_ =
      track_prompt_ || params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f;
}

void Sampler::reset() {
  prompt_seen_ = false;
  prompt_tokens_.clear();
  out_counts_.clear();
  outputs_seen_ = 0;
}

void Sampler::sync_history(std::span<const int32_t> prompt_ids, std::span<const int32_t> output_ids,
                           size_t vocab) {
  if (track_prompt_ && !prompt_seen_) {
    for (int32_t id : prompt_ids) {
      check_history_id(id, vocab, "prompt");
    }
    prompt_tokens_.assign(prompt_ids.begin(), prompt_ids.end());
    std::sort(prompt_tokens_.begin(), prompt_tokens_.end());
    prompt_tokens_.erase(std::unique(prompt_tokens_.begin(), prompt_tokens_.end()),
                         prompt_tokens_.end());
    prompt_seen_ = true;
  }
  if (!track_output_) return;
  if (output_ids.size() < outputs_seen_) {
    out_counts_.clear();
    outputs_seen_ = 0;
  }
  for (size_t i = outputs_seen_; i < output_ids.size(); ++i) {
    check_history_id(output_ids[i], vocab, "output");
    ++out_counts_[output_ids[i]];
  }
  outputs_seen_ = output_ids.size();
}

void Sampler::apply_penalties(std::span<float> logits) const {
  const float r = params_.repetition_penalty;
  if (r != 1.0f) {
    auto penalize = [&](int32_t id) {
      float& l = logits[static_cast<size_t>(id)];
      l = l > 0.0f ? l / r : l * r;
    };
    for (int32_t id : prompt_tokens_) {
      penalize(id);
    }
    for (const auto& [id, count] : out_counts_) {
      if (!std::binary_search(prompt_tokens_.begin(), prompt_tokens_.end(), id)) penalize(id);
    }
  }
  const float freq = params_.frequency_penalty;
  const float pres = params_.presence_penalty;
  if (freq != 0.0f || pres != 0.0f) {
    for (const auto& [id, count] : out_counts_) {
      float& l = logits[static_cast<size_t>(id)];
      l -= freq * static_cast<float>(count);
      l -= pres;  // count > 0 for every entry
    }
  }
}

int32_t Sampler::sample(std::span<float> logits, std::span<const int32_t> prompt_ids,
                        std::span<const int32_t> output_ids) {
  if (logits.empty()) throw InvalidArgument("Sampler: empty logits");
  sync_history(prompt_ids, output_ids, logits.size());
  apply_penalties(logits);

  if (params_.greedy()) {
    int32_t best = 0;
    float best_logit = sanitized(logits[0]);
    for (size_t i = 1; i < logits.size(); ++i) {
      const float l = sanitized(logits[i]);
      if (l > best_logit) {
        best_logit = l;
        best = static_cast<int32_t>(i);
      }
    }
    return best;
  }
  return draw(logits);
}

int32_t Sampler::draw(std::span<float> logits) {
  if (params_.temperature != 1.0f) {
    for (float& l : logits) {
      l /= params_.temperature;
    }
  }

  // Candidates: (logit, id) of every token with a logit above -inf.
  auto& cand = candidates_;
  cand.clear();
  float max = kNegInf;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float l = sanitized(logits[i]);
    if (l == kNegInf) continue;
    cand.emplace_back(l, static_cast<int32_t>(i));
    max = std::max(max, l);
  }
  if (cand.empty()) {
    spdlog::warn("Sampler: no token has a finite logit; answering token 0");
    return 0;
  }
  if (std::isinf(max)) {
    // +inf logits: the distribution is uniform over them.
    std::erase_if(cand, [](const auto& c) { return !std::isinf(c.first); });
    for (auto& c : cand) {
      c.first = 0.0f;
    }
    max = 0.0f;
  }

  // top-k, on the logits: keep the k most likely and every token tied with the k-th (vLLM keeps
  // logits >= the k-th largest value).
  const auto k = static_cast<size_t>(std::max(params_.top_k, 0));
  if (k > 0 && k < cand.size()) {
    std::nth_element(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(k - 1), cand.end(),
                     more_likely);
    const float kth = cand[k - 1].first;
    std::erase_if(cand, [kth](const auto& c) { return c.first < kth; });
  }

  // From here on .first is the unnormalised probability exp(logit - max), in [0, 1], 1 for the
  // most likely token (top-k keeps it, so max is still the maximum). Same order as the logits.
  for (auto& c : cand) {
    c.first = std::exp(c.first - max);
  }

  // top-p: the most likely tokens while the mass before them is < top_p (vLLM: drop a token when
  // the ascending cumulative mass up to it is <= 1 - top_p; the most likely always stays).
  if (params_.top_p < 1.0f) {
    double total = 0.0;
    for (const auto& c : cand) {
      total += c.first;
    }
    cand.resize(top_p_prefix(cand, static_cast<double>(params_.top_p) * total));
  }

  // min-p: drop p < min_p * p_max, i.e. weight < min_p (the top weight is 1).
  if (params_.min_p > 0.0f) {
    const float min_p = params_.min_p;
    std::erase_if(cand, [min_p](const auto& c) { return c.first < min_p; });
  }

  // The draw walks the kept tokens in id order, as the GPU's does. top-k and top-p leave them in
  // whatever order their selections made, which hangs on comparisons of nearly equal
  // probabilities: logits a rounding apart (another batch, other BLAS row blocking) then swapped
  // two tokens and moved every CDF boundary after them, and a seeded request sampled other tokens
  // beside other requests (20 of 40 top-p requests on stories260K). In id order the draw moves
  // only as far as the probabilities do.
  if (k > 0 || params_.top_p < 1.0f) order_by_id(cand, logits.size());
  double total = 0.0;
  for (const auto& c : cand) {
    total += c.first;
  }
  const double u = uniform01(rng_) * total;
  double cumulative = 0.0;
  for (const auto& c : cand) {
    cumulative += c.first;
    if (u < cumulative) return c.second;
  }
  return cand.back().second;  // u rounded up to total
}

void Sampler::log_softmax(std::span<const float> logits, std::span<float> out) {
  if (out.size() != logits.size()) {
    throw InvalidArgument("Sampler::log_softmax: out has " + std::to_string(out.size()) +
                          " entries for " + std::to_string(logits.size()) + " logits");
  }
  const double lse = logsumexp(logits);
  for (size_t i = 0; i < logits.size(); ++i) {
    out[i] = logprob_of(logits[i], lse);
  }
}

std::vector<std::pair<int32_t, float>> Sampler::top_logprobs(std::span<const float> logits, int n) {
  const size_t count = std::min(static_cast<size_t>(std::max(n, 0)), logits.size());
  if (count == 0) return {};
  std::vector<std::pair<float, int32_t>> all(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    all[i] = {sanitized(logits[i]), static_cast<int32_t>(i)};
  }
  std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(count), all.end(),
                    more_likely);
  const double lse = logsumexp(logits);
  std::vector<std::pair<int32_t, float>> top(count);
  for (size_t i = 0; i < count; ++i) {
    top[i] = {all[i].second, logprob_of(all[i].first, lse)};
  }
  return top;
}

float Sampler::token_logprob(std::span<const float> logits, int32_t token) {
  if (token < 0 || static_cast<size_t>(token) >= logits.size()) {
    throw InvalidArgument("Sampler::token_logprob: token id " + std::to_string(token) +
                          " is outside the logits [0, " + std::to_string(logits.size()) + ")");
  }
  return logprob_of(logits[static_cast<size_t>(token)], logsumexp(logits));
}

}  // namespace pmkv
