// Sampler: greedy, temperature, top-k/top-p/min-p against exact expected distributions (chi-square
// over seeded draws), penalties to the number, seeding, parameter validation, logprobs.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/common/error.h"
#include "engine/sampling/sampler.h"
#include "engine/sampling/sampling_params.h"

using pmkv::InvalidArgument;
using pmkv::Sampler;
using pmkv::SamplingParams;
using Ids = std::vector<int32_t>;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<double> softmax(const std::vector<float>& logits, double temperature = 1.0) {
  double max = -1e300;
  for (float l : logits) {
    max = std::max(max, l / temperature);
  }
  std::vector<double> p(logits.size());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    sum += p[i] = std::exp(logits[i] / temperature - max);
  }
  for (double& x : p) {
    x /= sum;
  }
  return p;
}

// Restricts a distribution to `keep` and renormalises.
std::vector<double> restrict_to(std::vector<double> p, const std::set<int32_t>& keep) {
  double sum = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (keep.count(static_cast<int32_t>(i)) == 0) p[i] = 0;
    sum += p[i];
  }
  for (double& x : p) {
    x /= sum;
  }
  return p;
}

std::vector<int> draw_counts(Sampler& sampler, const std::vector<float>& logits, int n) {
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < n; ++i) {
    std::vector<float> row = logits;
    const int32_t t = sampler.sample(row, {}, {});
    if (t < 0 || static_cast<size_t>(t) >= logits.size()) FAIL("drew token " << t);
    ++counts[static_cast<size_t>(t)];
  }
  return counts;
}

// Pearson's statistic over the tokens with expected probability > 0; any draw of a token with
// expected probability 0 fails the test outright.
double chi_square(const std::vector<int>& counts, const std::vector<double>& expected, int n) {
  double chi2 = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (expected[i] == 0.0) {
      INFO("token " << i << " has probability 0 but was drawn " << counts[i] << " times");
      REQUIRE(counts[i] == 0);
      continue;
    }
    const double e = expected[i] * n;
    chi2 += (counts[i] - e) * (counts[i] - e) / e;
  }
  return chi2;
}

// Upper 0.1% points of the chi-square distribution by degrees of freedom.
double chi_square_critical(size_t dof) {
  // dof 0: a single possible token, drawn every time (chi_square() checks the others are never).
  static const double table[] = {1e-9,  10.83, 13.82, 16.27, 18.47,
                                 20.52, 22.46, 24.32, 26.12, 27.88};
  REQUIRE(dof < std::size(table));
  return table[dof];
}

size_t support(const std::vector<double>& p) {
  return static_cast<size_t>(std::count_if(p.begin(), p.end(), [](double x) { return x > 0; }));
}

void check_distribution(const SamplingParams& params, const std::vector<float>& logits,
                        const std::vector<double>& expected, uint64_t seed = 1, int n = 40000) {
  Sampler sampler(params, seed);
  const std::vector<int> counts = draw_counts(sampler, logits, n);
  const double chi2 = chi_square(counts, expected, n);
  INFO("chi2 " << chi2 << " over " << support(expected) << " tokens");
  CHECK(chi2 < chi_square_critical(support(expected) - 1));
}

std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) {
    l.push_back(static_cast<float>(std::log(p)));
  }
  return l;
}

const std::vector<float> kLogits = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 1.5f, -0.5f};

}  // namespace

TEST_CASE("greedy picks the argmax, lowest id on ties", "[sampler]") {
  for (float t : {0.0f, 1e-6f}) {
    SamplingParams p;
    p.temperature = t;
    Sampler s(p, 123);
    std::vector<float> l = kLogits;
    CHECK(s.sample(l, {}, {}) == 4);
    std::vector<float> ties = {0.5f, 2.0f, -1.0f, 2.0f};
    CHECK(s.sample(ties, {}, {}) == 1);
    std::vector<float> with_nan = {std::nanf(""), 1.0f, 3.0f, std::nanf("")};
    CHECK(s.sample(with_nan, {}, {}) == 2);
    std::vector<float> all_masked = {-kInf, -kInf, -kInf};
    CHECK(s.sample(all_masked, {}, {}) == 0);
  }
}

