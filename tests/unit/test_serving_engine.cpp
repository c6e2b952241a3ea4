// ServingEngine end to end on the CPU backend and the golden llama_gqa model (no tokenizer: ids
// in, ids out): continuous batching against the offline Generator, seeded sampling, cancellation,
// deadlines, both admission modes, preemption by recompute, the floor action, shutdown.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <thread>

#include "engine/backend/backend.h"
#include "engine/runtime/local_model.h"
#include "engine/serving/scheduler.h"
#include "engine/serving/serving_engine.h"

using namespace pmkv;
using namespace std::chrono_literals;

namespace {

const std::filesystem::path kModel =
    std::filesystem::path(PMKV_SOURCE_DIR) / "tests/fixtures/golden/llama_gqa";

struct Outcome {
  std::vector<int32_t> ids;
  std::optional<StreamEnd> end;
  std::optional<FinishReason> finish;
  int32_t completion_tokens = 0;
  std::vector<TokenEvent> events;
};

Outcome collect(RequestStream& s) {
  Outcome o;
  while (auto u = s.next(20s)) {
    for (const TokenEvent& t : u->tokens) {
      o.ids.push_back(t.token_id);
      o.events.push_back(t);
    }
    o.completion_tokens = u->completion_tokens;
    if (u->end) {
      o.end = u->end;
      o.finish = u->finish_reason;
      break;
    }
  }
  return o;
}

// Every engine test runs twice: steps one at a time, and run ahead (engine.async_steps; on the
// CPU backend the sampling then happens inside the backend, keyed by (seed, position)).
EngineOptions::AsyncSteps g_steps = EngineOptions::AsyncSteps::kOff;

void both_step_modes() {
  g_steps = GENERATE(EngineOptions::AsyncSteps::kOff, EngineOptions::AsyncSteps::kOn);
}

EngineOptions options(int64_t kv_bytes = 16ll << 20) {
  EngineOptions o;
  o.async_steps = g_steps;
  o.num_threads = 1;
  o.kv_memory_bytes = kv_bytes;
  o.kv.window_tokens = 16;
  return o;
}

EngineRequest request(std::vector<int32_t> prompt, int32_t max_tokens, float temperature = 0) {
  EngineRequest r;
  r.prompt_ids = std::move(prompt);
  r.params.max_tokens = max_tokens;
  r.params.temperature = temperature;
  r.params.ignore_eos = true;
  return r;
}

std::vector<int32_t> prompt_of(int i) {
  std::vector<int32_t> p;
  for (int j = 0; j < 1 + (i * 7) % 23; ++j)
    p.push_back(3 + (i * 31 + j * 17) % 500);
  return p;
}

std::vector<Outcome> run_all(ServingEngine& e, const std::vector<EngineRequest>& reqs) {
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const EngineRequest& r : reqs)
    streams.push_back(e.submit(r));
  std::vector<Outcome> out;
  for (auto& s : streams)
    out.push_back(collect(*s));
  return out;
}

// Stats are published after each step, after the step's streams got their updates: wait until
// the pool is empty again and `done` holds.
EngineStats settled(
    const ServingEngine& e,
    const std::function<bool(const EngineStats&)>& done = [](const EngineStats&) { return true; }) {
  auto ready = [&](const EngineStats& st) {
    return st.kv.pages_used == 0 && st.requests_running == 0 && done(st);
  };
  EngineStats st = e.stats();
  for (int i = 0; i < 500 && !ready(st); ++i) {
    std::this_thread::sleep_for(10ms);
    st = e.stats();
  }
  return st;
}

// Bytes of one KV page of the test model under `o`'s KV configuration.
int64_t page_bytes_of(const EngineOptions& o) {
  LocalModelOptions lo;
  lo.kv = o.kv;
  return kv::page_bytes(LocalModel::open(kModel, lo).kv_geometry());
}

std::vector<std::vector<int32_t>> offline_greedy(const std::vector<EngineRequest>& reqs,
                                                 const kv::KvCacheConfig& kv = {}) {
  LocalModelOptions lo;
  lo.num_threads = 1;
  lo.kv = kv;
  LocalModel m = LocalModel::open(kModel, lo);
  std::vector<GenerationRequest> g;
  for (const EngineRequest& r : reqs)
    g.push_back({r.prompt_ids, r.params});
  std::vector<std::vector<int32_t>> out;
  for (const GenerationResult& r : m.generate(g))
    out.push_back(r.output_ids);
  return out;
}

}  // namespace

TEST_CASE("serving: 64 concurrent greedy requests equal the offline Generator",
          "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 64; ++i)
    reqs.push_back(request(prompt_of(i), 1 + (i * 13) % 40));
  const auto expected = offline_greedy(reqs);
  EngineOptions o = options();
  o.scheduler.max_step_tokens = 48;  // prompts in chunks, mixed with decodes
  o.scheduler.prefill_chunk = 5;
  o.scheduler.max_running = 24;
  ServingEngine e(kModel, o);
  e.start();
  const auto got = run_all(e, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    INFO("request " << i);
    CHECK(got[i].end == StreamEnd::kFinished);
    CHECK(got[i].finish == FinishReason::kLength);
    CHECK(got[i].completion_tokens == reqs[i].params.max_tokens);
    CHECK(got[i].ids == expected[i]);
  }
  const EngineStats st =
      settled(e, [](const EngineStats& x) { return x.requests_finished_total == 64; });
  CHECK(st.kv.pages_used == 0);
  CHECK(st.requests_finished_total == 64);
  CHECK(st.time_to_first_token.count == 64);
  CHECK(st.preemptions_total == 0);
  e.shutdown(1s);
}

TEST_CASE("serving: steps run ahead give what steps one at a time give", "[serving][engine]") {
  // Greedy requests that stop early on a stop token (their extra step's token is thrown away)
  // and plain ones; then also some with penalties (the backend counts the token in flight in
  // their history); then also some with logprobs (the backend returns them with the tokens);
  // then one with more logprobs than the backend returns (steps of its own, logits on the host:
  // while it is queued or running nothing runs ahead).
  const int variant = GENERATE(0, 1, 2, 3);
  const bool penalties = variant >= 1, logprobs = variant >= 2, host_logprobs = variant == 3;
  INFO("penalties " << penalties << ", logprobs " << logprobs << ", host " << host_logprobs);
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 20; ++i) {
    EngineRequest r = request(prompt_of(i + 3), 8 + (i * 5) % 30);
    if (penalties && i % 5 == 2) r.params.repetition_penalty = 1.3f;
    if (penalties && i % 7 == 3) r.params.frequency_penalty = 0.5f;
    if (penalties && i % 6 == 4) r.params.presence_penalty = 0.4f;
    if (logprobs && i % 4 == 1) r.logprobs = 2;  // some of them stop early (below)
    if (logprobs && i == 6) r.logprobs = 0;
    if (logprobs && i == 10) r.logprobs = kMaxDeviceLogprobs;
    if (host_logprobs && i == 9) r.logprobs = kMaxDeviceLogprobs + 5;
    reqs.push_back(r);
  }
  // Every fourth request stops at a token of its own greedy output.
  const auto full = offline_greedy(reqs);
  for (size_t i = 1; i < reqs.size(); i += 4)
    reqs[i].params.stop_token_ids = {full[i][3 + i % 5]};
  std::map<std::string, std::vector<Outcome>> got;
  std::map<std::string, EngineStats> stats;
  // "drain": run ahead, but wait for a step with 8 or more prompt-chunk tokens before planning
  // the next (the default waits from 512).
  for (const std::string name : {"off", "on", "drain"}) {
    g_steps = name == "off" ? EngineOptions::AsyncSteps::kOff : EngineOptions::AsyncSteps::kOn;
    if (name == "drain") setenv("PMKV_ASYNC_DRAIN_PROMPT_TOKENS", "8", 1);
    EngineOptions o = options();
    o.scheduler.max_step_tokens = 40;
    o.scheduler.prefill_chunk = 7;
    o.scheduler.max_running = 12;
    ServingEngine e(kModel, o);
    unsetenv("PMKV_ASYNC_DRAIN_PROMPT_TOKENS");
    e.start();
    got[name] = run_all(e, reqs);
    stats[name] = settled(e, [&](const EngineStats& x) {
      return x.requests_finished_total == static_cast<uint64_t>(reqs.size());
    });
    e.shutdown(1s);
  }
  g_steps = EngineOptions::AsyncSteps::kOff;
  int stopped_early = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    INFO("request " << i);
    const Outcome& a = got["off"][i];
    CHECK(got["drain"][i].ids == a.ids);
    CHECK(got["drain"][i].finish == a.finish);
    const Outcome& b = got["on"][i];
    CHECK(a.end == StreamEnd::kFinished);
    CHECK(b.end == a.end);
    CHECK(b.finish == a.finish);
    CHECK(b.ids == a.ids);
    CHECK(b.completion_tokens == a.completion_tokens);
    CHECK(b.completion_tokens == static_cast<int32_t>(b.ids.size()));
    REQUIRE(b.events.size() == a.events.size());
    for (size_t t = 0; t < a.events.size(); ++t) {
      for (const Outcome* o : std::initializer_list<const Outcome*>{&b, &got["drain"][i]}) {
        const TokenEvent &x = a.events[t], &y = o->events[t];
        REQUIRE(y.logprob.has_value() == x.logprob.has_value());
        CHECK(x.logprob.has_value() == (reqs[i].logprobs >= 0));
        if (x.logprob) CHECK(*y.logprob == Approx(*x.logprob));
        REQUIRE(y.top_logprobs.size() == x.top_logprobs.size());
        CHECK(x.top_logprobs.size() == static_cast<size_t>(std::max(reqs[i].logprobs, 0)));
        for (size_t j = 0; j < x.top_logprobs.size(); ++j) {
          CHECK(y.top_logprobs[j].first == x.top_logprobs[j].first);
          CHECK(y.top_logprobs[j].second == Approx(x.top_logprobs[j].second));
        }
      }
    }
    stopped_early += a.finish == FinishReason::kStop ? 1 : 0;
    const size_t n = std::min(a.ids.size(), full[i].size());
    CHECK(std::equal(a.ids.begin(), a.ids.begin() + n, full[i].begin()));
  }
  CHECK(stopped_early == 5);
  for (const char* m : {"off", "on", "drain"}) {
    INFO("async_steps " << m);
    CHECK(stats[m].kv.pages_used == 0);
    CHECK(stats[m].requests_running == 0);
    CHECK(stats[m].requests_finished_total == reqs.size());
  }
  CHECK_FALSE(stats["off"].async_steps);
  CHECK(stats["on"].async_steps);
  CHECK(stats["off"].discarded_tokens_total == 0);
  // Each request that stopped early had its next token in flight already (so the penalties and
  // the log-probabilities ran ahead too: a step processed first would have ended it before the
  // next was planned). The request with too many log-probabilities made steps wait.
  if (!host_logprobs) CHECK(stats["on"].discarded_tokens_total == 5);
  if (host_logprobs) CHECK(stats["on"].discarded_tokens_total < 5);
}

TEST_CASE("serving: seeded sampling is the same whatever else is in the batch",
          "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  EngineRequest a = request(prompt_of(3), 24, 0.9f);
  a.params.seed = 1234;
  a.params.top_k = 40;
  ServingEngine e(kModel, options());
  e.start();
  const Outcome alone = run_all(e, {a}).front();
  std::vector<EngineRequest> mixed;
  for (int i = 0; i < 12; ++i) {
    mixed.push_back(request(prompt_of(i + 10), 30, 1.0f));
    mixed.back().params.seed = static_cast<uint64_t>(i);
  }
  mixed.insert(mixed.begin() + 5, a);
  const Outcome crowded = run_all(e, mixed)[5];
  CHECK(alone.ids.size() == 24);
  CHECK(crowded.ids == alone.ids);
  // Sixteen seeded top-p / top-k requests, each alone and all together: logits a rounding apart
  // must not move the draw (it walks the kept tokens in id order; in the filters' selection
  // order, nearly equal probabilities swapped places and moved it).
  std::vector<EngineRequest> filtered;
  for (int i = 0; i < 16; ++i) {
    EngineRequest r = request(prompt_of(i + 30), 40, 1.0f);
    r.params.seed = 100 + static_cast<uint64_t>(i);
    r.params.top_p = i % 2 ? 0.9f : 1.0f;
    r.params.top_k = i % 3 ? 0 : 64;
    filtered.push_back(std::move(r));
  }
  const std::vector<Outcome> together = run_all(e, filtered);
  int same = 0;
  for (int i = 0; i < 16; ++i)
    same += run_all(e, {filtered[i]}).front().ids == together[i].ids;
  CHECK(same == 16);
}

