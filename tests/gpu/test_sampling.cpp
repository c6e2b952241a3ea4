// Sampling kernel against the CPU Sampler (engine/sampling/sampler.cpp) on fresh random logits:
// the rewritten logits (penalties, temperature), greedy tokens, the kept set of every sampled
// token, the distribution of draws over many Philox offsets, determinism and row independence,
// and the log-probabilities (raw logits) against Sampler::token_logprob / top_logprobs.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <span>
#include <vector>

#include "engine/sampling/sampler.h"
#include "engine/sampling/sampling_params.h"
#include "kernels/sampling/sampling.h"
#include "tests/gpu/gpu_test_util.h"

using namespace pmkv;
using gputest::DeviceBuffer;

// The backend uploads one SamplingRow per row as is; the layout is part of the interface.
static_assert(sizeof(kernels::SamplingRow) == 56);
static_assert(offsetof(kernels::SamplingRow, logprobs) == 28);
static_assert(offsetof(kernels::SamplingRow, logprob_slot) == 32);
static_assert(offsetof(kernels::SamplingRow, seed) == 40);
static_assert(offsetof(kernels::SamplingRow, offset) == 48);

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct History {
  std::vector<int32_t> prompt;
  std::vector<int32_t> output;
};

// The host side of one launch.
struct Batch {
  int32_t vocab = 0;
  std::vector<float> logits;  // [rows, vocab]
  std::vector<SamplingParams> params;
  std::vector<uint64_t> seeds;
  std::vector<uint64_t> offsets;
  std::vector<History> hist;
  bool pass_history = true;  // false: hist_starts = nullptr (only when no row has a penalty)
  // Steps run ahead: each row's last output token stays out of the CSR and comes through
  // hist_last_row instead (rows without output: -1).
  bool last_on_device = false;
  // Log-probabilities per row (-1: none); empty: the launch passes no output buffers.
  std::vector<int32_t> logprobs;

  int32_t rows() const { return static_cast<int32_t>(params.size()); }
  std::span<const float> row(int32_t r) const {
    return {logits.data() + static_cast<size_t>(r) * vocab, static_cast<size_t>(vocab)};
  }
  void add_row(std::span<const float> l, const SamplingParams& p, uint64_t seed, uint64_t offset,
               History h) {
    logits.insert(logits.end(), l.begin(), l.end());
    params.push_back(p);
    seeds.push_back(seed);
    offsets.push_back(offset);
    hist.push_back(std::move(h));
  }
};

kernels::SamplingRow to_row(const SamplingParams& p, uint64_t seed, uint64_t offset) {
  kernels::SamplingRow r{};
  r.temperature = p.temperature;
  r.top_k = p.top_k;
  r.top_p = p.top_p;
  r.min_p = p.min_p;
  r.repetition_penalty = p.repetition_penalty;
  r.presence_penalty = p.presence_penalty;
  r.frequency_penalty = p.frequency_penalty;
  r.seed = seed;
  r.offset = offset;
  return r;
}

struct GpuOut {
  std::vector<int32_t> tokens;
  std::vector<float> logits;
  std::vector<float> logprob;       // [rows] (poison where not written)
  std::vector<int32_t> top_ids;     // [rows * kMaxSamplingLogprobs]
  std::vector<float> top_logprobs;  // [rows * kMaxSamplingLogprobs]
};

