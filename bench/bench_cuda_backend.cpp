// End-to-end benchmark of the CUDA backend on one GPU: the engine's real step path (KvCacheManager
// -> build_step -> CudaBackend::forward -> end_step), on a real checkpoint or on random weights of
// a real shape (--load-format dummy, e.g. bench/configs/llama3-8b).
//
//  batch1:     a 128-token prompt, then --decode-steps greedy decode steps at batch 1: ms per token
//              (wall clock: page tables, upload, forward, greedy sampling on the device), against
//              the weight-read floor = bytes of the weights / measured device-to-device copy
//              bandwidth.
//  prefill:    one 4096-token prompt in one step: tokens/s, and the time to first token (prefill
//              step + the first token's logits).
//  throughput: batch B x context C decode, 16-bit cache and progressive caches with a budget of
//              uniform 4-bit or 2-bit memory (policy oldest_first): tokens/s. The context is filled
//              with KV-manager bookkeeping only (no forward; page contents are whatever the pool
//              holds), so the timed decode steps see the page tables and bit-widths a real chain
//              of that length has. Points whose pool does not fit the free GPU memory are reported
//              as not fitting.
// Output: a table on stderr, one JSON object on stdout (or --out FILE).
#include <cuda_runtime.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "engine/backend/cuda/cuda_backend.h"
#include "engine/backend/cuda/gemm.h"
#include "engine/kv/kv_cache_manager.h"
#include "engine/kv/kv_config.h"
#include "engine/model/model_config.h"
#include "engine/model/weight_store.h"
#include "engine/runtime/step_builder.h"
#ifdef PMKV_DECODE_TRACE
#include "kernels/attention/decode.h"
#endif

using namespace pmkv;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// "a,b,,c" -> {"a", "b", "", "c"}.
std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> items;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    items.push_back(item);
  return items;
}

// "1,4,16" -> {1, 4, 16}; anything but comma-separated integers throws std::invalid_argument.
std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  for (const std::string& item : split_commas(s)) {
    if (item.empty()) continue;
    int64_t x = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), x);
    if (ec != std::errc() || end != item.data() + item.size())
      throw std::invalid_argument("'" + item + "' is not an integer");
    v.push_back(x);
  }
  if (v.empty()) throw std::invalid_argument("an empty list");
  return v;
}

// Device-to-device copy of 2 GiB, bytes read + written per second (as bench_decode_attention).
double copy_bandwidth_gbps() {
  const size_t bytes = size_t{2} << 30;
  cuda::DeviceMemory a(bytes), b(bytes);
  PMKV_CUDA_CHECK(cudaMemset(a.as(), 1, bytes));
  cuda::Event e0(cudaEventDefault), e1(cudaEventDefault);
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    PMKV_CUDA_CHECK(cudaEventRecord(e0.get()));
    PMKV_CUDA_CHECK(cudaMemcpyAsync(b.as(), a.as(), bytes, cudaMemcpyDeviceToDevice));
    PMKV_CUDA_CHECK(cudaEventRecord(e1.get()));
    PMKV_CUDA_CHECK(cudaEventSynchronize(e1.get()));
    float t = 0;
    PMKV_CUDA_CHECK(cudaEventElapsedTime(&t, e0.get(), e1.get()));
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return 2.0 * static_cast<double>(bytes) / (ms[ms.size() / 2] * 1e-3) / 1e9;
}

bool g_cuda_graphs = true;   // --cuda-graphs 0|1
int32_t g_logprobs = -1;     // --logprobs N: every sampled row also returns N top log-probabilities
bool g_async_steps = false;  // --async-steps 0|1: throughput steps run ahead (engine.async_steps)

struct Setup {
  ModelConfig cfg;
  std::optional<WeightStore> weights;
  bool dummy = true;
  int64_t weight_bytes = 0;  // bf16 bytes of every matrix
};

// A backend plus KV manager sized for `pages` pages with `kv_cfg`.
struct Engine {
  kv::PageGeometry geometry;
  std::unique_ptr<CudaBackend> backend;
  std::unique_ptr<kv::KvCacheManager> kv;
  StepBatch batch;
};