TEST_CASE("serving: log-probabilities come from the raw logits", "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  EngineRequest r = request(prompt_of(1), 6);
  r.logprobs = 3;
  ServingEngine e(kModel, options());
  e.start();
  const Outcome o = run_all(e, {r}).front();
  REQUIRE(o.events.size() == 6);
  for (const TokenEvent& t : o.events) {
    REQUIRE(t.logprob.has_value());
    REQUIRE(t.top_logprobs.size() == 3);
    CHECK(t.top_logprobs[0].first == t.token_id);  // greedy: the most likely token
    CHECK(t.top_logprobs[0].second == Approx(*t.logprob));
    CHECK(*t.logprob <= 0.0f);
  }
}

TEST_CASE("serving: cancel mid-stream frees the pages; a past deadline cancels",
          "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  ServingEngine e(kModel, options());
  e.start();
  auto s = e.submit(request(prompt_of(2), 400));
  RequestStream* raw = s.get();
  std::atomic<int> updates{0};
  // The notifier runs on the engine thread: cancelling from it after 3 updates is deterministic.
  s->set_notifier([raw, &updates] {
    if (++updates == 3) raw->cancel();
  });
  const Outcome o = collect(*s);
  CHECK(o.end == StreamEnd::kCancelled);
  CHECK(o.ids.size() >= 3);
  CHECK(o.ids.size() < 400);
  EngineRequest late = request(prompt_of(4), 50);
  late.deadline = std::chrono::steady_clock::now() - 1ms;
  const Outcome d = run_all(e, {late}).front();
  CHECK(d.end == StreamEnd::kCancelled);
  CHECK(d.ids.empty());
  const EngineStats st =
      settled(e, [](const EngineStats& x) { return x.requests_cancelled_total == 2; });
  CHECK(st.kv.pages_used == 0);
  CHECK(st.requests_cancelled_total == 2);
}

TEST_CASE("serving: guaranteed admission with a tiny pool queues and never preempts",
          "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  // 40 pages: a sequence of up to 64 tokens needs at most 18 (6 per layer), so two of those run
  // at once (these are shorter, 15 pages at most: still two).
  EngineOptions o = options();
  o.kv_memory_bytes = 40 * page_bytes_of(o);
  o.max_model_len = 64;
  ServingEngine e(kModel, o);
  e.start();
  std::vector<EngineRequest> full;
  for (int i = 0; i < 5; ++i)
    full.push_back(request(prompt_of(i + 20), 40));
  const auto expected = offline_greedy(full);
  const auto got = run_all(e, full);
  for (size_t i = 0; i < full.size(); ++i)
    CHECK(got[i].ids == expected[i]);
  const EngineStats st = settled(e);
  CHECK(st.preemptions_total == 0);
  CHECK(st.kv.pages_peak <= 36);
  CHECK(st.kv.pages_used == 0);
}

TEST_CASE("serving: overcommit with a tiny pool preempts; recompute gives the same tokens",
          "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    const auto p = prompt_of(i + 40);
    reqs.push_back(request(p, 56 - static_cast<int32_t>(p.size())));
  }
  const auto expected = offline_greedy(reqs);
  EngineOptions o = options(24 * 12288);
  o.max_model_len = 64;
  o.kv.bit_ladder = {16};  // nothing to demote: pressure goes straight to preemption
  o.kv.floor_bits = 16;
  o.scheduler.admission = SchedulerConfig::Admission::kOvercommit;
  ServingEngine e(kModel, o);
  e.start();
  const auto got = run_all(e, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    INFO("request " << i);
    CHECK(got[i].end == StreamEnd::kFinished);
    CHECK(got[i].ids == expected[i]);
  }
  const EngineStats st = settled(e);
  CHECK(st.preemptions_total > 0);
  CHECK(st.kv.pages_used == 0);
}

TEST_CASE("serving: overcommit demotes across sequences under pressure", "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 4; ++i)
    reqs.push_back(request(prompt_of(i), 120));
  EngineOptions o = options(40 * 12288);  // 4 x (up to 142 tokens) need up to 4 x 27 pages
  o.max_model_len = 160;
  o.scheduler.admission = SchedulerConfig::Admission::kOvercommit;
  ServingEngine e(kModel, o);
  e.start();
  for (const Outcome& r : run_all(e, reqs)) {
    CHECK(r.end == StreamEnd::kFinished);
    CHECK(r.ids.size() == 120);
  }
  const EngineStats st = settled(e, [](const EngineStats& x) { return x.kv.demotions_total > 0; });
  CHECK(st.kv.demotions_total > 0);
  CHECK(st.kv.pages_used == 0);
}