// Uploads the batch (fresh logits: the kernel rewrites them), poisons the output, launches and
// downloads tokens and logits.
GpuOut run_gpu(const Batch& b) {
  const int32_t rows = b.rows();
  std::vector<kernels::SamplingRow> prm(rows);
  std::vector<int32_t> starts = {0};
  std::vector<int32_t> ids;
  std::vector<int32_t> counts;
  std::vector<uint8_t> in_prompt;
  std::vector<int32_t> last_rows(rows, -1), step_tokens = {7};  // (never empty)
  int32_t copies = 0;
  for (int32_t r = 0; r < rows; ++r) {
    prm[r] = to_row(b.params[r], b.seeds[r], b.offsets[r]);
    prm[r].logprobs = b.logprobs.empty() ? -1 : b.logprobs[r];
    prm[r].logprob_slot = -1;
    if (prm[r].logprobs >= 0 && kernels::sampling_rewrites_row(prm[r], b.pass_history)) {
      prm[r].logprob_slot = copies++;
    }
    std::map<int32_t, std::pair<int32_t, uint8_t>> distinct;  // id -> (output count, in prompt)
    for (int32_t id : b.hist[r].prompt)
      distinct[id].second = 1;
    std::span<const int32_t> output = b.hist[r].output;
    if (b.last_on_device && !output.empty()) {
      last_rows[r] = static_cast<int32_t>(step_tokens.size());
      step_tokens.push_back(output.back());
      output = output.first(output.size() - 1);
    }
    for (int32_t id : output)
      ++distinct[id].first;
    for (const auto& [id, e] : distinct) {
      ids.push_back(id);
      counts.push_back(e.first);
      in_prompt.push_back(e.second);
    }
    starts.push_back(static_cast<int32_t>(ids.size()));
  }
  // Never empty buffers (a null hist_ids is rejected); the extra entry is outside every row.
  ids.push_back(0);
  counts.push_back(0);
  in_prompt.push_back(0);

  DeviceBuffer<float> d_logits;
  DeviceBuffer<kernels::SamplingRow> d_params;
  DeviceBuffer<int32_t> d_starts, d_ids, d_counts, d_out(static_cast<size_t>(rows));
  DeviceBuffer<int32_t> d_last_rows, d_step_tokens;
  CUDA_REQUIRE(d_last_rows.upload(last_rows));
  CUDA_REQUIRE(d_step_tokens.upload(step_tokens));
  DeviceBuffer<uint8_t> d_in_prompt;
  CUDA_REQUIRE(d_logits.upload(b.logits));
  CUDA_REQUIRE(d_params.upload(prm));
  CUDA_REQUIRE(d_starts.upload(starts));
  CUDA_REQUIRE(d_ids.upload(ids));
  CUDA_REQUIRE(d_counts.upload(counts));
  CUDA_REQUIRE(d_in_prompt.upload(in_prompt));
  CUDA_REQUIRE(d_out.poison());  // -1 everywhere: a row the kernel skips shows up
  const int64_t ws_bytes = kernels::sampling_workspace_bytes(rows, b.vocab, copies);
  const size_t top_n = static_cast<size_t>(rows) * kernels::kMaxSamplingLogprobs;
  DeviceBuffer<float> d_lp(static_cast<size_t>(rows)), d_top_lp(top_n);
  DeviceBuffer<int32_t> d_top_ids(top_n);
  CUDA_REQUIRE(d_lp.poison());
  CUDA_REQUIRE(d_top_lp.poison());
  CUDA_REQUIRE(d_top_ids.poison());
  DeviceBuffer<uint8_t> d_ws(static_cast<size_t>(std::max<int64_t>(ws_bytes, 1)));
  CUDA_REQUIRE(d_ws.poison());

  kernels::SamplingLaunch l;
  l.logits = d_logits.get();
  l.rows = rows;
  l.vocab = b.vocab;
  l.params = d_params.get();
  if (b.pass_history) {
    l.hist_starts = d_starts.get();
    l.hist_ids = d_ids.get();
    l.hist_output_counts = d_counts.get();
    l.hist_in_prompt = d_in_prompt.get();
    if (b.last_on_device) {
      l.hist_last_row = d_last_rows.get();
      l.tokens = d_step_tokens.get();
    }
  }
  l.out_tokens = d_out.get();
  if (!b.logprobs.empty()) {
    l.out_logprob = d_lp.get();
    l.out_top_ids = d_top_ids.get();
    l.out_top_logprobs = d_top_lp.get();
    l.logprob_copies = copies;
  }
  l.workspace = d_ws.get();
  l.workspace_bytes = ws_bytes;
  CUDA_REQUIRE_LAUNCH(kernels::launch_sampling(l, nullptr));
  GpuOut out;
  CUDA_REQUIRE(d_out.download(out.tokens));
  CUDA_REQUIRE(d_logits.download(out.logits));
  CUDA_REQUIRE(d_lp.download(out.logprob));
  CUDA_REQUIRE(d_top_ids.download(out.top_ids));
  CUDA_REQUIRE(d_top_lp.download(out.top_logprobs));
  return out;
}

struct CpuOut {
  int32_t token;
  std::vector<float> logits;  // rewritten by the Sampler (penalties, temperature)
};

CpuOut run_cpu(const Batch& b, int32_t r) {
  const std::span<const float> in = b.row(r);
  CpuOut out{0, std::vector<float>(in.begin(), in.end())};
  Sampler sampler(b.params[r], b.seeds[r]);
  out.token = sampler.sample(out.logits, b.hist[r].prompt, b.hist[r].output);
  return out;
}

