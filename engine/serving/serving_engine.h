#pragma once
// ServingEngine: the online engine behind `pmkv serve`. Frontends (HTTP, gRPC) call submit() from
// any thread and read each request's RequestStream; one engine thread owns every piece of mutable
// state (scheduler, KV manager, backend) and runs steps: continuous batching of many sequences,
// chunked prefill mixed with decode under a per-step token budget, KV-budget-aware admission.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/backend/backend_factory.h"
#include "engine/common/error.h"
#include "engine/kv/kv_cache_manager.h"
#include "engine/kv/kv_config.h"
#include "engine/model/model_config.h"
#include "engine/serving/request.h"
#include "engine/serving/request_stream.h"
#include "engine/tokenizer/tokenizer.h"

namespace pmkv {

struct SchedulerConfig {
  int32_t max_running = 256;       // sequences in one step at most
  int32_t max_step_tokens = 2048;  // tokens of one step (prompt chunks + decode tokens)
  int32_t prefill_chunk = 512;     // prompt tokens of one sequence per step at most
  int32_t max_waiting = 4096;      // queued requests at most; beyond, submit() rejects
  // guaranteed: admit only what fits at its full length (prompt + max_tokens) under the KV
  // budgets, so no sequence is ever preempted. overcommit: admit while pages are free; when the
  // pool runs out, first demote across sequences, then preempt (recompute) the newest.
  enum class Admission { kGuaranteed, kOvercommit } admission = Admission::kGuaranteed;
};

struct EngineOptions {
  SchedulerConfig scheduler;
  kv::KvCacheConfig kv;
  int64_t kv_memory_bytes = 256ll << 20;  // the KV pool
  int32_t num_threads = 0;                // CPU backend threads; 0 = every core
  Device device = Device::kCpu;           // auto: cuda when a GPU is present
  bool dummy_weights = false;             // random weights of the config's shape (cuda only)
  bool cuda_graphs = true;                // cuda: decode steps replay CUDA graphs
  // Steps run ahead: the host builds and launches step N + 1 while the backend runs step N, and
  // reads step N's tokens after (sampling in the backend; a sequence that finishes at step N
  // computes one discarded token in N + 1). auto: on when the backend samples on the device.
  enum class AsyncSteps { kAuto, kOn, kOff } async_steps = AsyncSteps::kAuto;
  int32_t max_model_len = 0;  // context cap; 0 = the model's max_position_embeddings
};

// A latency histogram with fixed buckets (seconds), Prometheus-style cumulative on export.
struct HistogramSnapshot {
  std::vector<double> bounds;    // upper bounds, ascending (+Inf implied)
  std::vector<uint64_t> counts;  // per bucket (not cumulative), bounds.size() + 1 entries
  double sum = 0;
  uint64_t count = 0;
};

struct EngineStats {
  int32_t requests_running = 0;
  int32_t requests_waiting = 0;
  uint64_t requests_finished_total = 0;   // ended with end == kFinished
  uint64_t requests_cancelled_total = 0;  // kCancelled (client or deadline)
  uint64_t requests_rejected_total = 0;   // kRejected
  uint64_t requests_failed_total = 0;     // kError
  uint64_t prompt_tokens_total = 0;
  uint64_t generation_tokens_total = 0;
  uint64_t preemptions_total = 0;
  uint64_t steps_total = 0;
  // Steps run ahead (EngineOptions::async_steps): whether the engine does, and the tokens it
  // computed for sequences that had already ended (one each at most).
  bool async_steps = false;
  uint64_t discarded_tokens_total = 0;
  // The engine thread's time blocked on the device (Backend::device_wait_seconds(): 0 on the CPU
  // backend, whose forward is host work) and with no work.
  double device_wait_seconds_total = 0;
  double idle_seconds_total = 0;
  kv::KvPoolStats kv;
  HistogramSnapshot time_to_first_token;
  HistogramSnapshot inter_token_latency;
  HistogramSnapshot request_latency;
  std::string budgets_source;     // "none", "uniform", "file:PATH", "runtime"
  // Where the budgets end a chain (finish reason length): kv::chain_tokens_at_floor of the
  // tightest layer, max_model_len when every layer holds that many; 0 without budgets.
  int64_t budget_chain_tokens = 0;
  std::string key_scales_source;  // "none" or "file:PATH" (kv_cache.key_scales, folded at load)
};

// What submit() throws when the request is fine but the engine cannot take it now (the queue is
// full, or the server is shutting down): a 503 rather than a 400. Other request errors are plain
// InvalidArgument.
class Unavailable : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

class ServingEngine {
 public:
  // Loads the model directory (config, weights, tokenizer when present) and sizes the KV pool.
  // Throws LoadError / InvalidArgument naming what is wrong.
  ServingEngine(const std::filesystem::path& model_dir, EngineOptions options);
  ~ServingEngine();  // shutdown(0) if still running
  ServingEngine(const ServingEngine&) = delete;
  ServingEngine& operator=(const ServingEngine&) = delete;

  // Starts the engine thread.
  void start();
  // Thread-safe. Validates the request (InvalidArgument with a message fit for a 400: empty
  // prompt, ids outside the vocabulary, prompt + max_tokens beyond the context, invalid params,
  // queue full) and queues it. The stream's first update may come at any time after. Throws
  // Unavailable (an InvalidArgument) when the queue is full or the server is shutting down.
  std::shared_ptr<RequestStream> submit(EngineRequest request);
  // submit() for several requests at once, all or none: every one is validated first and they
  // enter the queue together, so an idle engine admits them in one step (the n choices of an API
  // request: on the CUDA backend a sequence's numerics depend on the batch it decodes in, so the
  // same n-choice request twice is reproducible only if its choices always start together).
  std::vector<std::shared_ptr<RequestStream>> submit_all(std::vector<EngineRequest> requests);
  // Thread-safe snapshot.
  EngineStats stats() const;
  // Thread-safe: new per-layer KV budgets (bytes per sequence and layer; empty = none), applied by
  // the engine thread before its next step. InvalidArgument when malformed. Returns where they
  // end a chain (EngineStats::budget_chain_tokens).
  int64_t update_budgets(std::vector<int64_t> per_layer_bytes);
  // Stops accepting requests (submit throws), lets running ones finish for up to `grace`, then
  // cancels what is left (end = kShutdown) and stops the engine thread. Idempotent.
  void shutdown(std::chrono::milliseconds grace);
  bool accepting() const;

  const ModelConfig& model_config() const;
  const Tokenizer* tokenizer() const;  // null when the model directory has none
  int32_t max_model_len() const;
  const std::string& model_name() const;  // the directory's name

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmkv
