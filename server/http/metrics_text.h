#pragma once
// EngineStats -> the Prometheus text exposition format (version 0.0.4): every metric prefixed
// pmkv_, with # HELP and # TYPE lines; histograms with cumulative le buckets, _sum and _count.
#include <string>

#include "engine/serving/serving_engine.h"

namespace pmkv::http {

// Counters the HTTP frontend keeps itself.
struct HttpCounters {
  uint64_t requests_total = 0;
  uint64_t errors_total = 0;  // responses with status >= 400
  uint64_t open_connections = 0;
};

std::string format_metrics(const EngineStats& stats, const HttpCounters& http);

}  // namespace pmkv::http