// Distance in ulps (0 for two NaNs, huge for one NaN).
int64_t ulps(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0 : INT64_MAX;
  if (a == b) return 0;
  auto ordered = [](float f) {
    int32_t i;
    std::memcpy(&i, &f, 4);
    return i < 0 ? static_cast<int64_t>(INT32_MIN) - i : static_cast<int64_t>(i);
  };
  return std::llabs(ordered(a) - ordered(b));
}

// The kept set of a non-greedy row, computed from the rewritten logits the way Sampler::draw does
// (same std::exp in float, same (probability desc, id asc) order, same double sums).
//  keep: the CPU's kept set; prob: the draw probability of each token.
//  ambiguous: some token's membership hangs on a margin the GPU may round differently (expf is
//    within 2 ulp on the GPU, glibc's within 0.5; the GPU sums masses in 2^-40 fixed point);
//    loose then holds every token either rounding could keep.
struct KeptSet {
  std::vector<uint8_t> keep;
  std::vector<uint8_t> loose;
  std::vector<double> prob;
  bool ambiguous = false;
  size_t size = 0;
};

KeptSet reference_kept(std::span<const float> l, const SamplingParams& sp) {
  const size_t n_vocab = l.size();
  constexpr double kRel = 4e-7;  // 2.5 float ulps and more: the expf disagreement
  KeptSet ks;
  ks.keep.assign(n_vocab, 0);
  ks.loose.assign(n_vocab, 0);
  ks.prob.assign(n_vocab, 0.0);
  std::vector<std::pair<float, int32_t>> cand;
  float max = -kInf;
  for (size_t i = 0; i < n_vocab; ++i) {
    const float v = std::isnan(l[i]) ? -kInf : l[i];
    if (v == -kInf) continue;
    cand.emplace_back(v, static_cast<int32_t>(i));
    max = std::max(max, v);
  }
  if (cand.empty()) {
    ks.keep[0] = ks.loose[0] = 1;
    ks.prob[0] = 1.0;
    ks.size = 1;
    return ks;
  }
  if (std::isinf(max)) {
    std::erase_if(cand, [](const auto& c) { return !std::isinf(c.first); });
    for (auto& c : cand)
      c.first = 0.0f;
    max = 0.0f;
  }
  const auto k = static_cast<size_t>(std::max(sp.top_k, 0));
  if (k > 0 && k < cand.size()) {
    std::vector<float> vals;
    for (const auto& c : cand)
      vals.push_back(c.first);
    std::sort(vals.begin(), vals.end(), std::greater<>());
    const float kth = vals[k - 1];
    std::erase_if(cand, [kth](const auto& c) { return c.first < kth; });
  }
  for (auto& c : cand)
    c.first = std::exp(c.first - max);
  std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  const size_t n = cand.size();
  size_t n_keep = n;
  size_t n_loose = n;
  float loose_w = 0.0f;  // top-p: the loose set keeps w >= this
  if (sp.top_p < 1.0f) {
    std::vector<double> prefix(n + 1, 0.0);
    for (size_t j = 0; j < n; ++j)
      prefix[j + 1] = prefix[j] + cand[j].first;
    const double total = prefix[n];
    const double target = static_cast<double>(sp.top_p) * total;
    const double tol = kRel * total + static_cast<double>(n_vocab) * 0x1p-40;
    n_keep = 0;
    while (n_keep < n && prefix[n_keep] < target)
      ++n_keep;
    n_keep = std::max<size_t>(n_keep, 1);
    n_loose = n_keep;
    while (n_loose < n && prefix[n_loose] < target + tol)
      ++n_loose;
    if (prefix[n_keep - 1] >= target - tol || n_loose != n_keep) ks.ambiguous = true;
    // A weight within a few ulps of the boundary one (but not equal) may swap sides.
    const float wb = cand[n_keep - 1].first;
    for (const auto& c : cand) {
      if (c.first != wb && std::fabs(c.first - wb) <= kRel * wb) ks.ambiguous = true;
    }
    loose_w = static_cast<float>(cand[n_loose - 1].first * (1.0 - kRel));
  }
  for (size_t j = 0; j < n; ++j) {
    const float w = cand[j].first;
    const int32_t id = cand[j].second;
    // w == 1 is exp(0) of the maximum itself, exact on both sides (min_p = 1 keeps it).
    if (sp.min_p > 0.0f && j < n_loose && w != 1.0f && std::fabs(w - sp.min_p) <= kRel * sp.min_p) {
      ks.ambiguous = true;
    }
    const bool min_p_ok = !(sp.min_p > 0.0f) || !(w < sp.min_p);
    const bool min_p_loose = !(sp.min_p > 0.0f) || w >= sp.min_p * (1.0 - kRel);
    if (j < n_keep && min_p_ok) ks.keep[id] = 1;
    if ((sp.top_p >= 1.0f || w >= loose_w) && min_p_loose) ks.loose[id] = 1;
  }
  double kept_total = 0.0;
  for (const auto& c : cand) {
    if (ks.keep[c.second]) kept_total += c.first;
  }
  for (const auto& c : cand) {
    if (ks.keep[c.second]) {
      ks.prob[c.second] = c.first / kept_total;
      ++ks.size;
    }
  }
  for (size_t i = 0; i < n_vocab; ++i)
    ks.loose[i] |= ks.keep[i];
  return ks;
}