TEST_CASE("temperature: draws follow softmax(logits / T)", "[sampler]") {
  for (double t : {1.0, 0.7, 2.0}) {
    INFO("temperature " << t);
    SamplingParams p;
    p.temperature = static_cast<float>(t);
    check_distribution(p, kLogits, softmax(kLogits, t));
  }
}

TEST_CASE("temperature: a wrong temperature is detected by the same check", "[sampler]") {
  // The statistic must reject a distribution that is off, or the checks above prove nothing.
  SamplingParams p;
  p.temperature = 0.7f;
  Sampler sampler(p, 1);
  const int n = 40000;
  const std::vector<int> counts = draw_counts(sampler, kLogits, n);
  CHECK(chi_square(counts, softmax(kLogits, 0.8), n) > chi_square_critical(7));
  CHECK(chi_square(counts, softmax(kLogits, 1.0), n) > chi_square_critical(7));
}

TEST_CASE("top_k keeps the k most likely and renormalises", "[sampler]") {
  SamplingParams p;
  p.top_k = 3;
  check_distribution(p, kLogits, restrict_to(softmax(kLogits), {4, 1, 6}));
  p.top_k = 1;
  check_distribution(p, kLogits, restrict_to(softmax(kLogits), {4}), 2, 2000);
  // Disabled values and k >= vocabulary size keep everything.
  for (int k : {0, -1, 8, 100}) {
    p.top_k = k;
    check_distribution(p, kLogits, softmax(kLogits), 3);
  }
  // Ties with the k-th value are kept.
  const std::vector<float> ties = {5.0f, 4.0f, 4.0f, 1.0f};
  p.top_k = 2;
  check_distribution(p, ties, restrict_to(softmax(ties), {0, 1, 2}), 4);
}

TEST_CASE("top_p keeps the smallest head whose mass reaches top_p", "[sampler]") {
  const std::vector<double> probs = {0.3, 0.4, 0.05, 0.15, 0.1};
  const std::vector<float> logits = logits_of(probs);
  SamplingParams p;
  // Sorted: 0.4 (id 1), 0.3 (id 0), 0.15 (id 3), 0.1 (id 4), 0.05 (id 2).
  p.top_p = 0.75f;  // mass before id 3 is 0.7 < 0.75: kept; before id 4 is 0.85: dropped
  check_distribution(p, logits, restrict_to(probs, {1, 0, 3}));
  p.top_p = 0.35f;  // only the most likely
  check_distribution(p, logits, restrict_to(probs, {1}), 5, 2000);
  p.top_p = 0.9f;  // mass before id 2 is 0.95: dropped
  check_distribution(p, logits, restrict_to(probs, {1, 0, 3, 4}), 6);
  p.top_p = 1.0f;
  check_distribution(p, logits, probs, 7);
}

TEST_CASE("top_p over large vocabularies, flat and peaked", "[sampler]") {
  struct Shape {
    float sigma;  // spread of the logits
    float top_p;
  };
  for (const Shape shape : {Shape{0.3f, 0.5f}, Shape{2.0f, 0.9f}, Shape{4.0f, 0.8f}}) {
    INFO("sigma " << shape.sigma << " top_p " << shape.top_p);
    std::mt19937 rng(99);
    std::normal_distribution<float> noise(0.0f, shape.sigma);
    std::vector<float> logits(3000);
    for (float& l : logits) {
      l = noise(rng);
    }
    // The expected head, by a full sort.
    std::vector<int32_t> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    const std::vector<double> probs = softmax(logits);
    std::vector<int32_t> head;
    double before = 0;
    for (int32_t id : order) {
      if (before >= shape.top_p) break;
      head.push_back(id);
      before += probs[id];
    }
    REQUIRE(head.size() > 10);
    // Eight bins of about equal expected mass over the head (most likely first).
    std::vector<int> bin_of(logits.size(), -1);
    std::vector<double> bin_mass(8, 0.0);
    double cumulative = 0;
    for (int32_t id : head) {
      const int bin = std::min(7, static_cast<int>(cumulative / before * 8));
      bin_of[id] = bin;
      bin_mass[bin] += probs[id] / before;
      cumulative += probs[id];
    }

    SamplingParams p;
    p.top_p = shape.top_p;
    Sampler sampler(p, 11);
    const int n = 6000;
    std::vector<int> bin_counts(8, 0);
    std::set<int32_t> seen;
    for (int i = 0; i < n; ++i) {
      std::vector<float> row = logits;
      const int32_t t = sampler.sample(row, {}, {});
      if (bin_of[t] < 0) FAIL("drew token " << t << ", which is outside the top-p head");
      ++bin_counts[bin_of[t]];
      seen.insert(t);
    }
    const double chi2 = chi_square(bin_counts, bin_mass, n);
    INFO("chi2 " << chi2);
    CHECK(chi2 < chi_square_critical(support(bin_mass) - 1));
    if (shape.sigma < 1.0f) {
      // ~900 nearly equal tokens: 6000 draws reach almost all of them.
      CHECK(head.size() > 600);
      CHECK(seen.size() > head.size() * 9 / 10);
    }
  }
}

