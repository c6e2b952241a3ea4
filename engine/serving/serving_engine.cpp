#include "engine/serving/serving_engine.h"

#include <omp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "engine/backend/backend_factory.h"
#include "engine/runtime/local_model.h"
#include "engine/serving/metrics.h"
#include "engine/serving/output_processor.h"
#include "engine/serving/scheduler.h"

namespace pmkv {

namespace {

using Clock = Sequence::Clock;

void validate_scheduler(const SchedulerConfig& c) {
  auto positive = [](int32_t v, const char* key) {
    if (v <= 0) {
      throw InvalidArgument(std::string("scheduler.") + key + ": must be a positive integer, got " +
                            std::to_string(v));
    }
  };
  positive(c.max_running, "max_running");
  positive(c.max_step_tokens, "max_step_tokens");
  positive(c.prefill_chunk, "prefill_chunk");
  positive(c.max_waiting, "max_waiting");
}

std::string directory_name(const std::filesystem::path& dir) {
  const std::filesystem::path p = dir.lexically_normal();
  return p.has_filename() ? p.filename().string() : p.parent_path().filename().string();
}

std::string mib(int64_t bytes) {
  return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1 << 20));
}

// What the budgets mean in tokens: the length past which the floor action ends a chain, in the
// tightest layer (kv::chain_tokens_at_floor, once per distinct budget), logged and returned
// (max_len when every layer holds that many, 0 without budgets).
int64_t chain_limit(const kv::KvCacheConfig& config, const kv::PageGeometry& geometry,
                    std::span<const int64_t> budgets, int64_t max_len) {
  if (budgets.empty()) return 0;
  int64_t tokens = max_len, layer = -1;
  std::vector<std::pair<int64_t, int64_t>> seen;  // budget, tokens
  for (size_t l = 0; l < budgets.size(); ++l) {
    auto it = std::find_if(seen.begin(), seen.end(),
                           [&](const auto& e) { return e.first == budgets[l]; });
    if (it == seen.end()) {
      seen.emplace_back(budgets[l],
                        kv::chain_tokens_at_floor(config, geometry, budgets[l], max_len));
      it = seen.end() - 1;
    }
    if (it->second < tokens) {
      tokens = it->second;
      layer = static_cast<int64_t>(l);
    }
  }
  if (layer < 0) {
    spdlog::info("engine: KV budgets hold a chain of max_model_len ({} tokens) in every layer",
                 max_len);
  } else {
    spdlog::info(
        "engine: KV budgets end a chain (finish reason length) once it passes {} tokens, with "
        "every body page at the {}-bit floor (layer {}, the tightest); max_model_len {}",
        tokens, config.floor_bits, layer, max_len);
  }
  return tokens;
}

}  // namespace

struct ServingEngine::Impl {
  Impl(const std::filesystem::path& dir, EngineOptions o);

  // Any thread ------------------------------------------------------------------------------
  std::vector<std::shared_ptr<RequestStream>> submit_all(std::vector<EngineRequest> requests);
  void validate(const EngineRequest& r) const;
  void log_plan(int64_t full_length_pages) const;
  void shutdown(std::chrono::milliseconds grace);

  // The engine thread -----------------------------------------------------------------------
  void run();
  bool take_inbox();  // true: time to stop
  bool step();
  void run_plan(StepPlan& plan);
  void process_outputs(const StepPlan& plan, const StepBatch& batch);
  // A step's pick for one sequence -> its stream (floor action, or token, text, stop check);
  // true when the sequence has ended (an error inside ends it too).
  bool hand_out(Sequence& s, OutputProcessor::Pick pick, bool at_floor, Clock::time_point now);
  // Steps run ahead (options.async_steps): a launched step whose tokens are not processed yet.
  struct PendingStep {
    StepPlan plan;
    std::vector<int32_t> token_at;  // per chunk: where its sampled token goes in seq->tokens
    std::vector<uint8_t> at_floor;  // per chunk: over budget at the floor bits
    int32_t rows = 0;               // sampled rows
    int32_t prompt_tokens = 0;      // tokens of its chunks of more than one token
    bool logprobs = false;          // some sampled row asked for log-probabilities
  };
  void launch_ahead(StepPlan& plan);  // builds and launches; the step becomes `pending`
  // The plan's sampled chunks -> sampling_rows.
  // True when some row asks for log-probabilities.
  bool fill_sampling_rows(const StepPlan& plan, const StepBatch& batch);
  // Waits for the pending step's tokens and hands them out (finishing or retiring sequences).
  void process_pending();
  // Whether the next plan needs the host to know every token first (see step()).
  bool must_drain() const;
  // After an error: forgets the steps in flight and ends their sequences and `also`'s.
  void abandon_in_flight(const StepPlan* also, const std::string& why);
  bool ends_stream(Sequence& s);  // a sequence's stream ended outside a step (cancel, deadline)
  void publish(bool full);
  void wait_for_work();  // wait_for_inbox(), timed as idle
  void wait_for_inbox();