// Greedy ids of `probes`, each alone, or each submitted while `others` decode (its prompt then
// goes in other chunks: the step's tokens minus one a decoding sequence).
std::vector<std::vector<int32_t>> probe_ids(const EngineOptions& o,
                                            const std::vector<EngineRequest>& probes,
                                            const std::vector<EngineRequest>& others) {
  ServingEngine e(kModel, o);
  e.start();
  std::vector<std::vector<int32_t>> out;
  for (const EngineRequest& p : probes) {
    std::vector<std::shared_ptr<RequestStream>> load;
    for (const EngineRequest& r : others)
      load.push_back(e.submit(r));
    for (int i = 0; i < 1000 && !others.empty(); ++i) {
      if (e.stats().requests_running == static_cast<int64_t>(others.size())) break;
      std::this_thread::sleep_for(1ms);
    }
    out.push_back(collect(*e.submit(p)).ids);
    for (auto& s : load)
      collect(*s);
  }
  CHECK(settled(e).kv.demotions_total > 0);
  e.shutdown(1s);
  return out;
}

TEST_CASE("serving: under a 2-bit budget greedy text does not depend on what runs beside it",
          "[serving][engine]") {
  // kv_cache.hold_prompt: a prompt cut into other chunks beside decoding requests still reads
  // itself at 16 bits, and its flushes and demotions come at the same tokens; a step reads the
  // cache as it was before the step's own flushes and demotions. Up to rounding (see the next
  // case): 4 of 4 in 20 runs; 0 of 4 without hold_prompt.
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  std::vector<EngineRequest> probes, others;
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 130 + 9 * i; ++j)
      p.push_back(3 + (i * 131 + j * 37) % 500);
    probes.push_back(request(p, 60));
  }
  for (int i = 0; i < 21; ++i)
    others.push_back(request(prompt_of(i), 150));
  EngineOptions o = options();
  o.scheduler.max_step_tokens = 64;
  o.scheduler.prefill_chunk = 64;
  o.kv.uniform_bits = 2;
  o.kv.uniform_max_len = 256;
  const auto alone = probe_ids(o, probes, {});
  const auto loaded = probe_ids(o, probes, others);
  int same = 0;
  for (size_t i = 0; i < probes.size(); ++i) {
    REQUIRE(alone[i].size() == 60);
    same += loaded[i] == alone[i];
  }
  CHECK(same >= 3);
}

TEST_CASE("serving: under a 2-bit budget 40 concurrent greedy requests equal the offline Generator",
          "[serving][engine]") {
  // Two scheduling loops, one answer: the server cuts prompts into 5-token chunks beside up to 24
  // decoding sequences, the offline Generator computes each prompt in one chunk; with held
  // prompts and steps that read the cache from before their own flushes, every flush and
  // demotion comes at the same token in both. Up to rounding: a prompt token's K/V differ in the
  // last bits with its chunk (its chunk's tokens are read exact, earlier ones from 16-bit pages)
  // and with the batch (OpenBLAS's rows change with the row count), and this random-weight model
  // has near-ties that a 2-bit code can tip: 40 of 40 in 20 runs of steps one at a time, 39 or 40
  // in 20 runs ahead; 26 of 40 without hold_prompt.
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  EngineOptions o = options();
  o.kv.uniform_bits = 2;
  o.kv.uniform_max_len = 256;
  o.scheduler.max_step_tokens = 48;
  o.scheduler.prefill_chunk = 5;
  o.scheduler.max_running = 24;
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 40; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 10 + (i * 37) % 140; ++j)
      p.push_back(3 + (i * 131 + j * 17) % 500);
    reqs.push_back(request(p, 30 + (i * 13) % 60));
  }
  const auto expected = offline_greedy(reqs, o.kv);
  ServingEngine e(kModel, o);
  e.start();
  const auto got = run_all(e, reqs);
  int same = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    INFO("request " << i);
    CHECK(got[i].end == StreamEnd::kFinished);
    CHECK(got[i].ids.size() == expected[i].size());
    same += got[i].ids == expected[i];
  }
  CHECK(same >= 38);
  const EngineStats st =
      settled(e, [](const EngineStats& x) { return x.requests_finished_total == 40; });
  CHECK(st.kv.demotions_total > 0);
  CHECK(st.preemptions_total == 0);
  e.shutdown(1s);
}