// Random logits with the cases the kernel special-cases planted: ties (also at the maximum and
// among the best), NaN, -inf, sometimes +inf, an all-masked row, a constant row.
std::vector<float> random_logits(int32_t vocab, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float scales[] = {0.3f, 1.0f, 2.5f, 6.0f};
  const float scale = scales[rng() % 4];
  std::vector<float> l(static_cast<size_t>(vocab));
  for (float& x : l)
    x = normal(rng) * scale;
  auto pick = [&] { return static_cast<size_t>(rng() % static_cast<uint32_t>(vocab)); };
  const int kind = static_cast<int>(rng() % 20);
  if (kind == 0) {  // nothing finite
    for (float& x : l)
      x = rng() % 2 != 0 ? kNaN : -kInf;
    return l;
  }
  if (kind == 1) {  // constant row: every token tied
    std::fill(l.begin(), l.end(), normal(rng));
  }
  if (kind == 2) {  // coarse values: many ties everywhere
    for (float& x : l)
      x = std::round(x);
  }
  // Ties: copies of random values, and of the maximum (so argmax ties and top-k/top-p
  // boundaries land on tied values).
  const int ties = 1 + vocab / 64;
  for (int t = 0; t < ties; ++t)
    l[pick()] = l[pick()];
  const size_t top = static_cast<size_t>(std::max_element(l.begin(), l.end()) - l.begin());
  for (int t = static_cast<int>(rng() % 4); t > 0; --t)
    l[pick()] = l[top];
  for (int t = static_cast<int>(rng() % 4); t > 0; --t)
    l[pick()] = kNaN;
  for (int t = static_cast<int>(rng() % 4); t > 0; --t)
    l[pick()] = -kInf;
  if (kind == 3) {
    for (int t = 1 + static_cast<int>(rng() % 3); t > 0; --t)
      l[pick()] = kInf;
  }
  return l;
}

SamplingParams random_params(int32_t vocab, std::mt19937& rng) {
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  SamplingParams p;
  const uint32_t t = rng() % 8;
  p.temperature = t < 2 ? 0.0f : (t == 2 ? 1.0f : 0.2f + 1.8f * u01(rng));
  const uint32_t k = rng() % 8;
  if (k < 3) {
    p.top_k = 0;
  } else if (k == 3) {
    p.top_k = -1;
  } else if (k < 6) {
    p.top_k = 1 + static_cast<int32_t>(rng() % 50);
  } else {
    p.top_k = 1 + static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
  }
  p.top_p = rng() % 5 < 2 ? 1.0f : 0.05f + 0.949f * u01(rng);
  p.min_p = rng() % 2 != 0 ? 0.0f : (rng() % 4 == 0 ? 1.0f : 0.5f * u01(rng));
  p.repetition_penalty = rng() % 2 != 0 ? 1.0f : 0.5f + 1.5f * u01(rng);
  p.presence_penalty = rng() % 2 != 0 ? 0.0f : 4.0f * u01(rng) - 2.0f;
  p.frequency_penalty = rng() % 2 != 0 ? 0.0f : 4.0f * u01(rng) - 2.0f;
  p.validate();
  return p;
}