  // Fixed after construction.
  EngineOptions options;
  LocalModel model;
  std::string name;
  int32_t max_len = 0;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<kv::KvCacheManager> kv;
  int64_t num_pages = 0;

  // Engine thread only.
  std::unique_ptr<Scheduler> scheduler;
  EngineMetrics metrics;
  OutputProcessor outputs{metrics};
  std::vector<float> logits;
  std::vector<DeviceSampling> sampling_rows;
  std::vector<int32_t> device_tokens;          // this step's tokens when sampled on the device
  std::vector<TokenLogprobs> device_logprobs;  // and their log-probabilities (when asked for)
  bool async = false;                          // options.async_steps resolved for the backend
  bool sample_in_backend = false;  // tokens picked by the backend (no logits copied back)
  std::optional<PendingStep> pending;
  // A step in flight with at least this many prompt-chunk tokens is waited for before the next
  // plan (run()). ~14 ms of prefill on an H200 at 8B; PMKV_ASYNC_DRAIN_PROMPT_TOKENS overrides
  // it (0: always run ahead) for measurements.
  int32_t drain_prompt_tokens = 512;
  // Sequences that ended while a step with them was in flight: out of the scheduler (pages, slot
  // and reservation given back at once: the backend runs steps in order, so a later step may
  // reuse the pages), kept alive until that step is processed.
  std::vector<std::unique_ptr<Sequence>> zombies;
  void retire(Sequence& s);  // makes `s` a zombie (its stream has ended)
  void bury(Sequence& s);    // drops a zombie whose last step in flight was processed
  kv::KvPoolStats kv_stats;
  Clock::time_point kv_stats_at{};
  std::string budgets_source;
  int64_t chain_tokens = 0;  // EngineStats::budget_chain_tokens of the budgets in force
  std::string key_scales_source;

  // The submit seam (mu).
  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<std::unique_ptr<Sequence>> inbox;
  struct BudgetChange {
    std::vector<int64_t> per_layer_bytes;  // empty: no budgets
    int64_t chain_tokens = 0;              // what they mean in tokens (chain_limit)
  };
  std::optional<BudgetChange> new_budgets;
  std::vector<int64_t> budgets;  // the latest budgets, for submit()'s size check
  bool stopping = false;
  Clock::time_point grace_end{};
  std::atomic<int32_t> num_waiting{0};
  std::atomic<uint64_t> next_id{1};

  // The stats seam (stats_mu).
  mutable std::mutex stats_mu;
  EngineStats snapshot;
  // While the engine thread waits for work: since when (stats() adds the time so far, so that
  // the idle counter moves during a long wait and never steps back).
  std::optional<Clock::time_point> idle_since;

  std::mutex thread_mu;  // start() / shutdown()
  std::thread thread;
};