Engine make_engine(const Setup& st, const kv::KvCacheConfig& kv_cfg, int64_t pages,
                   int32_t max_step_tokens) {
  Engine e;
  e.geometry = kv::resolve_geometry(kv_cfg, static_cast<int32_t>(st.cfg.num_kv_heads),
                                    static_cast<int32_t>(st.cfg.head_dim));
  CudaBackendOptions o;
  o.max_step_tokens = max_step_tokens;
  o.dummy_weights = st.dummy;
  o.dummy_seed = 1;
  o.cuda_graphs = g_cuda_graphs;
  e.backend = std::make_unique<CudaBackend>(st.cfg, st.weights ? &*st.weights : nullptr, e.geometry,
                                            static_cast<int32_t>(pages), o);
  const auto budgets =
      kv::resolve_layer_budgets(kv_cfg, static_cast<int32_t>(st.cfg.num_layers), e.geometry);
  e.kv = std::make_unique<kv::KvCacheManager>(static_cast<int32_t>(st.cfg.num_layers), e.geometry,
                                              static_cast<int32_t>(pages), kv_cfg, budgets);
  return e;
}

double g_forward_seconds = 0;  // forward_sample's share of the last run_step
double g_build_seconds = 0;    // build_step's share of it

nlohmann::json graph_json(const CudaBackend& b) {
  const CudaGraphCounters& c = b.graph_counters();
  return {{"captures", c.captures}, {"replays", c.replays}, {"eager_warmups", c.eager_warmups}};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// The sampling parameters of every row: greedy, unless --temperature / --top-k / --top-p say
// otherwise (the draws are seeded per row and step, so the tokens are random but repeatable).
SamplingParams g_sampling = [] {
  SamplingParams p;
  p.temperature = 0;
  return p;
}();

// Runs one step of `chunks` with sampling on the device (the engine's path: no logits copied
// back); returns its wall time and each chunk's token in `tokens`.
const SamplingParams& sampling_params() {
  return g_sampling;
}

double run_step(Engine& e, std::span<const SeqChunk> chunks, std::vector<int32_t>& tokens) {
  const SamplingParams& params = sampling_params();
  const auto t0 = Clock::now();
  // One StepBatch reused from step to step, as the serving engine's scheduler does.
  if (!build_step(*e.kv, chunks, e.batch)) throw std::runtime_error("KV pool exhausted");
  const StepBatch* batch = &e.batch;
  std::vector<DeviceSampling> rows(batch->logit_rows.size(), DeviceSampling{&params, 0, 0, {}, {}});
  for (DeviceSampling& d : rows)
    d.logprobs = g_logprobs;
  tokens.resize(rows.size());
  std::vector<TokenLogprobs> logprobs(g_logprobs >= 0 ? rows.size() : 0);
  const auto t1 = Clock::now();
  g_build_seconds = std::chrono::duration<double>(t1 - t0).count();
  e.backend->forward_sample(*batch, rows, tokens, logprobs);
  g_forward_seconds = seconds_since(t1);
  e.kv->end_step();
  return seconds_since(t0);
}

// `steps` decode steps of `chunks` (one token each) run ahead, as the engine's async_steps does:
// step i + 1 is built and launched before step i's tokens are read, and from the second step on
// row r takes the token step i sampled in row r on the device (token_src). Returns each step's
// time, the interval between consecutive completions as the host sees them; `build` and `prepare`
// get each step's host parts.
std::vector<double> run_steps_ahead(Engine& e, std::span<const SeqChunk> chunks, int32_t steps,
                                    std::vector<double>* build, std::vector<double>* prepare) {
  std::vector<DeviceSampling> rows(chunks.size(), DeviceSampling{&sampling_params(), 0, 0, {}, {}});
  for (DeviceSampling& d : rows)
    d.logprobs = g_logprobs;
  std::vector<int32_t> src(chunks.size()), out(chunks.size());
  std::vector<TokenLogprobs> logprobs(g_logprobs >= 0 ? chunks.size() : 0);
  for (size_t r = 0; r < src.size(); ++r)
    src[r] = static_cast<int32_t>(r);
  std::vector<double> t;
  auto last = Clock::now();
  for (int32_t i = 0; i <= steps; ++i) {
    if (i < steps) {
      const auto t0 = Clock::now();
      if (!build_step(*e.kv, chunks, e.batch)) throw std::runtime_error("KV pool exhausted");
      if (i > 0) e.batch.token_src = src;
      if (build) build->push_back(seconds_since(t0));
      e.backend->launch_sample(e.batch, rows);
      if (prepare) prepare->push_back(e.backend->last_prepare_seconds());
      e.kv->end_step();
    }
    if (i > 0) e.backend->wait_sampled(out, logprobs);
    const auto now = Clock::now();
    if (i > 0) t.push_back(std::chrono::duration<double>(now - last).count());
    last = now;
  }
  return t;
}

nlohmann::json bench_batch1(const Setup& st, int32_t steps, double weight_floor_tps) {
  const int32_t prompt = 128;
  kv::KvCacheConfig kv_cfg;
  const kv::PageGeometry g = kv::resolve_geometry(kv_cfg, static_cast<int32_t>(st.cfg.num_kv_heads),
                                                  static_cast<int32_t>(st.cfg.head_dim));
  const int64_t pages =
      (prompt + steps + 64) / g.tokens16 * st.cfg.num_layers + 64 * st.cfg.num_layers;
#ifdef PMKV_DECODE_TRACE
  // The decode kernel's CTA-timeline probe (kernels/attention/decode_kernel.cuh), set before the
  // graphs are captured: every launch writes its CTAs' rows, so the buffer ends up with the last
  // step's last layer.
  constexpr size_t kTraceRows = 8192;
  uint64_t* trace = nullptr;
  if (cudaMalloc(&trace, kTraceRows * kernels::kDecodeTraceSlots * 8) != cudaSuccess ||
      cudaMemset(trace, 0, kTraceRows * kernels::kDecodeTraceSlots * 8) != cudaSuccess) {
    throw std::runtime_error("trace buffer");
  }
  kernels::set_decode_trace(trace);
#endif
  Engine e = make_engine(st, kv_cfg, pages, prompt);
  std::mt19937 rng(7);
  std::vector<int32_t> ids(prompt);
  for (int32_t& t : ids)
    t = static_cast<int32_t>(rng() % st.cfg.vocab_size);
  std::vector<int32_t> out;
  SeqChunk c{1, ids};
  run_step(e, {&c, 1}, out);
  int32_t tok = out[0];
  std::vector<double> t, fwd;
  if (!g_async_steps) {
    for (int32_t i = 0; i < steps; ++i) {
      SeqChunk d{1, std::span<const int32_t>(&tok, 1)};
      t.push_back(run_step(e, {&d, 1}, out));
      fwd.push_back(g_forward_seconds);
      tok = out[0];
    }
  } else {
    SeqChunk d{1, std::span<const int32_t>(&tok, 1)};
    t = run_steps_ahead(e, {&d, 1}, steps, nullptr, nullptr);
    fwd = t;
  }
#ifdef PMKV_DECODE_TRACE
  {
    constexpr int kSlots = kernels::kDecodeTraceSlots;
    std::vector<uint64_t> h(kTraceRows * kSlots);
    if (cudaMemcpy(h.data(), trace, h.size() * 8, cudaMemcpyDeviceToHost) != cudaSuccess) {
      throw std::runtime_error("trace copy");
    }
    const char* dir = std::getenv("PMKV_TRACE_DIR");
    const std::string name = std::string(dir != nullptr ? dir : ".") + "/batch1_decode_trace.txt";
    if (FILE* f = std::fopen(name.c_str(), "w"); f != nullptr) {
      for (size_t r = 0; r < kTraceRows; ++r) {
        if (h[r * kSlots + 1] == 0) continue;
        std::fprintf(f, "%zu", r);
        for (int k = 0; k < kSlots; ++k)
          std::fprintf(f, " %llu", static_cast<unsigned long long>(h[r * kSlots + k]));
        std::fprintf(f, "\n");
      }
      std::fclose(f);
    }
  }
#endif
  std::sort(fwd.begin(), fwd.end());
  const double fwd_ms = fwd[fwd.size() / 2] * 1e3;
  e.kv->release(1);
  // Median of the steps after a warm-up of 8 (first steps plan cuBLASLt algorithms).
  std::vector<double> warm(t.begin() + std::min<size_t>(8, t.size() / 2), t.end());
  std::sort(warm.begin(), warm.end());
  const double ms = warm[warm.size() / 2] * 1e3;
  const double tps = 1e3 / ms;
  std::fprintf(stderr,
               "batch1 decode: %.3f ms/token, %.1f tokens/s, floor %.1f tokens/s (%.1f%%)\n", ms,
               tps, weight_floor_tps, 100 * tps / weight_floor_tps);
  return {{"batch1_decode_ms_per_token", ms},
          {"batch1_decode_tokens_per_s", tps},
          {"weight_floor_tokens_per_s", weight_floor_tps},
          {"fraction_of_weight_floor", tps / weight_floor_tps},
          {"batch1_forward_ms", fwd_ms},
          {"batch1_prompt_tokens", prompt},
          {"batch1_decode_steps", steps},
          {"cuda_graphs", graph_json(*e.backend)}};
}

// The model's GEMMs alone at m rows (cuBLASLt through GemmRunner), effective weight-read
// bandwidth: where batch-1 decode time goes.
nlohmann::json bench_gemm(const ModelConfig& c, int64_t m, double copy_gbps) {
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"qkv", c.q_width() + 2 * c.kv_width(), c.hidden_size},
                          {"o", c.hidden_size, c.q_width()},
                          {"gate_up", 2 * c.intermediate_size, c.hidden_size},
                          {"down", c.hidden_size, c.intermediate_size},
                          {"lm_head", c.vocab_size, c.hidden_size}};
  cuda::Stream owned_stream;
  const cudaStream_t stream = owned_stream.get();
  nlohmann::json out = nlohmann::json::array();
  {
    cuda::GemmRunner gemm(stream);
    for (const Shape& sh : shapes) {
      // Enough copies of the weight to cycle through 256 MB (> L2): a decode step never finds a
      // weight in L2, and a 33 MB matrix read back to back would.
      const int64_t bytes = sh.n * sh.k * 2;
      const int64_t copies = std::max<int64_t>(1, ((int64_t{256} << 20) + bytes - 1) / bytes);
      std::vector<cuda::DeviceMemory> ws;
      for (int64_t i = 0; i < copies; ++i) {
        ws.emplace_back(bytes);
        PMKV_CUDA_CHECK(cudaMemsetAsync(ws.back().as(), 0, bytes, stream));
      }
      cuda::DeviceMemory a(m * sh.k * 2), d(m * sh.n * 4);
      const cuda::DeviceMemory& w = ws[0];
      PMKV_CUDA_CHECK(cudaMemsetAsync(a.as(), 0, a.bytes(), stream));
      cuda::Event e0(cudaEventDefault), e1(cudaEventDefault);
      for (int i = 0; i < 3; ++i)
        gemm.run(a.as(), ws[i % copies].as(), d.as(), cuda::GemmOut::kF32, m, sh.n, sh.k);
      const int reps = 50;
      PMKV_CUDA_CHECK(cudaEventRecord(e0.get(), stream));
      for (int i = 0; i < reps; ++i)
        gemm.run(a.as(), ws[i % copies].as(), d.as(), cuda::GemmOut::kF32, m, sh.n, sh.k);
      PMKV_CUDA_CHECK(cudaEventRecord(e1.get(), stream));
      PMKV_CUDA_CHECK(cudaEventSynchronize(e1.get()));
      float ms = 0;
      PMKV_CUDA_CHECK(cudaEventElapsedTime(&ms, e0.get(), e1.get()));
      const double us = ms * 1e3 / reps;
      const double gbps = double(sh.n * sh.k * 2) / (us * 1e-6) / 1e9;
      const char* path =
          gemm.uses_bulk(a.as(), w.as(), d.as(), cuda::GemmOut::kF32, m, sh.n, sh.k) ? "skinny-bulk"
          : gemm.uses_skinny(a.as(), w.as(), d.as(), cuda::GemmOut::kF32, m, sh.n, sh.k)
              ? "skinny-register"
              : "cublaslt";
      std::fprintf(stderr,
                   "gemm m=%lld %-8s n=%6lld k=%6lld: %8.1f us, %6.0f GB/s (%.0f%% of copy, %s)\n",
                   static_cast<long long>(m), sh.name, static_cast<long long>(sh.n),
                   static_cast<long long>(sh.k), us, gbps, 100 * gbps / copy_gbps, path);
      out.push_back({{"name", sh.name},
                     {"m", m},
                     {"n", sh.n},
                     {"k", sh.k},
                     {"path", path},
                     {"us", us},
                     {"weight_gb_s", gbps},
                     {"fraction_of_copy", gbps / copy_gbps}});
    }
  }
  return out;
}