// Prompt and output ids, half of them among the row's most likely tokens so that the penalties
// move the argmax and the filters' boundaries.
History random_history(std::span<const float> l, std::mt19937& rng) {
  const auto vocab = static_cast<uint32_t>(l.size());
  std::vector<int32_t> best(std::min<size_t>(l.size(), 16));
  std::vector<int32_t> order(l.size());
  for (size_t i = 0; i < l.size(); ++i)
    order[i] = static_cast<int32_t>(i);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(best.size()),
                    order.end(), [&](int32_t a, int32_t b) {
                      const float x = std::isnan(l[a]) ? -kInf : l[a];
                      const float y = std::isnan(l[b]) ? -kInf : l[b];
                      return x > y;
                    });
  std::copy(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(best.size()), best.begin());
  auto id = [&] {
    return rng() % 2 != 0 ? best[rng() % best.size()] : static_cast<int32_t>(rng() % vocab);
  };
  History h;
  for (int n = static_cast<int>(rng() % 40); n > 0; --n)
    h.prompt.push_back(id());
  for (int n = static_cast<int>(rng() % 24); n > 0; --n)
    h.output.push_back(id());
  return h;
}

bool has_penalty(const SamplingParams& p) {
  return p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
}

}  // namespace

TEST_CASE("gpu sampling: logits, greedy tokens and kept sets match the CPU Sampler",
          "[gpu][sampling]") {
  std::mt19937 rng(gputest::test_seed("sampling"));
  const int32_t vocabs[] = {1, 2, 7, 33, 1000, 4099, 32000, 131072, 262144};
  int ambiguous_rows = 0;
  int sampled_rows = 0;
  for (const int32_t vocab : vocabs) {
    const int batches = vocab >= 100000 ? 2 : 4;
    const int32_t rows = vocab >= 100000 ? 12 : 40;
    for (int bi = 0; bi < batches; ++bi) {
      Batch b;
      b.vocab = vocab;
      for (int32_t r = 0; r < rows; ++r) {
        const std::vector<float> l = random_logits(vocab, rng);
        const SamplingParams p = random_params(vocab, rng);
        b.add_row(l, p, (static_cast<uint64_t>(rng()) << 32) | rng(), rng() % 100000,
                  random_history(l, rng));
      }
      const bool any_penalty = std::any_of(b.params.begin(), b.params.end(), has_penalty);
      b.pass_history = any_penalty || rng() % 2 != 0;
      INFO("vocab " << vocab << " batch " << bi);

      const GpuOut gpu = run_gpu(b);
      for (int32_t r = 0; r < rows; ++r) {
        const SamplingParams& p = b.params[r];
        INFO("row " << r << ": temperature " << p.temperature << " top_k " << p.top_k << " top_p "
                    << p.top_p << " min_p " << p.min_p << " rep " << p.repetition_penalty
                    << " pres " << p.presence_penalty << " freq " << p.frequency_penalty);
        const CpuOut cpu = run_cpu(b, r);
        const int32_t token = gpu.tokens[r];
        REQUIRE(token >= 0);
        REQUIRE(token < vocab);
        // (2) The rewritten logits: the same IEEE operations in the same order.
        int64_t worst = 0;
        for (int32_t i = 0; i < vocab; ++i)
          worst =
              std::max(worst, ulps(cpu.logits[i], gpu.logits[static_cast<size_t>(r) * vocab + i]));
        INFO("worst logit difference " << worst << " ulps");
        REQUIRE(worst <= 2);
        if (p.greedy()) {
          // (1) Greedy: the CPU's argmax, lowest id on ties.
          REQUIRE(token == cpu.token);
          continue;
        }
        // (3) The sampled token is in the kept set the CPU's filters compute.
        const KeptSet ks = reference_kept(cpu.logits, p);
        ++sampled_rows;
        INFO("kept " << ks.size << " tokens, sampled " << token << ", ambiguous " << ks.ambiguous);
        if (ks.ambiguous) {
          ++ambiguous_rows;
          REQUIRE(ks.loose[token] != 0);
        } else {
          REQUIRE(ks.keep[token] != 0);
        }
        if (ks.size == 1 && !ks.ambiguous) REQUIRE(token == cpu.token);
      }

      // (4) Same inputs, seeds and offsets: the same tokens and logits.
      const GpuOut again = run_gpu(b);
      REQUIRE(again.tokens == gpu.tokens);
      REQUIRE(std::memcmp(again.logits.data(), gpu.logits.data(), gpu.logits.size() * 4) == 0);

      // (5) Rows are independent: a row alone gives the token it got in the batch.
      for (int t = 0; t < 4; ++t) {
        const auto r = static_cast<int32_t>(rng() % static_cast<uint32_t>(rows));
        Batch one;
        one.vocab = vocab;
        one.pass_history = b.pass_history;
        one.add_row(b.row(r), b.params[r], b.seeds[r], b.offsets[r], b.hist[r]);
        const GpuOut alone = run_gpu(one);
        INFO("row " << r << " alone");
        REQUIRE(alone.tokens[0] == gpu.tokens[r]);
        REQUIRE(std::memcmp(alone.logits.data(), gpu.logits.data() + static_cast<size_t>(r) * vocab,
                            static_cast<size_t>(vocab) * 4) == 0);
      }
    }
  }
  std::printf("[sampling] %d sampled rows, %d with an ambiguous boundary (loose check)\n",
              sampled_rows, ambiguous_rows);
}