TEST_CASE("serving: the floor action finishes with reason length", "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  EngineOptions o = options();
  o.kv.floor_bits = 4;
  o.kv.per_layer_bytes = 3 * 12288;  // sink + one 4-bit body page (64 tokens) + window
  ServingEngine e(kModel, o);
  e.start();
  const Outcome r = run_all(e, {request(prompt_of(5), 300)}).front();
  CHECK(r.end == StreamEnd::kFinished);
  CHECK(r.finish == FinishReason::kLength);
  CHECK(r.ids.size() < 200);
  CHECK(r.completion_tokens == static_cast<int32_t>(r.ids.size()));
  CHECK(settled(e).kv.pages_used == 0);
}

TEST_CASE("serving: submit validates; budgets update at run time", "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  ServingEngine e(kModel, options());
  CHECK(e.model_name() == "llama_gqa");
  CHECK(e.max_model_len() == 512);
  CHECK(e.tokenizer() == nullptr);
  CHECK_THROWS_AS(e.submit(request({}, 4)), InvalidArgument);
  CHECK_THROWS_AS(e.submit(request({1, 512}, 4)), InvalidArgument);
  CHECK_THROWS_AS(e.submit(request({1, 2}, 511)), InvalidArgument);
  EngineRequest stop = request({1, 2}, 4);
  stop.params.stop = {"x"};
  CHECK_THROWS_AS(e.submit(stop), InvalidArgument);
  CHECK_THROWS_AS(e.update_budgets({1, 2}), InvalidArgument);
  CHECK_THROWS_AS(e.update_budgets({1, 2, 3}), InvalidArgument);
  e.start();
  CHECK(settled(e).budget_chain_tokens == 0);  // no budgets
  const int64_t chain = e.update_budgets({8 * 12288, 8 * 12288, 8 * 12288});
  CHECK(chain > 20);
  const Outcome r = run_all(e, {request(prompt_of(6), 20)}).front();
  CHECK(r.ids.size() == 20);
  CHECK(settled(e).budgets_source == "runtime");
  CHECK(settled(e).budget_chain_tokens == chain);
}

TEST_CASE("serving: a prompt held at 16 bits must fit the pool; the error says so",
          "[serving][engine]") {
  // A pool for one max_model_len chain under a 2-bit budget holds a 400-token prompt at 2 bits,
  // not at 16: with hold_prompt the request is refused, naming the setting; without, it runs.
  EngineOptions o = options();
  o.kv.uniform_bits = 2;
  o.kv.uniform_max_len = 512;
  LocalModelOptions lo;
  lo.kv = o.kv;
  const LocalModel m = LocalModel::open(kModel, lo);
  const kv::PageGeometry g = m.kv_geometry();
  const int32_t layers = static_cast<int32_t>(m.config.num_layers);
  const auto budgets = kv::resolve_layer_budgets(o.kv, layers, g);
  const int64_t chain = worst_case_pages(o.kv, g, budgets, layers, 512, 0);
  REQUIRE(worst_case_pages(o.kv, g, budgets, layers, 408, 400) > chain + 2);
  o.kv_memory_bytes = (chain + 2) * kv::page_bytes(g);
  std::vector<int32_t> prompt(400);
  for (int32_t i = 0; i < 400; ++i)
    prompt[i] = 3 + (i * 37) % 500;
  {
    ServingEngine e(kModel, o);
    e.start();
    CHECK_THROWS_WITH(e.submit(request(prompt, 8)), Catch::Contains("kv_cache.hold_prompt") &&
                                                        Catch::Contains("prompt of 400 tokens"));
    CHECK(run_all(e, {request(prompt_of(3), 8)}).front().ids.size() == 8);  // still serving
  }
  o.kv.hold_prompt = false;
  ServingEngine e(kModel, o);
  e.start();
  const Outcome r = run_all(e, {request(prompt, 8)}).front();
  CHECK(r.end == StreamEnd::kFinished);
  CHECK(r.ids.size() == 8);
  CHECK(settled(e).kv.pages_used == 0);
}