ServingEngine::Impl::Impl(const std::filesystem::path& dir, EngineOptions o)
    : options(std::move(o)),
      model(LocalModel::open(dir, {.num_threads = options.num_threads,
                                   .dummy_weights = options.dummy_weights,
                                   .kv = options.kv})),
      name(directory_name(dir)) {
  validate_scheduler(options.scheduler);
  const int64_t context = model.config.max_position_embeddings;
  if (options.max_model_len < 0 || (context > 0 && options.max_model_len > context)) {
    throw InvalidArgument("engine.max_model_len: " + std::to_string(options.max_model_len) +
                          " is outside [0, " + std::to_string(context) +
                          "] (the model's max_position_embeddings; 0 = that)");
  }
  max_len = static_cast<int32_t>(options.max_model_len > 0 ? options.max_model_len : context);
  if (max_len <= 0) {
    throw InvalidArgument(
        "engine.max_model_len: the model's config.json gives no "
        "max_position_embeddings; set the context length");
  }
  const kv::PageGeometry& g = model.kv_geometry();
  const int64_t page = kv::page_bytes(g);
  num_pages = options.kv_memory_bytes / page;
  const int32_t layers = static_cast<int32_t>(model.config.num_layers);
  budgets = model.kv_budgets();
  // A chain of max_model_len tokens (a held prompt that long is checked at submit()).
  const int64_t one = worst_case_pages(options.kv, g, budgets, layers, max_len, 0);
  if (num_pages < one || num_pages > INT32_MAX) {
    throw InvalidArgument(fmt::format(
        "kv_cache.memory: {} bytes hold {} pages of {} bytes; one sequence of max_model_len {} "
        "tokens needs {} pages ({} bytes){}: raise kv_cache.memory or lower engine.max_model_len",
        options.kv_memory_bytes, num_pages, page, max_len, one, one * page,
        num_pages > INT32_MAX ? " and the pool is limited to 2^31 pages" : ""));
  }
  backend = make_backend({.device = choose_device(options.device, model.config),
                          .num_threads = options.num_threads,
                          .max_step_tokens = options.scheduler.max_step_tokens,
                          .dummy_weights = options.dummy_weights,
                          .cuda_graphs = options.cuda_graphs,
                          .graph_max_batch = options.scheduler.max_running},
                         model.config, &model.weights, g, static_cast<int32_t>(num_pages),
                         model.key_scales());
  key_scales_source =
      options.kv.key_scales ? "file:" + options.kv.key_scales->string() : std::string("none");
  kv = std::make_unique<kv::KvCacheManager>(layers, g, static_cast<int32_t>(num_pages), options.kv,
                                            budgets);
  scheduler = std::make_unique<Scheduler>(*kv, options.scheduler);
  using Async = EngineOptions::AsyncSteps;
  async = options.async_steps == Async::kOn ||
          (options.async_steps == Async::kAuto && backend->samples_on_device());
  sample_in_backend = async || backend->samples_on_device();
  if (const char* v = std::getenv("PMKV_ASYNC_DRAIN_PROMPT_TOKENS")) {
    drain_prompt_tokens = std::atoi(v) > 0 ? std::atoi(v) : INT32_MAX;
  }
  spdlog::info("engine: steps run {}", async ? "ahead (async_steps)" : "one at a time");
  budgets_source = options.kv.budget_file ? "file:" + options.kv.budget_file->string()
                   : budgets.empty()      ? "none"
                                          : "uniform";
  log_plan(one);
  chain_tokens = chain_limit(options.kv, kv->geometry(), budgets, max_len);
  publish(true);
}

void ServingEngine::Impl::log_plan(int64_t full_length_pages) const {
  const kv::PageGeometry& g = kv->geometry();
  const int64_t page = kv->page_bytes();
  spdlog::info("engine: model {} ({} layers, context {}), weights {} ({}, {})", name,
               kv->num_layers(), max_len, mib(backend->weight_bytes()),
               backend->name() == "cpu" ? "fp32" : "bf16", backend->name());
  spdlog::info(
      "engine: KV pool {} pages of {} bytes = {}; a page holds {}/{}/{}/{} tokens at "
      "16/8/4/2 bits; budgets: {}",
      num_pages, page, mib(num_pages * page), kv::tokens_per_page(g, 16), kv::tokens_per_page(g, 8),
      kv::tokens_per_page(g, 4), kv::tokens_per_page(g, 2), budgets_source);
  spdlog::info(
      "engine: a full-length sequence ({} tokens) needs at most {} pages: {} fit at once; "
      "admission {}",
      max_len, full_length_pages, num_pages / full_length_pages,
      options.scheduler.admission == SchedulerConfig::Admission::kGuaranteed ? "guaranteed"
                                                                             : "overcommit");
}