namespace {

// The tail bound on |count - n p| that a Binomial(n, p) count exceeds with probability at most
// delta (Bernstein: P(|S - np| >= t) <= 2 exp(-t^2 / (2 (np(1-p) + t/3)))).
double bernstein_bound(int n, double p, double delta) {
  const double lg = std::log(2.0 / delta);
  const double var = n * p * (1.0 - p);
  return lg / 3.0 + std::sqrt(lg * lg / 9.0 + 2.0 * lg * var);
}

// Draws one row's token at `draws` consecutive offsets (512 rows a launch, each its own offset)
// and checks the counts against the kept set's probabilities.
void check_distribution(const std::vector<float>& l, const SamplingParams& p, const History& h,
                        uint64_t seed, int draws) {
  const auto vocab = static_cast<int32_t>(l.size());
  // The reference sees the logits the kernel rewrites: run the CPU once for them.
  Batch probe;
  probe.vocab = vocab;
  probe.add_row(l, p, seed, 0, h);
  const CpuOut cpu = run_cpu(probe, 0);
  const KeptSet ks = reference_kept(cpu.logits, p);
  REQUIRE_FALSE(ks.ambiguous);  // the cases below are chosen clear of rounding margins

  std::vector<int> counts(static_cast<size_t>(vocab), 0);
  std::vector<int32_t> first;
  constexpr int32_t kRows = 512;
  for (int done = 0; done < draws; done += kRows) {
    Batch b;
    b.vocab = vocab;
    for (int32_t r = 0; r < kRows; ++r)
      b.add_row(l, p, seed, static_cast<uint64_t>(done + r), h);
    const GpuOut gpu = run_gpu(b);
    for (int32_t r = 0; r < kRows; ++r) {
      REQUIRE(gpu.tokens[r] >= 0);
      REQUIRE(gpu.tokens[r] < vocab);
      ++counts[gpu.tokens[r]];
    }
    if (done == 0) {
      first = gpu.tokens;
      // Different offsets give different draws: with no token above probability 0.9, 512
      // equal draws have probability below 1e-23.
      if (*std::max_element(ks.prob.begin(), ks.prob.end()) < 0.9) {
        REQUIRE(std::any_of(first.begin(), first.end(), [&](int32_t t) { return t != first[0]; }));
      }
    }
  }
  // Same seed and offsets again: the same tokens.
  Batch b;
  b.vocab = vocab;
  for (int32_t r = 0; r < kRows; ++r)
    b.add_row(l, p, seed, static_cast<uint64_t>(r), h);
  REQUIRE(run_gpu(b).tokens == first);

  const int n = (draws + kRows - 1) / kRows * kRows;
  // Per token delta = 1e-9: with at most 64 tokens and 6 cases the whole test fails by chance
  // with probability below 4e-7.
  for (int32_t i = 0; i < vocab; ++i) {
    INFO("token " << i << ": " << counts[i] << " of " << n << " draws, p = " << ks.prob[i]);
    if (ks.keep[i] == 0) {
      REQUIRE(counts[i] == 0);
    } else {
      REQUIRE(std::fabs(counts[i] - n * ks.prob[i]) <= bernstein_bound(n, ks.prob[i], 1e-9));
    }
  }
}

}  // namespace