TEST_CASE("serving: submit_all queues all requests together or none", "[serving][engine]") {
  ServingEngine e(kModel, options());
  e.start();
  // One invalid request among valid ones: nothing is queued.
  std::vector<EngineRequest> bad = {request(prompt_of(1), 8), request({}, 8),
                                    request(prompt_of(2), 8)};
  CHECK_THROWS_AS(e.submit_all(bad), InvalidArgument);
  const EngineStats idle = settled(e);
  CHECK(idle.requests_waiting == 0);
  CHECK(idle.prompt_tokens_total == 0);
  // Three requests on a running engine: admitted in one step (one prefill step for all three,
  // then one decode step per further token), whatever the engine thread was doing meanwhile.
  const uint64_t steps0 = idle.steps_total;
  std::vector<EngineRequest> three;
  for (int i = 0; i < 3; ++i)
    three.push_back(request(prompt_of(5), 12, 1.0f));
  for (int i = 0; i < 3; ++i)
    three[i].params.seed = 7 + i;
  std::vector<std::shared_ptr<RequestStream>> streams = e.submit_all(three);
  REQUIRE(streams.size() == 3);
  std::vector<Outcome> got;
  for (auto& s : streams)
    got.push_back(collect(*s));
  for (const Outcome& o : got) {
    CHECK(o.end == StreamEnd::kFinished);
    CHECK(o.ids.size() == 12);
  }
  const EngineStats st =
      settled(e, [](const EngineStats& x) { return x.requests_finished_total == 3; });
  CHECK(st.steps_total - steps0 == 12);
  // Each is the request alone with its seed (CPU backend: batch-invariant).
  for (int i = 0; i < 3; ++i)
    CHECK(run_all(e, {three[i]}).front().ids == got[i].ids);
}

TEST_CASE("serving: a request larger than the queue is a 400, a full queue a 503",
          "[serving][engine]") {
  EngineOptions o = options();
  o.scheduler.max_waiting = 2;
  ServingEngine e(kModel, o);  // not started: what is submitted stays queued
  std::vector<EngineRequest> three(3, request(prompt_of(1), 4));
  try {
    e.submit_all(three);  // n = 3 never fits a queue of 2: retrying cannot help
    FAIL("submit_all of 3 with max_waiting 2 was accepted");
  } catch (const InvalidArgument& err) {
    CHECK_THAT(err.what(),
               Catch::Contains("3 sequences") && Catch::Contains("scheduler.max_waiting"));
  }
  e.submit(request(prompt_of(1), 4));
  std::vector<EngineRequest> two(2, request(prompt_of(2), 4));
  try {
    e.submit_all(two);  // fits the queue, not now: busy
    FAIL("submit_all of 2 behind 1 with max_waiting 2 was accepted");
  } catch (const Unavailable& err) {
    CHECK_THAT(err.what(), Catch::Contains("1 sequences are waiting, this request adds 2"));
  }
  CHECK_NOTHROW(e.submit(request(prompt_of(3), 4)));
  CHECK_THROWS_AS(e.submit(request(prompt_of(4), 4)), Unavailable);
}