TEST_CASE("min_p drops tokens below min_p times the top probability", "[sampler]") {
  const std::vector<double> probs = {0.25, 0.5, 0.08, 0.1, 0.07};
  const std::vector<float> logits = logits_of(probs);
  SamplingParams p;
  p.min_p = 0.18f;  // threshold 0.09: keeps 0.5, 0.25, 0.1
  check_distribution(p, logits, restrict_to(probs, {0, 1, 3}));
  p.min_p = 1.0f;
  check_distribution(p, logits, restrict_to(probs, {1}), 8, 2000);
  p.min_p = 0.0f;
  check_distribution(p, logits, probs, 9);
}

TEST_CASE("processors run in vLLM's order: temperature before top-k/top-p/min-p", "[sampler]") {
  const std::vector<float> logits = {2.0f, 1.0f, 0.0f};
  SamplingParams p;
  p.temperature = 100.0f;  // nearly uniform after temperature
  p.top_p = 0.5f;          // then keeps two tokens (before: only token 0)
  check_distribution(p, logits, restrict_to(softmax(logits, 100.0), {0, 1}));

  // top_k then top_p on the renormalised survivors: top_k=2 leaves {0: 0.731, 1: 0.269}, and
  // top_p 0.7 keeps token 0 only. (top_p on the full distribution {0.665, 0.245, 0.090} would
  // have kept tokens 0 and 1.)
  SamplingParams q;
  q.top_k = 2;
  q.top_p = 0.7f;
  check_distribution(q, logits, restrict_to(softmax(logits), {0}), 10, 2000);

  // min_p after top-k: relative to the top probability, which top-k does not change.
  SamplingParams r;
  r.top_k = 2;
  r.min_p = 0.5f;  // p1 / p0 = e^-1 = 0.37 < 0.5: token 1 dropped
  check_distribution(r, logits, restrict_to(softmax(logits), {0}), 12, 2000);
}

TEST_CASE("penalties change the logits exactly as specified", "[sampler]") {
  const std::vector<float> base = {1.0f, 2.0f, -1.0f, 0.5f, -2.0f, 3.0f};
  const Ids prompt = {1, 2, 1};
  const Ids output = {2, 3, 3, 4};
  SamplingParams p;
  p.temperature = 0.0f;
  p.repetition_penalty = 1.5f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.25f;
  Sampler s(p, 1);
  std::vector<float> l = base;
  s.sample(l, prompt, output);

  auto rep = [](float x) { return x > 0 ? x / 1.5f : x * 1.5f; };
  auto freq_pres = [](float x, int count) {
    x -= 0.5f * static_cast<float>(count);
    x -= 0.25f;
    return x;
  };
  CHECK(l[0] == base[0]);                     // nowhere
  CHECK(l[1] == rep(base[1]));                // prompt only: no frequency/presence
  CHECK(l[2] == freq_pres(rep(base[2]), 1));  // prompt and output: repetition once
  CHECK(l[3] == freq_pres(rep(base[3]), 2));  // output twice
  CHECK(l[4] == freq_pres(rep(base[4]), 1));  // negative logit: multiplied
  CHECK(l[5] == base[5]);

  // The next step folds in only the new token.
  const Ids output2 = {2, 3, 3, 4, 3};
  l = base;
  s.sample(l, prompt, output2);
  CHECK(l[3] == freq_pres(rep(base[3]), 3));
  CHECK(l[2] == freq_pres(rep(base[2]), 1));

  // A shorter history than last time: counts are rebuilt.
  const Ids restarted = {5};
  l = base;
  s.sample(l, prompt, restarted);
  CHECK(l[3] == base[3]);
  CHECK(l[5] == freq_pres(rep(base[5]), 1));
  CHECK(l[1] == rep(base[1]));
}