TEST_CASE("gpu sampling: a newest token kept out of the history (steps run ahead) counts the same",
          "[gpu][sampling]") {
  // The engine's async_steps: the host builds the penalty history without the token still in
  // flight and the kernel adds it from the step's input tokens (hist_last_row). The rewritten
  // logits and the tokens must be those of the full history, bit for bit: the same IEEE
  // operations on the same counts. Every row has penalties here; their last token is sometimes
  // new, sometimes repeated, sometimes a prompt token.
  std::mt19937 rng(gputest::test_seed("sampling_last"));
  int repeated = 0, fresh = 0;
  for (const int32_t vocab : {33, 1000, 32000, 131072}) {
    for (int bi = 0; bi < 3; ++bi) {
      Batch b;
      b.vocab = vocab;
      const int32_t rows = vocab >= 100000 ? 12 : 32;
      for (int32_t r = 0; r < rows; ++r) {
        const std::vector<float> l = random_logits(vocab, rng);
        SamplingParams p = random_params(vocab, rng);
        if (!has_penalty(p)) p.frequency_penalty = 0.25f;
        History h = random_history(l, rng);
        if (r % 4 == 0) h.output.clear();  // no output yet: nothing kept out
        if (r % 4 == 1 && !h.output.empty()) h.output.push_back(h.output.front());  // repeated
        if (r % 4 == 2 && !h.prompt.empty()) h.output.push_back(h.prompt.back());   // a prompt id
        if (!h.output.empty()) {
          const bool seen = std::count(h.output.begin(), h.output.end(), h.output.back()) > 1;
          (seen ? repeated : fresh) += 1;
        }
        b.add_row(l, p, (static_cast<uint64_t>(rng()) << 32) | rng(), rng() % 100000, std::move(h));
      }
      INFO("vocab " << vocab << " batch " << bi);
      const GpuOut full = run_gpu(b);
      b.last_on_device = true;
      const GpuOut ahead = run_gpu(b);
      CHECK(ahead.tokens == full.tokens);
      int64_t differ = 0;
      for (size_t i = 0; i < full.logits.size(); ++i)
        differ += std::memcmp(&full.logits[i], &ahead.logits[i], sizeof(float)) != 0 ? 1 : 0;
      CHECK(differ == 0);
    }
  }
  WARN("rows whose kept-out token repeats an output token: " << repeated << ", new: " << fresh);
  CHECK(repeated > 0);
  CHECK(fresh > 0);
}

TEST_CASE("gpu sampling: log-probabilities come from the raw logits like the CPU Sampler's",
          "[gpu][sampling]") {
  // Rows ask for none, the token's only, or up to 20 top entries, on rows that the launch
  // rewrites (penalties, temperature: those read a raw copy) and rows it does not; asking
  // changes no token and no rewritten logit. Every value is within 2 ulps of the CPU's (both
  // take logsumexp in double; only the order of its sum differs) and the top ids are the CPU's,
  // ties lowest id first.
  std::mt19937 rng(gputest::test_seed("sampling_logprobs"));
  const int32_t vocabs[] = {1, 7, 33, 4099, 131072};
  const int32_t asks[] = {-1, 0, 1, 3, 5, kernels::kMaxSamplingLogprobs};
  constexpr int32_t kTop = kernels::kMaxSamplingLogprobs;
  int copies = 0, rows_checked = 0, top_checked = 0;
  for (const int32_t vocab : vocabs) {
    for (int bi = 0; bi < 3; ++bi) {
      Batch b;
      b.vocab = vocab;
      const int32_t rows = vocab >= 100000 ? 12 : 32;
      for (int32_t r = 0; r < rows; ++r) {
        const std::vector<float> l = random_logits(vocab, rng);
        const SamplingParams p = random_params(vocab, rng);
        b.add_row(l, p, (static_cast<uint64_t>(rng()) << 32) | rng(), rng() % 100000,
                  random_history(l, rng));
        b.logprobs.push_back(asks[rng() % std::size(asks)]);
      }
      const bool any_penalty = std::any_of(b.params.begin(), b.params.end(), has_penalty);
      b.pass_history = any_penalty || rng() % 2 != 0;
      b.last_on_device = bi == 2;  // also with steps run ahead
      INFO("vocab " << vocab << " batch " << bi);
      Batch plain = b;
      plain.logprobs.clear();
      const GpuOut gpu = run_gpu(b);
      const GpuOut ref = run_gpu(plain);
      CHECK(gpu.tokens == ref.tokens);
      CHECK(std::memcmp(gpu.logits.data(), ref.logits.data(), gpu.logits.size() * 4) == 0);
      for (int32_t r = 0; r < rows; ++r) {
        INFO("row " << r << " logprobs " << b.logprobs[r] << " temperature "
                    << b.params[r].temperature);
        const std::span<const float> raw = b.row(r);
        const int32_t n = b.logprobs[r];
        const size_t base = static_cast<size_t>(r) * kTop;
        if (n < 0) {
          CHECK(std::isnan(gpu.logprob[r]));  // poison: not written
          for (int32_t j = 0; j < kTop; ++j)
            CHECK(gpu.top_ids[base + j] == -1);
          continue;
        }
        ++rows_checked;
        kernels::SamplingRow k = to_row(b.params[r], 0, 0);
        copies += kernels::sampling_rewrites_row(k, b.pass_history) ? 1 : 0;
        const float want = Sampler::token_logprob(raw, gpu.tokens[r]);
        INFO("token " << gpu.tokens[r] << " gpu " << gpu.logprob[r] << " cpu " << want);
        CHECK(ulps(gpu.logprob[r], want) <= 2);
        const auto top = Sampler::top_logprobs(raw, n);
        REQUIRE(top.size() == static_cast<size_t>(std::min(n, vocab)));
        for (size_t j = 0; j < top.size(); ++j) {
          INFO("top " << j);
          CHECK(gpu.top_ids[base + j] == top[j].first);
          CHECK(ulps(gpu.top_logprobs[base + j], top[j].second) <= 2);
          ++top_checked;
        }
        for (size_t j = top.size(); j < static_cast<size_t>(kTop); ++j)
          CHECK(gpu.top_ids[base + j] == -1);
      }
    }
  }
  std::printf("gpu sampling logprobs: %d rows (%d from a raw copy), %d top entries checked\n",
              rows_checked, copies, top_checked);
  CHECK(copies > 0);
  CHECK(copies < rows_checked);
}