nlohmann::json bench_prefill(const Setup& st, int32_t len) {
  kv::KvCacheConfig kv_cfg;
  const kv::PageGeometry g = kv::resolve_geometry(kv_cfg, static_cast<int32_t>(st.cfg.num_kv_heads),
                                                  static_cast<int32_t>(st.cfg.head_dim));
  const int64_t pages = (len / g.tokens16 + 16) * st.cfg.num_layers;
  Engine e = make_engine(st, kv_cfg, pages, len);
  std::mt19937 rng(11);
  std::vector<int32_t> ids(len);
  for (int32_t& t : ids)
    t = static_cast<int32_t>(rng() % st.cfg.vocab_size);
  std::vector<int32_t> out;
  std::vector<double> times;
  for (int rep = 0; rep < 4; ++rep) {  // the first is a warm-up (cuBLASLt plans)
    SeqChunk c{static_cast<kv::SeqId>(rep + 1), ids};
    times.push_back(run_step(e, {&c, 1}, out));
    e.kv->release(c.seq);
    e.kv->end_step();
  }
  std::sort(times.begin() + 1, times.end());
  const double s = times[1 + (times.size() - 1) / 2];
  std::fprintf(stderr, "prefill %d tokens: %.1f ms, %.0f tokens/s (TTFT %.1f ms)\n", len, s * 1e3,
               len / s, s * 1e3);
  return {{"prefill_tokens", len}, {"prefill_tokens_per_s", len / s}, {"ttft_ms", s * 1e3}};
}