void ServingEngine::Impl::validate(const EngineRequest& r) const {
  r.params.validate();
  const int64_t vocab = model.config.vocab_size;
  if (r.prompt_ids.empty()) throw InvalidArgument("the prompt is empty");
  for (int32_t id : r.prompt_ids) {
    if (id < 0 || id >= vocab) {
      throw InvalidArgument("prompt token id " + std::to_string(id) +
                            " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    }
  }
  if (!model.tokenizer && !r.params.stop.empty()) {
    throw InvalidArgument("stop strings need a tokenizer; the model has none");
  }
  if (r.logprobs < -1 || r.logprobs > vocab) {
    throw InvalidArgument("logprobs must be in [-1, " + std::to_string(vocab) + "], got " +
                          std::to_string(r.logprobs));
  }
  const int64_t prompt = static_cast<int64_t>(r.prompt_ids.size());
  if (prompt + r.params.max_tokens > max_len) {
    throw InvalidArgument("the prompt (" + std::to_string(prompt) + " tokens) plus max_tokens (" +
                          std::to_string(r.params.max_tokens) + ") exceed the context of " +
                          std::to_string(max_len) + " tokens");
  }
}

std::vector<std::shared_ptr<RequestStream>> ServingEngine::Impl::submit_all(
    std::vector<EngineRequest> requests) {
  std::vector<std::unique_ptr<Sequence>> seqs;
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<std::pair<int64_t, int64_t>> lengths;  // full length, prompt
  const Tokenizer* tok = model.tokenizer ? &*model.tokenizer : nullptr;
  for (EngineRequest& r : requests) {
    validate(r);
    auto stream = std::make_shared<RequestStream>();
    const kv::SeqId id = next_id.fetch_add(1);
    if (r.request_id.empty()) r.request_id = "req-" + std::to_string(id);
    const auto prompt = static_cast<int64_t>(r.prompt_ids.size());
    lengths.emplace_back(prompt + r.params.max_tokens, prompt);
    seqs.push_back(
        std::make_unique<Sequence>(id, std::move(r), stream, tok, model.eos_ids, Clock::now()));
    streams.push_back(std::move(stream));
  }
  {
    std::lock_guard lock(mu);
    if (stopping) throw Unavailable("server is shutting down");
    for (const auto [len, prompt] : lengths) {
      const int64_t worst =
          worst_case_pages(options.kv, kv->geometry(), budgets, kv->num_layers(), len, prompt);
      if (worst <= num_pages) continue;
      const int64_t chain =
          worst_case_pages(options.kv, kv->geometry(), budgets, kv->num_layers(), len, 0);
      const std::string why =
          worst > chain ? " while its prompt of " + std::to_string(prompt) +
                              " tokens is computed (held at 16 bits: kv_cache.hold_prompt)"
                        : " at its full length of " + std::to_string(len) +
                              " tokens (prompt + max_tokens)";
      throw InvalidArgument("the request needs " + std::to_string(worst) + " KV pages" + why +
                            "; the pool has " + std::to_string(num_pages));
    }
    // More sequences than the queue holds never fit (a 400, not a 503 that clients retry).
    const auto adds = static_cast<int64_t>(seqs.size());
    if (adds > options.scheduler.max_waiting) {
      throw InvalidArgument(
          "the request has " + std::to_string(adds) + " sequences (n); the server queues at most " +
          std::to_string(options.scheduler.max_waiting) + " (scheduler.max_waiting)");
    }
    const int64_t queued = static_cast<int64_t>(inbox.size()) + num_waiting.load();
    if (queued + adds > options.scheduler.max_waiting) {
      throw Unavailable("the server is busy: " + std::to_string(queued) +
                        " sequences are waiting, this request adds " + std::to_string(adds) +
                        ", at most " + std::to_string(options.scheduler.max_waiting) +
                        " may (scheduler.max_waiting)");
    }
    for (auto& seq : seqs)
      inbox.push_back(std::move(seq));
  }
  cv.notify_all();
  return streams;
}

void ServingEngine::Impl::run() {
  if (options.num_threads > 0) omp_set_num_threads(options.num_threads);  // per thread in OpenMP
  for (;;) {
    bool worked = false, stop = false;
    try {
      // A long step in flight (prompt chunks): wait for it before taking new requests, so those
      // that arrive meanwhile make the next step. Running ahead would hide ~1 ms of host work
      // behind it (a few percent of such a step) and plan them a whole step later.
      if (pending && pending->prompt_tokens >= drain_prompt_tokens) process_pending();
      stop = take_inbox();
      if (!stop) worked = step();
    } catch (const std::exception& e) {
      // A bug outside one step's requests: end everything rather than spin on it.
      spdlog::error("engine: {}; ending every request", e.what());
      abandon_in_flight(nullptr, std::string("internal error: ") + e.what());
      for (auto& s : scheduler->remove_all()) {
        outputs.end(*s, StreamEnd::kError, std::string("internal error: ") + e.what(),
                    Clock::now());
      }
    }
    if (stop) break;
    publish(!worked);
    if (!worked) wait_for_work();
  }
  try {
    if (pending) process_pending();
  } catch (const std::exception& e) {
    spdlog::error("engine: the last step failed at shutdown: {}", e.what());
    abandon_in_flight(nullptr, std::string("internal error: ") + e.what());
  }
  for (auto& s : scheduler->remove_all()) {
    outputs.end(*s, StreamEnd::kShutdown, "the server is shutting down", Clock::now());
  }
  publish(true);
}

bool ServingEngine::Impl::take_inbox() {
  std::deque<std::unique_ptr<Sequence>> in;
  std::optional<BudgetChange> b;
  bool stop = false;
  {
    std::lock_guard lock(mu);
    in.swap(inbox);
    b.swap(new_budgets);
    stop = stopping &&
           (Clock::now() >= grace_end || (inbox.empty() && scheduler->empty() && in.empty()));
  }
  if (b) {
    budgets_source = b->per_layer_bytes.empty() ? "none" : "runtime";
    chain_tokens = b->chain_tokens;
    scheduler->set_layer_budgets(std::move(b->per_layer_bytes));
    // The next snapshot refreshes the per-layer breakdown (budgets included): without this, a
    // partial publish could pair the new budgets_source with the old per-layer budgets.
    kv_stats_at = Clock::time_point{};
    spdlog::info("engine: KV budgets changed ({})", budgets_source);
  }
  for (auto& s : in)
    scheduler->add(std::move(s));
  num_waiting.store(scheduler->num_waiting());
  return stop;
}

void ServingEngine::Impl::wait_for_work() {
  const Clock::time_point t0 = Clock::now();
  {
    std::lock_guard lock(stats_mu);
    idle_since = t0;
  }
  wait_for_inbox();
  const double idle = std::chrono::duration<double>(Clock::now() - t0).count();
  metrics.idle_seconds += idle;
  std::lock_guard lock(stats_mu);
  idle_since.reset();
  snapshot.idle_seconds_total += idle;  // what publish() would write: the counter never drops
}

void ServingEngine::Impl::wait_for_inbox() {
  std::unique_lock lock(mu);
  auto ready = [&] { return !inbox.empty() || new_budgets || stopping; };
  if (scheduler->empty()) {
    cv.wait(lock, ready);
  } else {
    cv.wait_for(lock, std::chrono::milliseconds(2), ready);
  }
}

bool ServingEngine::Impl::ends_stream(Sequence& s) {
  return s.stream->cancelled() || (s.request.deadline && Clock::now() >= *s.request.deadline);
}

bool ServingEngine::Impl::must_drain() const {
  // More log-probabilities than the backend returns need the logits on the host (a step of its
  // own); starvation may preempt or reject, which must not meet a token in flight. (Penalties do
  // not: the backend counts the token in flight, DeviceSampling::last_token_row.)
  return scheduler->any_of([](const Sequence& s) {
    return s.request.logprobs > kMaxDeviceLogprobs;
  }) || scheduler->would_starve();
}

bool ServingEngine::Impl::step() {
  const Clock::time_point now = Clock::now();
  // A sequence in a step in flight ends its stream now and becomes a zombie (retire()).
  auto gone = scheduler->remove_if([&](const Sequence& s) {
    return s.in_flight == 0 &&
           (s.stream->cancelled() || (s.request.deadline && now >= *s.request.deadline));
  });
  for (auto& s : gone)
    outputs.end(*s, StreamEnd::kCancelled, "", now);
  std::vector<Sequence*> cancelled;
  scheduler->for_each_running([&](Sequence& s) {
    if (s.in_flight > 0 && ends_stream(s)) cancelled.push_back(&s);
  });
  for (Sequence* s : cancelled) {
    outputs.end(*s, StreamEnd::kCancelled, "", now);
    retire(*s);
  }
  const bool retired = !cancelled.empty();
  if (pending && must_drain()) process_pending();
  StepPlan plan = scheduler->schedule();
  for (auto& [s, why] : plan.rejected) {
    spdlog::warn("request {} rejected: {}", s->request.request_id, why);
    outputs.end(*s, StreamEnd::kRejected, why, now);
  }
  if (plan.empty()) {
    if (pending) {
      process_pending();
      return true;
    }
    return !gone.empty() || retired || !plan.rejected.empty();
  }
  run_plan(plan);
  return true;
}

void ServingEngine::Impl::run_plan(StepPlan& plan) {
  bool on_device = sample_in_backend;
  for (const ScheduledChunk& c : plan.chunks) {
    if (c.sample && c.seq->request.logprobs > kMaxDeviceLogprobs) on_device = false;
  }
  if (async && on_device) {
    launch_ahead(plan);
    return;
  }
  // A step that samples on the host runs alone: must_drain() emptied the pipeline before this
  // plan was made (processing it now could finish a sequence the plan holds).
  if (pending) throw std::logic_error("engine: a host-sampled step while a step is in flight");
  const StepBatch* built = nullptr;
  try {
    built = &scheduler->build(plan);
    const StepBatch& batch = *built;
    // Sampling in the backend (no logits copied back) unless a request wants more
    // log-probabilities than it returns.
    device_tokens.clear();
    if (on_device) {
      const bool lp = fill_sampling_rows(plan, batch);
      device_tokens.resize(sampling_rows.size());
      device_logprobs.assign(lp ? sampling_rows.size() : 0, {});
      backend->forward_sample(batch, sampling_rows, device_tokens, device_logprobs);
    } else {
      logits.resize(batch.logit_rows.size() * static_cast<size_t>(model.config.vocab_size));
      backend->forward(batch, logits);
    }
  } catch (const std::exception& e) {
    scheduler->end_step();
    spdlog::error("engine: a step of {} requests failed: {}", plan.chunks.size(), e.what());
    for (const ScheduledChunk& c : plan.chunks) {
      outputs.end(*scheduler->finish(c.seq), StreamEnd::kError,
                  std::string("internal error: ") + e.what(), Clock::now());
    }
    return;
  }
  scheduler->end_step();
  scheduler->commit(plan);
  ++metrics.steps;
  process_outputs(plan, *built);
}

bool ServingEngine::Impl::fill_sampling_rows(const StepPlan& plan, const StepBatch& batch) {
  sampling_rows.clear();
  bool logprobs = false;
  for (size_t k = 0; k < plan.chunks.size(); ++k) {
    const ScheduledChunk& c = plan.chunks[k];
    if (!c.sample) continue;
    const Sequence& s = *c.seq;
    // The token count includes a placeholder (its draw comes after the token in flight). The
    // placeholder, always the last token, stays out of the history: the backend takes that token
    // from this step's row that reads it (a token_src row).
    DeviceSampling d{&s.request.params, s.sampler.seed(), s.tokens.size(), s.prompt(), s.output()};
    if (s.placeholder_at >= 0) {
      d.output_ids = d.output_ids.first(d.output_ids.size() - 1);
      d.last_token_row = batch.seq_starts[k] + (s.placeholder_at - s.num_computed);
    }
    d.logprobs = s.request.logprobs;
    logprobs = logprobs || d.logprobs >= 0;
    sampling_rows.push_back(d);
  }
  return logprobs;
}

void ServingEngine::Impl::launch_ahead(StepPlan& plan) {
  PendingStep next;
  const StepBatch* built = nullptr;
  try {
    built = &scheduler->build(plan);
    next.logprobs = fill_sampling_rows(plan, *built);
    backend->launch_sample(*built, sampling_rows);
  } catch (const std::exception& e) {
    scheduler->end_step();
    spdlog::error("engine: a step of {} requests failed: {}", plan.chunks.size(), e.what());
    abandon_in_flight(&plan, std::string("internal error: ") + e.what());
    return;
  }
  scheduler->end_step();
  scheduler->commit(plan);
  ++metrics.steps;
  next.at_floor.assign(plan.chunks.size(), 0);
  for (int32_t k : built->over_budget)
    next.at_floor[k] = 1;
  next.token_at.assign(plan.chunks.size(), -1);
  for (size_t k = 0; k < plan.chunks.size(); ++k) {
    Sequence& s = *plan.chunks[k].seq;
    ++s.in_flight;
    if (plan.chunks[k].num_tokens > 1) next.prompt_tokens += plan.chunks[k].num_tokens;
    if (!plan.chunks[k].sample) continue;
    // The token is still on the device: a placeholder keeps the positions right.
    s.tokens.push_back(-1);
    s.placeholder_at = s.num_tokens() - 1;
    s.placeholder_row = next.rows++;
    next.token_at[k] = s.placeholder_at;
  }
  next.plan = std::move(plan);
  if (pending) process_pending();
  pending = std::move(next);
}

void ServingEngine::Impl::process_pending() {
  PendingStep p = std::move(*pending);
  pending.reset();
  device_tokens.assign(static_cast<size_t>(p.rows), 0);
  device_logprobs.assign(p.logprobs ? static_cast<size_t>(p.rows) : 0, {});
  try {
    backend->wait_sampled(device_tokens, device_logprobs);
  } catch (const std::exception& e) {
    spdlog::error("engine: a step of {} requests failed: {}", p.plan.chunks.size(), e.what());
    pending = std::move(p);
    abandon_in_flight(nullptr, std::string("internal error: ") + e.what());
    return;
  }
  const Clock::time_point now = Clock::now();
  size_t row = 0;
  for (size_t k = 0; k < p.plan.chunks.size(); ++k) {
    Sequence& s = *p.plan.chunks[k].seq;
    --s.in_flight;
    OutputProcessor::Pick pick;
    if (p.plan.chunks[k].sample) {
      if (!device_logprobs.empty() && s.request.logprobs >= 0)
        pick.logprobs = &device_logprobs[row];
      pick.token = device_tokens[row++];
      pick.at = p.token_at[k];
    }
    if (s.zombie) {
      metrics.discarded_tokens += p.plan.chunks[k].sample ? 1 : 0;
      if (s.in_flight == 0) bury(s);
      continue;
    }
    if (!hand_out(s, pick, p.at_floor[k] != 0, now)) continue;
    if (s.in_flight > 0) {
      retire(s);  // the next step computes one more token for it; thrown away
    } else {
      scheduler->finish(&s);
    }
  }
}

void ServingEngine::Impl::abandon_in_flight(const StepPlan* also, const std::string& why) {
  backend->drop_in_flight();
  std::vector<Sequence*> seqs;
  if (pending) {
    for (const ScheduledChunk& c : pending->plan.chunks)
      seqs.push_back(c.seq);
    pending.reset();
  }
  if (also) {
    for (const ScheduledChunk& c : also->chunks)
      seqs.push_back(c.seq);
  }
  std::sort(seqs.begin(), seqs.end());
  seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
  const Clock::time_point now = Clock::now();
  // Their tokens in flight are lost: each of these sequences ends (the others carry on). Every
  // zombie waited on a step that no longer exists.
  for (Sequence* s : seqs) {
    s->in_flight = 0;
    if (s->zombie) continue;
    outputs.end(*s, StreamEnd::kError, why, now);
    scheduler->finish(s);
  }
  zombies.clear();
}

void ServingEngine::Impl::retire(Sequence& s) {
  s.zombie = true;
  zombies.push_back(scheduler->finish(&s));
}

void ServingEngine::Impl::bury(Sequence& s) {
  const auto it =
      std::find_if(zombies.begin(), zombies.end(), [&](const auto& z) { return z.get() == &s; });
  if (it == zombies.end()) throw std::logic_error("engine: bury: not a zombie");
  zombies.erase(it);
}

bool ServingEngine::Impl::hand_out(Sequence& s, OutputProcessor::Pick pick, bool at_floor,
                                   Clock::time_point now) {
  try {
    if (at_floor) {
      outputs.on_floor(s, pick, now);
      return true;
    }
    return !pick.empty() && outputs.on_logits(s, pick, now);
  } catch (const std::exception& e) {
    spdlog::error("request {}: {}", s.request.request_id, e.what());
    outputs.end(s, StreamEnd::kError, std::string("internal error: ") + e.what(), now);
    return true;
  }
}

void ServingEngine::Impl::process_outputs(const StepPlan& plan, const StepBatch& batch) {
  const Clock::time_point now = Clock::now();
  const size_t vocab = static_cast<size_t>(model.config.vocab_size);
  std::vector<uint8_t> at_floor(plan.chunks.size(), 0);
  for (int32_t k : batch.over_budget)
    at_floor[k] = 1;
  size_t row = 0;
  for (size_t k = 0; k < plan.chunks.size(); ++k) {
    Sequence& s = *plan.chunks[k].seq;
    OutputProcessor::Pick pick;
    if (plan.chunks[k].sample) {
      const size_t r = row++;
      if (device_tokens.empty()) {
        pick.logits = std::span(logits).subspan(r * vocab, vocab);
      } else {
        pick.token = device_tokens[r];
        if (!device_logprobs.empty() && s.request.logprobs >= 0)
          pick.logprobs = &device_logprobs[r];
      }
    }
    if (hand_out(s, pick, at_floor[k] != 0, now)) scheduler->finish(&s);
  }
}

void ServingEngine::Impl::publish(bool full) {
  const Clock::time_point now = Clock::now();
  // The per-bits breakdown walks every page: at most every 100 ms, and whenever the engine idles.
  if (full || now - kv_stats_at >= std::chrono::milliseconds(100)) {
    kv_stats = kv->pool_stats();
    kv_stats_at = now;
  } else {
    kv_stats.pages_used = kv->pool().num_used();
    kv_stats.pages_peak = kv->pool().peak_used();
    kv_stats.num_sequences = kv->num_sequences();
  }
  EngineStats st;
  st.requests_running = scheduler->num_running();
  st.requests_waiting = scheduler->num_waiting();
  st.requests_finished_total = metrics.finished;
  st.requests_cancelled_total = metrics.cancelled;
  st.requests_rejected_total = metrics.rejected;
  st.requests_failed_total = metrics.failed;
  st.prompt_tokens_total = metrics.prompt_tokens;
  st.generation_tokens_total = metrics.generation_tokens;
  st.preemptions_total = scheduler->preemptions_total();
  st.steps_total = metrics.steps;
  st.async_steps = async;
  st.discarded_tokens_total = metrics.discarded_tokens;
  st.device_wait_seconds_total = backend->device_wait_seconds();
  st.idle_seconds_total = metrics.idle_seconds;
  st.kv = kv_stats;
  st.time_to_first_token = metrics.time_to_first_token.snapshot();
  st.inter_token_latency = metrics.inter_token_latency.snapshot();
  st.request_latency = metrics.request_latency.snapshot();
  st.budgets_source = budgets_source;
  st.budget_chain_tokens = chain_tokens;
  st.key_scales_source = key_scales_source;
  std::lock_guard lock(stats_mu);
  snapshot = std::move(st);
}

void ServingEngine::Impl::shutdown(std::chrono::milliseconds grace) {
  {
    std::lock_guard lock(mu);
    const Clock::time_point end = Clock::now() + grace;
    grace_end = stopping ? std::min(grace_end, end) : end;
    stopping = true;
  }
  cv.notify_all();
  std::lock_guard lock(thread_mu);
  if (thread.joinable()) {
    thread.join();
    return;
  }
  // Never started: what was queued ends here.
  std::deque<std::unique_ptr<Sequence>> in;
  {
    std::lock_guard l(mu);
    in.swap(inbox);
  }
  for (auto& s : in)
    outputs.end(*s, StreamEnd::kShutdown, "the server is shutting down", Clock::now());
}

// ServingEngine ---------------------------------------------------------------------------------

ServingEngine::ServingEngine(const std::filesystem::path& model_dir, EngineOptions options)
    : impl_(std::make_unique<Impl>(model_dir, std::move(options))) {}

ServingEngine::~ServingEngine() {
  shutdown(std::chrono::milliseconds(0));
}

void ServingEngine::start() {
  std::lock_guard lock(impl_->thread_mu);
  {
    std::lock_guard l(impl_->mu);
    if (impl_->stopping) throw InvalidArgument("the engine was shut down");
  }
  if (!impl_->thread.joinable()) impl_->thread = std::thread([this] { impl_->run(); });
}

std::shared_ptr<RequestStream> ServingEngine::submit(EngineRequest request) {
  std::vector<EngineRequest> one;
  one.push_back(std::move(request));
  return impl_->submit_all(std::move(one)).front();
}

std::vector<std::shared_ptr<RequestStream>> ServingEngine::submit_all(
    std::vector<EngineRequest> requests) {
  return impl_->submit_all(std::move(requests));
}

EngineStats ServingEngine::stats() const {
  EngineStats st;
  {
    std::lock_guard lock(impl_->stats_mu);
    st = impl_->snapshot;
    if (impl_->idle_since) {
      st.idle_seconds_total +=
          std::chrono::duration<double>(Clock::now() - *impl_->idle_since).count();
    }
  }
  std::lock_guard lock(impl_->mu);
  st.requests_waiting += static_cast<int32_t>(impl_->inbox.size());
  return st;
}

int64_t ServingEngine::update_budgets(std::vector<int64_t> per_layer_bytes) {
  const int32_t layers = static_cast<int32_t>(impl_->model.config.num_layers);
  const int64_t page = impl_->kv->page_bytes();
  if (!per_layer_bytes.empty() && static_cast<int32_t>(per_layer_bytes.size()) != layers) {
    throw InvalidArgument("KV budgets: " + std::to_string(per_layer_bytes.size()) +
                          " entries for a model of " + std::to_string(layers) + " layers");
  }
  for (size_t l = 0; l < per_layer_bytes.size(); ++l) {
    if (per_layer_bytes[l] < page) {
      throw InvalidArgument(
          "KV budget of layer " + std::to_string(l) + " (" + std::to_string(per_layer_bytes[l]) +
          " bytes) is smaller than one page (" + std::to_string(page) + " bytes)");
    }
  }
  const int64_t chain =
      chain_limit(impl_->options.kv, impl_->kv->geometry(), per_layer_bytes, impl_->max_len);
  {
    std::lock_guard lock(impl_->mu);
    impl_->budgets = per_layer_bytes;
    impl_->new_budgets = Impl::BudgetChange{std::move(per_layer_bytes), chain};
  }
  impl_->cv.notify_all();
  return chain;
}

void ServingEngine::shutdown(std::chrono::milliseconds grace) {
  impl_->shutdown(grace);
}

bool ServingEngine::accepting() const {
  std::lock_guard lock(impl_->mu);
  return !impl_->stopping;
}

const ModelConfig& ServingEngine::model_config() const {
  return impl_->model.config;
}

const Tokenizer* ServingEngine::tokenizer() const {
  return impl_->model.tokenizer ? &*impl_->model.tokenizer : nullptr;
}

int32_t ServingEngine::max_model_len() const {
  return impl_->max_len;
}

const std::string& ServingEngine::model_name() const {
  return impl_->name;
}

}  // namespace pmkv
