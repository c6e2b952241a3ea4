#include "server/http/metrics_text.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "engine/kv/kv_cache_manager.h"

namespace pmkv::http {
namespace {

std::string number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  char buf[32];
  for (int precision = 15; precision <= 17; ++precision) {  // shortest text that reads back as v
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

class Writer {
 public:
  void header(std::string_view name, std::string_view type, std::string_view help) {
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }
  void sample(std::string_view name, double v, std::string_view labels = {}) {
    out_ += name;
    if (!labels.empty()) {
      out_ += '{';
      out_ += labels;
      out_ += '}';
    }
    out_ += ' ';
    out_ += number(v);
    out_ += '\n';
  }
  void gauge(std::string_view name, double v, std::string_view help) {
    header(name, "gauge", help);
    sample(name, v);
  }
  void counter(std::string_view name, double v, std::string_view help) {
    header(name, "counter", help);
    sample(name, v);
  }
  void histogram(std::string_view name, const HistogramSnapshot& h, std::string_view help) {
    header(name, "histogram", help);
    const std::string bucket = std::string(name) + "_bucket";
    uint64_t cumulative = 0;
    for (size_t i = 0; i < h.bounds.size(); ++i) {
      cumulative += i < h.counts.size() ? h.counts[i] : 0;
      sample(bucket, static_cast<double>(cumulative), "le=\"" + number(h.bounds[i]) + "\"");
    }
    sample(bucket, static_cast<double>(h.count), "le=\"+Inf\"");
    sample(std::string(name) + "_sum", h.sum);
    sample(std::string(name) + "_count", static_cast<double>(h.count));
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

void write_kv(Writer& w, const kv::KvPoolStats& kv) {
  w.gauge("pmkv_kv_pool_pages_used", kv.pages_used, "KV pool pages in use.");
  w.gauge("pmkv_kv_pool_pages_total", kv.pages_total, "KV pool pages in all.");
  w.gauge("pmkv_kv_pool_pages_peak", kv.pages_peak, "Most KV pool pages ever in use at once.");
  w.gauge("pmkv_kv_page_bytes", static_cast<double>(kv.page_bytes), "Bytes of one KV page.");
  w.header("pmkv_kv_tokens", "gauge", "Cached tokens of live sequences by bit-width (all layers).");
  for (size_t i = 0; i < kv::kStatBits.size(); ++i) {
    w.sample("pmkv_kv_tokens", static_cast<double>(kv.tokens_by_bits[i]),
             "bits=\"" + std::to_string(kv::kStatBits[i]) + "\"");
  }
  w.header("pmkv_kv_pages", "gauge", "KV pages of live sequences by bit-width.");
  for (size_t i = 0; i < kv::kStatBits.size(); ++i) {
    w.sample("pmkv_kv_pages", static_cast<double>(kv.pages_by_bits[i]),
             "bits=\"" + std::to_string(kv::kStatBits[i]) + "\"");
  }
  w.counter("pmkv_kv_demotions_total", static_cast<double>(kv.demotions_total),
            "KV page demotion ops applied (a page halving its bits).");
  w.counter("pmkv_kv_flushes_total", static_cast<double>(kv.flushes_total),
            "KV window flushes into the body.");
  w.gauge("pmkv_kv_sequences", kv.num_sequences, "Sequences holding KV pages.");
}

}  // namespace

std::string format_metrics(const EngineStats& s, const HttpCounters& http) {
  Writer w;
  w.gauge("pmkv_requests_running", s.requests_running, "Requests being generated.");
  w.gauge("pmkv_requests_waiting", s.requests_waiting, "Requests queued for admission.");
  w.counter("pmkv_requests_finished_total", static_cast<double>(s.requests_finished_total),
            "Requests that finished (stop or length).");
  w.counter("pmkv_requests_cancelled_total", static_cast<double>(s.requests_cancelled_total),
            "Requests cancelled by their client or their deadline.");
  w.counter("pmkv_requests_rejected_total", static_cast<double>(s.requests_rejected_total),
            "Requests never admitted (the prompt cannot fit).");
  w.counter("pmkv_requests_failed_total", static_cast<double>(s.requests_failed_total),
            "Requests ended by an internal engine error.");
  w.counter("pmkv_prompt_tokens_total", static_cast<double>(s.prompt_tokens_total),
            "Prompt tokens prefilled.");
  w.counter("pmkv_generation_tokens_total", static_cast<double>(s.generation_tokens_total),
            "Tokens generated.");
  w.counter("pmkv_preemptions_total", static_cast<double>(s.preemptions_total),
            "Sequences preempted (to be recomputed).");
  w.counter("pmkv_steps_total", static_cast<double>(s.steps_total), "Engine steps run.");
  w.gauge("pmkv_engine_async_steps", s.async_steps ? 1 : 0,
          "1 when the engine launches a step before reading the previous one's tokens.");
  w.counter("pmkv_discarded_tokens_total", static_cast<double>(s.discarded_tokens_total),
            "Tokens computed for sequences that had ended while their step was in flight.");
  w.counter("pmkv_engine_device_wait_seconds_total", s.device_wait_seconds_total,
            "Engine-thread time blocked on the device (0 on the CPU backend).");
  w.counter("pmkv_engine_idle_seconds_total", s.idle_seconds_total,
            "Engine-thread time with nothing to run.");
  write_kv(w, s.kv);
  w.gauge("pmkv_kv_budget_chain_tokens", static_cast<double>(s.budget_chain_tokens),
          "Tokens past which the KV budgets end a chain (finish reason length) in the tightest "
          "layer; max_model_len when every layer holds that many, 0 without budgets.");
  w.histogram("pmkv_time_to_first_token_seconds", s.time_to_first_token,
              "Time from submit to the first generated token.");
  w.histogram("pmkv_inter_token_latency_seconds", s.inter_token_latency,
              "Time between consecutive generated tokens of a request.");
  w.histogram("pmkv_request_latency_seconds", s.request_latency,
              "Time from submit to the end of a request.");
  w.counter("pmkv_http_requests_total", static_cast<double>(http.requests_total),
            "HTTP requests answered.");
  w.counter("pmkv_http_errors_total", static_cast<double>(http.errors_total),
            "HTTP requests answered with a status >= 400.");
  w.gauge("pmkv_http_open_connections", static_cast<double>(http.open_connections),
          "Open HTTP connections.");
  return w.take();
}

}  // namespace pmkv::http