TEST_CASE("penalties: each alone, and they steer greedy", "[sampler]") {
  const std::vector<float> base = {2.0f, 1.9f, -0.5f};
  SECTION("repetition only") {
    SamplingParams p;
    p.temperature = 0.0f;
    p.repetition_penalty = 1.2f;
    Sampler s(p, 1);
    std::vector<float> l = base;
    CHECK(s.sample(l, Ids{2}, Ids{0}) == 1);  // 2.0 / 1.2 < 1.9
    CHECK(l[0] == 2.0f / 1.2f);
    CHECK(l[2] == -0.5f * 1.2f);
    CHECK(l[1] == 1.9f);
  }
  SECTION("presence only, prompt tokens untouched") {
    SamplingParams p;
    p.temperature = 0.0f;
    p.presence_penalty = 0.2f;
    Sampler s(p, 1);
    std::vector<float> l = base;
    CHECK(s.sample(l, Ids{1}, Ids{0, 0, 0}) == 1);
    CHECK(l[0] == 2.0f - 0.2f);
    CHECK(l[1] == 1.9f);
  }
  SECTION("negative frequency penalty encourages repetition") {
    SamplingParams p;
    p.temperature = 0.0f;
    p.frequency_penalty = -0.1f;
    Sampler s(p, 1);
    std::vector<float> l = base;
    CHECK(s.sample(l, {}, Ids{1, 1}) == 1);
    CHECK(l[1] == 1.9f - (-0.1f) * 2.0f);
  }
  SECTION("history ids outside the logits are rejected") {
    SamplingParams p;
    p.repetition_penalty = 1.1f;
    Sampler s(p, 1);
    std::vector<float> l = base;
    CHECK_THROWS_AS(s.sample(l, Ids{3}, {}), InvalidArgument);
    Sampler s2(p, 1);
    CHECK_THROWS_AS(s2.sample(l, Ids{0}, Ids{-1}), InvalidArgument);
  }
}

namespace {

Ids generate(Sampler& s, int steps, int vocab = 50) {
  std::mt19937 logit_rng(5);  // the same logits sequence for every sampler
  std::normal_distribution<float> noise(0.0f, 1.0f);
  Ids out;
  for (int i = 0; i < steps; ++i) {
    std::vector<float> l(static_cast<size_t>(vocab));
    for (float& x : l) {
      x = noise(logit_rng);
    }
    out.push_back(s.sample(l, {}, out));
  }
  return out;
}

}  // namespace

TEST_CASE("seeding: same seed same tokens, different seeds differ", "[sampler]") {
  SamplingParams p;
  p.top_p = 0.9f;
  p.top_k = 20;
  p.frequency_penalty = 0.3f;
  p.seed = 42;
  Sampler a(p), b(p);
  CHECK(a.seed() == 42);
  const Ids ta = generate(a, 200);
  CHECK(generate(b, 200) == ta);

  SamplingParams q = p;
  q.seed = 43;
  Sampler c(q);
  CHECK(generate(c, 200) != ta);

  // params.seed wins over the fallback seed; the fallback seeds unseeded requests.
  Sampler d(p, 7);
  CHECK(d.seed() == 42);
  CHECK(generate(d, 200) == ta);
  SamplingParams unseeded = p;
  unseeded.seed.reset();
  Sampler e(unseeded, 42), f(unseeded, 42), g(unseeded, 8);
  CHECK(e.seed() == 42);
  CHECK(generate(e, 200) == ta);
  CHECK(generate(f, 200) == ta);
  CHECK(generate(g, 200) != ta);
  // Without any seed, two samplers draw different seeds.
  Sampler h(unseeded), i(unseeded);
  CHECK(h.seed() != i.seed());
}