nlohmann::json bench_throughput(const Setup& st, int64_t batch, int64_t context, int bits,
                                int32_t steps) {
  kv::KvCacheConfig kv_cfg;
  if (bits < 16) {
    kv_cfg.uniform_bits = bits;
    kv_cfg.uniform_max_len = context + steps;
    kv_cfg.policy = kv::DemotionPolicy::kOldestFirst;
  }
  const kv::PageGeometry g = kv::resolve_geometry(kv_cfg, static_cast<int32_t>(st.cfg.num_kv_heads),
                                                  static_cast<int32_t>(st.cfg.head_dim));
  const int64_t per_layer = kv::pages_for_uniform(kv_cfg, g, context + steps, bits) +
                            2 * kv_cfg.window_tokens / g.tokens16 + 4;
  const int64_t pages = batch * st.cfg.num_layers * per_layer;
  const int64_t pool_bytes = pages * kv::page_bytes(g);
  nlohmann::json j{
      {"batch", batch}, {"context", context}, {"kv_bits", bits}, {"pool_bytes", pool_bytes}};
  size_t free_b = 0, total_b = 0;
  PMKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  // Weights, activations and workspaces come on top of the pool.
  const int64_t need = pool_bytes + st.weight_bytes + (int64_t{6} << 30);
  if (need > static_cast<int64_t>(free_b) || pages > INT32_MAX) {
    std::fprintf(stderr, "throughput b=%lld ctx=%lld %d-bit: pool %.1f GiB does not fit\n",
                 static_cast<long long>(batch), static_cast<long long>(context), bits,
                 pool_bytes / 1073741824.0);
    j["fits"] = false;
    return j;
  }
  Engine e = make_engine(st, kv_cfg, pages, static_cast<int32_t>(batch));
  // Fill: bookkeeping only, one window of tokens per append so the manager demotes as a real
  // chain would (a sequence over budget at the floor would be finished by the engine; it is
  // counted and kept here).
  const int32_t chunk = kv_cfg.window_tokens;
  int64_t at_floor = 0;
  for (int64_t s = 0; s < batch; ++s) {
    for (int64_t done = 0; done < context; done += chunk) {
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(chunk, context - done));
      kv::KvStepOps ops;
      ops.layers.resize(st.cfg.num_layers);
      std::vector<std::vector<kv::KvWrite>> writes(st.cfg.num_layers);
      const kv::AppendStatus a = e.kv->append(static_cast<kv::SeqId>(s + 1), n, &ops, &writes);
      if (a == kv::AppendStatus::kPoolExhausted) throw std::runtime_error("fill: pool exhausted");
      at_floor += a == kv::AppendStatus::kOverBudgetAtFloor ? 1 : 0;
      e.kv->end_step();
    }
  }
  std::vector<int32_t> toks(batch, 1);
  std::vector<SeqChunk> chunks;
  for (int64_t s = 0; s < batch; ++s) {
    chunks.push_back({static_cast<kv::SeqId>(s + 1), std::span<const int32_t>(&toks[s], 1)});
  }
  std::vector<int32_t> out;
  std::vector<double> t, build, prepare, fwd;
  if (!g_async_steps) {
    for (int32_t i = 0; i < steps; ++i) {
      t.push_back(run_step(e, chunks, out));
      build.push_back(g_build_seconds);
      prepare.push_back(e.backend->last_prepare_seconds());
      fwd.push_back(g_forward_seconds);
      for (int64_t s = 0; s < batch; ++s)
        toks[s] = out[s];
    }
  } else {
    t = run_steps_ahead(e, chunks, steps, &build, &prepare);
    fwd = t;
  }

  const kv::KvPoolStats ps = e.kv->pool_stats();
  for (int64_t s = 0; s < batch; ++s)
    e.kv->release(static_cast<kv::SeqId>(s + 1));
  e.kv->end_step();
  std::vector<double> warm(t.begin() + std::min<size_t>(4, t.size() / 2), t.end());
  double sum = 0;
  for (double x : warm)
    sum += x;
  const double step_ms = sum / warm.size() * 1e3;
  // The median leaves out the rare steps with flushes and demotions (and, with graphs, a shape's
  // first uses: one eager run, one capture); the mean above includes them.
  std::vector<double> sorted = warm;
  std::sort(sorted.begin(), sorted.end());
  const double median_ms = sorted[sorted.size() / 2] * 1e3;
  const double tps = batch * 1e3 / step_ms;
  std::fprintf(
      stderr,
      "throughput b=%lld ctx=%lld %2d-bit: %.2f ms/step (median %.2f), %.0f tokens/s, pool "
      "%.1f GiB, %d pages used\n",
      static_cast<long long>(batch), static_cast<long long>(context), bits, step_ms, median_ms, tps,
      pool_bytes / 1073741824.0, ps.pages_used);
  j["fits"] = true;
  j["fill_appends_over_budget_at_floor"] = at_floor;
  j["step_ms"] = step_ms;
  j["step_ms_median"] = median_ms;
  // Host parts (medians): build_step (KV bookkeeping, page tables), the backend's preparation
  // (page arrays, decode plan, staging) before its launches, and forward_sample's whole wall time.
  j["build_step_ms_median"] = median(build) * 1e3;
  j["prepare_ms_median"] = median(prepare) * 1e3;
  j["forward_ms_median"] = median(fwd) * 1e3;
  j["tokens_per_s"] = tps;
  j["pages_used"] = ps.pages_used;
  j["steps"] = steps;
  j["cuda_graphs"] = graph_json(*e.backend);
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, out_path;
  std::vector<std::string> scenarios = {"batch1", "prefill", "throughput"};
  std::vector<int64_t> batches = {16, 64, 128}, contexts = {4096, 16384}, bits_list = {16, 4, 2};
  std::vector<int64_t> gemm_rows = {1, 16, 64};
  bool dummy = false;
  int32_t decode_steps = 128, tp_steps = 32, prefill_len = 4096;
  // A bad value ends the run before anything is measured: exit 2, naming the flag.
  auto bad = [](const std::string& flag, const std::string& v, const std::string& why) {
    std::fprintf(stderr, "bench_cuda_backend: %s '%s': %s\n", flag.c_str(), v.c_str(), why.c_str());
    std::exit(2);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto next_int = [&](int32_t min = INT32_MIN) -> int32_t {
      const std::string v = next();
      int32_t x = 0;
      const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
      if (ec != std::errc() || end != v.data() + v.size()) bad(a, v, "not an integer");
      if (x < min) bad(a, v, "less than " + std::to_string(min));
      return x;
    };
    auto next_float = [&]() -> float {
      const std::string v = next();
      char* end = nullptr;
      const float x = std::strtof(v.c_str(), &end);
      if (v.empty() || *end != '\0') bad(a, v, "not a number");
      return x;
    };
    auto list_of = [&](const std::string& v) -> std::vector<int64_t> {
      try {
        return parse_list(v);
      } catch (const std::invalid_argument& e) {
        bad(a, v, e.what());
      }
      return {};  // not reached: bad() exits
    };
    auto next_switch = [&]() -> bool {
      const std::string v = next();
      if (v != "0" && v != "1") bad(a, v, "0 or 1");
      return v == "1";
    };
    if (a == "--model") {
      model_dir = next();
    } else if (a == "--load-format") {
      const std::string v = next();
      if (v != "dummy" && v != "safetensors") bad(a, v, "dummy or safetensors");
      dummy = v == "dummy";
    } else if (a == "--out") {
      out_path = next();
    } else if (a == "--scenarios") {
      const std::string v = next();
      scenarios = split_commas(v);
      for (const std::string& item : scenarios)
        if (item != "batch1" && item != "gemm" && item != "prefill" && item != "throughput")
          bad(a, v, "'" + item + "' is not one of batch1, gemm, prefill, throughput");
    } else if (a == "--batches") {
      batches = list_of(next());
    } else if (a == "--contexts") {
      contexts = list_of(next());
    } else if (a == "--bits") {
      const std::string v = next();
      bits_list = list_of(v);
      for (int64_t b : bits_list)
        if (b != 16 && b != 8 && b != 4 && b != 2)
          bad(a, v, std::to_string(b) + " is not 16, 8, 4 or 2");
    } else if (a == "--decode-steps") {
      decode_steps = next_int(1);
    } else if (a == "--throughput-steps") {
      tp_steps = next_int(1);
    } else if (a == "--prefill-len") {
      prefill_len = next_int(1);
    } else if (a == "--gemm-rows") {
      gemm_rows = list_of(next());
    } else if (a == "--cuda-graphs") {
      g_cuda_graphs = next_switch();
    } else if (a == "--async-steps") {
      g_async_steps = next_switch();
    } else if (a == "--logprobs") {
      g_logprobs = next_int();
    } else if (a == "--temperature") {
      g_sampling.temperature = next_float();
    } else if (a == "--top-k") {
      g_sampling.top_k = next_int();
    } else if (a == "--top-p") {
      g_sampling.top_p = next_float();
    } else {
      std::fprintf(
          stderr,
          "usage: bench_cuda_backend --model DIR [--load-format dummy|safetensors] "
          "[--scenarios batch1,gemm,prefill,throughput] [--batches 16,64,128] "
          "[--contexts 4096,16384] [--bits 16,4,2] [--decode-steps N] "
          "[--throughput-steps N] [--prefill-len N] [--cuda-graphs 0|1] [--async-steps 0|1] "
          "[--logprobs N] [--temperature T] [--top-k K] [--top-p P] "
          "[--gemm-rows 1,16,64] [--out FILE]\n");
      return 2;
    }
  }
  if (model_dir.empty()) {
    std::fprintf(stderr, "--model DIR is required (config.json; weights unless dummy)\n");
    return 2;
  }
  // Nothing is measured without a GPU: say so and write no results (a throughput point would
  // otherwise read "does not fit" from a failed memory query).
  int devices = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_cuda_backend: no usable CUDA device (%s)\n",
                 e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    return 1;
  }
  try {
    Setup st;
    st.cfg = parse_model_config(model_dir + "/config.json");
    st.dummy = dummy;
    if (!dummy) st.weights.emplace(WeightStore::open(model_dir));
    // bf16 bytes of the matrices: the layers' and one vocabulary table (what a decode token
    // reads: the embedding is a row gather, lm_head is read whole), plus a second table when
    // lm_head is not tied (what the GPU holds).
    const ModelConfig& c = st.cfg;
    const int64_t layer_elems = (c.q_width() + 2 * c.kv_width()) * c.hidden_size +
                                c.hidden_size * c.q_width() +
                                3 * c.intermediate_size * c.hidden_size;
    const int64_t read_per_token = 2 * (layer_elems * c.num_layers + c.vocab_size * c.hidden_size);
    st.weight_bytes =
        read_per_token + (c.tie_word_embeddings ? 0 : 2 * c.vocab_size * c.hidden_size);
    std::string command;
    for (int i = 0; i < argc; ++i) {
      if (i > 0) command += ' ';
      command += argv[i];
    }
    cudaDeviceProp prop{};
    PMKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const double copy = copy_bandwidth_gbps();
    nlohmann::json out{{"device", prop.name},
                       {"commit", std::getenv("COMMIT") ? std::getenv("COMMIT") : "unknown"},
                       {"command", command},
                       {"model", model_dir},
                       {"load_format", dummy ? "dummy" : "safetensors"},
                       {"cuda_graphs_enabled", g_cuda_graphs},
                       {"async_steps", g_async_steps},
                       {"logprobs", g_logprobs},
                       {"temperature", g_sampling.temperature},
                       {"top_k", g_sampling.top_k},
                       {"top_p", g_sampling.top_p},
                       {"copy_bandwidth_gb_s", copy}};
    std::fprintf(stderr, "device %s, copy bandwidth %.0f GB/s (read+write)\n", prop.name, copy);
    auto has = [&](const char* s) {
      return std::find(scenarios.begin(), scenarios.end(), s) != scenarios.end();
    };
    if (has("batch1")) {
      const double floor_tps = copy * 1e9 / static_cast<double>(read_per_token);
      out["weight_bytes_per_token"] = read_per_token;
      out["batch1"] = bench_batch1(st, decode_steps, floor_tps);
    }
    if (has("gemm")) {
      nlohmann::json g;
      for (int64_t m : gemm_rows)
        g[std::to_string(m)] = bench_gemm(st.cfg, m, copy);
      out["gemm"] = g;
    }
    if (has("prefill")) out["prefill"] = bench_prefill(st, prefill_len);
    if (has("throughput")) {
      nlohmann::json pts = nlohmann::json::array();
      for (int64_t b : batches)
        for (int64_t ctx : contexts)
          for (int64_t bits : bits_list)
            pts.push_back(bench_throughput(st, b, ctx, static_cast<int>(bits), tp_steps));
      out["throughput"] = pts;
    }
    const std::string text = out.dump(2);
    if (out_path.empty()) {
      std::puts(text.c_str());
    } else {
      std::ofstream(out_path) << text << "\n";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_backend: %s\n", e.what());
    return 1;
  }
  return 0;
}