TEST_CASE("serving: random submits and cancels and deadlines and budget changes",
          "[serving][engine][property]") {
  // Everything a client and an operator can do at once, against a small pool: every stream ends
  // exactly once and never with an internal error, finished ones honour max_tokens, the counters
  // add up to what was submitted, and the pool drains to zero.
  both_step_modes();
  const auto admission =
      GENERATE(SchedulerConfig::Admission::kGuaranteed, SchedulerConfig::Admission::kOvercommit);
  const bool guaranteed = admission == SchedulerConfig::Admission::kGuaranteed;
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off")
                      << ", admission " << (guaranteed ? "guaranteed" : "overcommit"));
  EngineOptions o = options();
  o.scheduler.admission = admission;
  o.scheduler.max_step_tokens = 96;
  o.scheduler.prefill_chunk = 24;
  const int64_t page = page_bytes_of(o);
  o.kv_memory_bytes = 110 * page;  // one full-length (512-token) chain at 16 bits, and a little
  ServingEngine e(kModel, o);
  e.start();
  std::mt19937 rng(guaranteed ? 11u : 12u);
  auto uniform = [&](int lo, int hi) { return lo + static_cast<int>(rng() % (hi - lo + 1)); };
  struct Submitted {
    std::shared_ptr<RequestStream> stream;
    int32_t max_tokens;
  };
  std::vector<Submitted> live;
  int refused = 0, budget_changes = 0;
  for (int action = 0; action < 120; ++action) {
    const int what = uniform(0, 99);
    if (what < 70) {  // 1-3 choices of one request, as n does
      std::vector<EngineRequest> reqs;
      const int n = uniform(1, 3);
      std::vector<int32_t> prompt;
      for (int i = uniform(1, 120); i > 0; --i)
        prompt.push_back(uniform(3, 500));
      for (int c = 0; c < n; ++c) {
        EngineRequest r = request(prompt, uniform(1, 150), uniform(0, 1) ? 0.0f : 0.9f);
        r.params.seed = rng();
        if (uniform(0, 3) == 0) r.params.top_k = uniform(1, 40);
        if (uniform(0, 3) == 0) r.params.top_p = 0.8f;
        if (uniform(0, 19) == 0)
          r.deadline = std::chrono::steady_clock::now() + 1ms * uniform(0, 30);
        reqs.push_back(std::move(r));
      }
      try {
        auto streams = e.submit_all(reqs);
        for (size_t c = 0; c < streams.size(); ++c)
          live.push_back({std::move(streams[c]), reqs[c].params.max_tokens});
      } catch (const InvalidArgument&) {  // too large for the pool under the budgets in force
        ++refused;
      }
    } else if (what < 85 && !live.empty()) {
      live[rng() % live.size()].stream->cancel();
    } else if (what < 92) {
      ++budget_changes;
      const int kind = uniform(0, 2);
      if (kind == 0) {
        e.update_budgets({});
      } else {
        const int64_t pages = kind == 1 ? uniform(2, 4) : uniform(5, 40);
        e.update_budgets(std::vector<int64_t>(3, pages * page));
      }
    } else {
      std::this_thread::sleep_for(1ms * uniform(0, 20));
    }
  }
  uint64_t finished = 0, cancelled = 0, rejected = 0;
  for (Submitted& x : live) {
    const Outcome out = collect(*x.stream);
    REQUIRE(out.end.has_value());
    CHECK(*out.end != StreamEnd::kError);
    CHECK(*out.end != StreamEnd::kShutdown);
    CHECK(static_cast<int32_t>(out.ids.size()) <= x.max_tokens);
    CHECK(out.completion_tokens == static_cast<int32_t>(out.ids.size()));
    if (*out.end == StreamEnd::kFinished) {
      ++finished;
      CHECK(out.finish == FinishReason::kLength);  // ignore_eos: max_tokens or the budget floor
    }
    cancelled += *out.end == StreamEnd::kCancelled;
    rejected += *out.end == StreamEnd::kRejected;
    CHECK_FALSE(x.stream->next(0ms).has_value());  // nothing after the end
  }
  const EngineStats st = settled(e, [&](const EngineStats& x) {
    return x.requests_finished_total + x.requests_cancelled_total + x.requests_rejected_total ==
           live.size();
  });
  CHECK(st.kv.pages_used == 0);
  CHECK(st.requests_running == 0);
  CHECK(st.requests_waiting == 0);
  CHECK(st.requests_failed_total == 0);
  CHECK(st.requests_finished_total == finished);
  CHECK(st.requests_cancelled_total == cancelled);
  CHECK(st.requests_rejected_total == rejected);
  CHECK(finished > 40);
  CHECK(cancelled > 5);
  CHECK(budget_changes > 3);
  (void)refused;
}

TEST_CASE("serving: shutdown lets requests finish within the grace, then ends the rest",
          "[serving][engine]") {
  both_step_modes();
  INFO("async_steps " << (g_steps == EngineOptions::AsyncSteps::kOn ? "on" : "off"));
  {
    ServingEngine e(kModel, options());
    e.start();
    auto s = e.submit(request(prompt_of(7), 10));
    e.shutdown(10s);
    CHECK(collect(*s).end == StreamEnd::kFinished);
    CHECK_FALSE(e.accepting());
    CHECK_THROWS_AS(e.submit(request(prompt_of(7), 10)), Unavailable);
  }
  ServingEngine e(kModel, options());
  e.start();
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 4; ++i)
    streams.push_back(e.submit(request(prompt_of(i), 480)));
  REQUIRE(streams[0]->next(20s).has_value());  // running
  e.shutdown(0ms);
  for (auto& s : streams) {
    const Outcome o = collect(*s);
    CHECK(o.end == StreamEnd::kShutdown);
  }
  CHECK(e.stats().kv.pages_used == 0);
}