TEST_CASE("seeding: a sequence's tokens do not depend on other sequences", "[sampler]") {
  SamplingParams p;
  p.seed = 2024;
  Sampler alone(p);
  const Ids expected = generate(alone, 100);

  // The same sequence interleaved step by step with two others.
  Sampler mine(p);
  SamplingParams other_params;
  Sampler other1(other_params, 1), other2(other_params, 2);
  std::mt19937 logit_rng(5);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  std::mt19937 other_rng(77);
  Ids out, out1, out2;
  for (int step = 0; step < 100; ++step) {
    std::vector<float> l(50);
    for (float& x : l) {
      x = noise(logit_rng);
    }
    std::vector<float> o(50);
    for (float& x : o) {
      x = static_cast<float>(other_rng() % 100) / 10.0f;
    }
    std::vector<float> o2 = o;
    out1.push_back(other1.sample(o, {}, out1));
    out.push_back(mine.sample(l, {}, out));
    out2.push_back(other2.sample(o2, {}, out2));
  }
  CHECK(out == expected);
}

TEST_CASE("seeding: logits a little apart draw the same token, filters or not", "[sampler]") {
  // Another batch composition changes a sequence's logits slightly (BLAS blocking, amplified by
  // its 16-bit KV cache: up to ~9e-4 in a logprob on stories260K). The draw must not amplify that:
  // it walks the kept tokens in id order. When it walked them in the order top-k / top-p's
  // selections left them, nearly equal probabilities swapped places and moved every CDF boundary
  // after them: 20 of 40 seeded top-p requests sampled other text beside other requests (pmkv
  // serve). Here, logits nudged by up to 5e-4: 2-7 draws of 2000 differ in id order (a boundary
  // moves as far as the probabilities do), 66-78 in the selection order (with top-k or top-p).
  struct Filter {
    int32_t top_k;
    float top_p;
    float min_p;
  };
  for (const Filter f : {Filter{0, 1.0f, 0.0f}, Filter{0, 0.9f, 0.0f}, Filter{50, 1.0f, 0.0f},
                         Filter{40, 0.95f, 0.02f}}) {
    INFO("top_k " << f.top_k << " top_p " << f.top_p << " min_p " << f.min_p);
    std::mt19937 rng(9);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::uniform_real_distribution<float> nudge(-5e-4f, 5e-4f);
    int differ = 0;
    for (int trial = 0; trial < 2000; ++trial) {
      std::vector<float> base(512);
      for (float& x : base) {
        x = normal(rng);
      }
      std::vector<float> nudged = base;
      for (float& x : nudged) {
        x += nudge(rng);
      }
      SamplingParams p;
      p.temperature = 1.0f;
      p.top_k = f.top_k;
      p.top_p = f.top_p;
      p.min_p = f.min_p;
      p.seed = static_cast<uint64_t>(trial);
      Sampler a(p), b(p);
      differ += a.sample(base, {}, {}) != b.sample(nudged, {}, {});
    }
    CHECK(differ <= 20);
  }
}