TEST_CASE("gpu sampling: draws over many offsets follow the kept-set distribution",
          "[gpu][sampling]") {
  std::mt19937 rng(gputest::test_seed("sampling_dist"));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int draws = 4096;
  const uint64_t seed = (static_cast<uint64_t>(rng()) << 32) | rng();

  SECTION("all filters, ties, NaN and -inf") {
    // Random logits until the boundaries are clear of rounding margins (almost always the first).
    for (int attempt = 0;; ++attempt) {
      std::vector<float> l(40);
      for (float& x : l)
        x = 1.5f * normal(rng);
      l[3] = l[11] = l[17];
      l[5] = kNaN;
      l[6] = -kInf;
      SamplingParams p;
      p.temperature = 0.7f;
      p.top_k = 12;
      p.top_p = 0.85f;
      p.min_p = 0.02f;
      Batch probe;
      probe.vocab = 40;
      probe.add_row(l, p, seed, 0, {});
      if (reference_kept(run_cpu(probe, 0).logits, p).ambiguous && attempt < 20) continue;
      check_distribution(l, p, {}, seed, draws);
      break;
    }
  }
  SECTION("plain softmax: NaN and -inf never drawn") {
    std::vector<float> l(24);
    for (float& x : l)
      x = normal(rng);
    l[0] = kNaN;
    l[23] = -kInf;
    SamplingParams p;
    p.temperature = 1.0f;
    check_distribution(l, p, {}, seed, draws);
  }
  SECTION("top-p boundary inside a tie: the lowest ids of the tie are kept") {
    std::vector<float> l(32);
    for (float& x : l)
      x = -3.0f + 0.3f * normal(rng);
    for (int id : {5, 9, 17, 30})
      l[id] = 2.0f;
    // Each tied token has weight 1; the head needs 2.5 of them: ids 5, 9, 17.
    double total = 0.0;
    for (float x : l)
      total += std::exp(x - 2.0f);
    SamplingParams p;
    p.top_p = static_cast<float>(2.5 / total);
    check_distribution(l, p, {}, seed, draws);
  }
  SECTION("+inf logits: uniform over them, top-p by id") {
    std::vector<float> l(16, 0.5f);
    l[2] = l[7] = l[13] = kInf;
    SamplingParams p;
    p.top_p = 0.5f;  // 1.5 of the 3 tied: ids 2 and 7
    check_distribution(l, p, {}, seed, draws);
  }
  SECTION("top-k ties at the k-th value, with penalties and temperature") {
    std::vector<float> l(48);
    for (float& x : l)
      x = normal(rng);
    std::vector<float> sorted = l;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    l[40] = l[41] = sorted[4];  // the 5th value appears three times (no penalty touches them)
    SamplingParams p;
    p.temperature = 1.3f;
    p.top_k = 5;
    p.repetition_penalty = 1.3f;
    p.frequency_penalty = 0.4f;
    p.presence_penalty = -0.3f;
    History h;
    h.prompt = {1, 2, 3};
    h.output = {2, 7, 7, 9};
    check_distribution(l, p, h, seed, draws);
  }
  SECTION("min-p alone") {
    std::vector<float> l(64);
    for (float& x : l)
      x = 2.0f * normal(rng);
    SamplingParams p;
    p.temperature = 0.9f;
    p.min_p = 0.1f;
    check_distribution(l, p, {}, seed, draws);
  }
}