TEST_CASE("validate rejects each bad value naming the parameter", "[sampler]") {
  CHECK_NOTHROW(SamplingParams{}.validate());
  {
    SamplingParams ok;
    ok.temperature = 0.0f;
    ok.top_k = -1;
    ok.top_p = 1.0f;
    ok.min_p = 1.0f;
    ok.presence_penalty = -2.0f;
    ok.frequency_penalty = 2.0f;
    ok.repetition_penalty = 0.01f;
    ok.max_tokens = 1;
    ok.stop = {"###", "。"};
    ok.stop_token_ids = {0, 2};
    CHECK_NOTHROW(ok.validate());
  }
  struct Bad {
    const char* name;
    void (*set)(SamplingParams&);
  };
  const Bad bad[] = {
      {"temperature", [](SamplingParams& p) { p.temperature = -0.1f; }},
      {"temperature", [](SamplingParams& p) { p.temperature = std::nanf(""); }},
      {"temperature", [](SamplingParams& p) { p.temperature = kInf; }},
      {"top_k", [](SamplingParams& p) { p.top_k = -2; }},
      {"top_p", [](SamplingParams& p) { p.top_p = 0.0f; }},
      {"top_p", [](SamplingParams& p) { p.top_p = 1.01f; }},
      {"top_p", [](SamplingParams& p) { p.top_p = std::nanf(""); }},
      {"min_p", [](SamplingParams& p) { p.min_p = -0.01f; }},
      {"min_p", [](SamplingParams& p) { p.min_p = 1.5f; }},
      {"repetition_penalty", [](SamplingParams& p) { p.repetition_penalty = 0.0f; }},
      {"repetition_penalty", [](SamplingParams& p) { p.repetition_penalty = -1.0f; }},
      {"repetition_penalty", [](SamplingParams& p) { p.repetition_penalty = kInf; }},
      {"presence_penalty", [](SamplingParams& p) { p.presence_penalty = 2.5f; }},
      {"presence_penalty", [](SamplingParams& p) { p.presence_penalty = -2.01f; }},
      {"frequency_penalty", [](SamplingParams& p) { p.frequency_penalty = 3.0f; }},
      {"frequency_penalty", [](SamplingParams& p) { p.frequency_penalty = std::nanf(""); }},
      {"max_tokens", [](SamplingParams& p) { p.max_tokens = 0; }},
      {"max_tokens", [](SamplingParams& p) { p.max_tokens = -5; }},
      {"stop",
       [](SamplingParams& p) {
         p.stop = {"ok", ""};
       }},
      {"stop", [](SamplingParams& p) { p.stop = {"\xff\xfe"}; }},
      {"stop", [](SamplingParams& p) { p.stop = {"\xe3\x80"}; }},
      {"stop_token_ids",
       [](SamplingParams& p) {
         p.stop_token_ids = {2, -1};
       }},
  };
  for (const auto& b : bad) {
    SamplingParams p;
    b.set(p);
    INFO("parameter " << b.name);
    CHECK_THROWS_AS(p.validate(), InvalidArgument);
    CHECK_THROWS_WITH(p.validate(), Catch::StartsWith(b.name));
  }
}

TEST_CASE("log-probabilities", "[sampler]") {
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, -kInf, 0.0f};
  std::vector<float> out(logits.size());
  Sampler::log_softmax(logits, out);
  const std::vector<double> p = softmax({1.0f, 3.0f, 3.0f, -1e30f, 0.0f});
  for (size_t i = 0; i < logits.size(); ++i) {
    if (i == 3) {
      CHECK(out[i] == -kInf);
    } else {
      CHECK(out[i] == Approx(std::log(p[i])).epsilon(1e-6));
    }
  }
  double total = 0;
  for (float x : out) {
    total += std::exp(static_cast<double>(x));
  }
  CHECK(total == Approx(1.0).epsilon(1e-6));

  const auto top = Sampler::top_logprobs(logits, 3);
  REQUIRE(top.size() == 3);
  CHECK(top[0].first == 1);  // tie with 2: lower id first
  CHECK(top[1].first == 2);
  CHECK(top[2].first == 0);
  CHECK(top[0].second == Approx(std::log(p[1])).epsilon(1e-6));
  CHECK(top[2].second == Approx(std::log(p[0])).epsilon(1e-6));
  CHECK(Sampler::top_logprobs(logits, 10).size() == logits.size());
  CHECK(Sampler::top_logprobs(logits, 0).empty());
  CHECK(Sampler::token_logprob(logits, 4) == Approx(std::log(p[4])).epsilon(1e-6));
  CHECK_THROWS_AS(Sampler::token_logprob(logits, 5), InvalidArgument);
  std::vector<float> short_out(2);
  CHECK_THROWS_AS(Sampler::log_softmax(logits, short_out), InvalidArgument);
}
