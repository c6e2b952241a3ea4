// Host work of one decode step at large batches and long contexts, without a GPU: what the engine
// does before the GPU can start (build_step: KV bookkeeping and the page tables) and what the CUDA
// backend does next (the page arrays and the decode plan, serial and on 8 threads). The contexts
// are filled through the KV manager (bookkeeping only), as bench_cuda_backend does.
//
//   bench_host_step [--batches 16,64,128] [--contexts 4096,16384] [--bits 16,2] [--steps 20]
//                   [--layers 32] [--budget-spread F] [--out FILE]
//
// --budget-spread F (budgeted caches only): layer l gets (1 + F l / (layers - 1)) times the
// uniform budget, as a calibrated budgets file would give, so the layers hold different bit
// mixes and the plan cannot reuse one layer's items for the next (its worst case).
//
// Output: a table on stderr, one JSON object on stdout (or --out FILE).
#include <omp.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "engine/kv/kv_cache_manager.h"
#include "engine/runtime/step_builder.h"
#include "kernels/attention/decode.h"

using namespace pmkv;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t comma = s.find(',', at);
    v.push_back(std::stoll(s.substr(at, comma - at)));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return v;
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

nlohmann::json run(int32_t layers, int64_t batch, int64_t context, int bits, int steps,
                   double spread) {
  kv::KvCacheConfig kc;
  if (bits < 16) {
    kc.uniform_bits = bits;
    kc.uniform_max_len = context + steps;
    kc.policy = kv::DemotionPolicy::kOldestFirst;
  }
  const kv::PageGeometry g = kv::resolve_geometry(kc, 8, 128);
  const int64_t per_layer =
      kv::pages_for_uniform(kc, g, context + steps, bits) + 2 * kc.window_tokens / g.tokens16 + 4;
  const auto pages =
      static_cast<int32_t>(static_cast<double>(batch * layers * per_layer) * (1.0 + spread));
  std::vector<int64_t> budgets = kv::resolve_layer_budgets(kc, layers, g);
  if (bits < 16 && spread > 0 && layers > 1) {
    for (int32_t l = 0; l < layers; ++l)
      budgets[l] =
          static_cast<int64_t>(static_cast<double>(budgets[l]) * (1.0 + spread * l / (layers - 1)));
  }
  kv::KvCacheManager kv(layers, g, pages, kc, budgets);
  for (int64_t s = 0; s < batch; ++s) {
    for (int64_t done = 0; done < context; done += kc.window_tokens) {
      kv::KvStepOps ops;
      ops.layers.resize(layers);
      std::vector<std::vector<kv::KvWrite>> writes(layers);
      kv.append(static_cast<kv::SeqId>(s + 1),
                static_cast<int32_t>(std::min<int64_t>(kc.window_tokens, context - done)), &ops,
                &writes);
      kv.end_step();
    }
  }
  std::vector<int32_t> toks(batch, 1);
  std::vector<SeqChunk> chunks;
  for (int64_t s = 0; s < batch; ++s)
    chunks.push_back({static_cast<kv::SeqId>(s + 1), std::span<const int32_t>(&toks[s], 1)});
  const kernels::DecodeParallelFor threads = [](int n, const std::function<void(int)>& body) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(8)
    for (int i = 0; i < n; ++i)
      body(i);
  };
  StepBatch b;
  std::vector<int32_t> ids, pbits, ptok;
  kernels::DecodePlan plan;
  std::vector<double> t_build, t_arrays, t_plan1, t_plan8;
  for (int i = 0; i < steps; ++i) {
    auto t0 = Clock::now();
    if (!build_step(kv, chunks, b)) throw std::runtime_error("pool exhausted");
    t_build.push_back(ms_since(t0));
    t0 = Clock::now();
    const size_t P = b.pages.size();
    ids.resize(P);
    pbits.resize(P);
    ptok.resize(P);
#pragma omp parallel for if (P > 65536) num_threads(8)
    for (size_t k = 0; k < P; ++k) {
      ids[k] = b.pages[k].page;
      pbits[k] = b.pages[k].bits;
      ptok[k] = b.pages[k].num_tokens;
    }
    t_arrays.push_back(ms_since(t0));
    std::vector<kernels::DecodeLayerTable> tables(layers);
    for (int32_t l = 0; l < layers; ++l) {
      tables[l] = {static_cast<int32_t>(batch), b.page_starts.data() + l * batch, pbits.data(),
                   ptok.data()};
    }
    kernels::DecodePlanConfig pc{8, 4, 128, g.tokens16};
    pc.num_sms = 132;
    t0 = Clock::now();
    kernels::plan_decode(pc, tables, &plan);
    t_plan1.push_back(ms_since(t0));
    t0 = Clock::now();
    kernels::plan_decode(pc, tables, &plan, threads);
    t_plan8.push_back(ms_since(t0));
    kv.end_step();
  }
  const double build = median(t_build), arrays = median(t_arrays), plan1 = median(t_plan1),
               plan8 = median(t_plan8);
  std::fprintf(stderr,
               "b=%lld ctx=%lld %2d-bit: %zu pages; build_step %.2f ms, page arrays %.2f ms, "
               "plan %.2f ms (1 thread) / %.2f ms (8)\n",
               static_cast<long long>(batch), static_cast<long long>(context), bits, b.pages.size(),
               build, arrays, plan1, plan8);
  return {{"batch", batch},
          {"context", context},
          {"budget_spread", bits < 16 ? spread : 0.0},
          {"kv_bits", bits},
          {"pages", b.pages.size()},
          {"build_step_ms", build},
          {"page_arrays_ms", arrays},
          {"plan_ms_1_thread", plan1},
          {"plan_ms_8_threads", plan8}};
}

}  // namespace

int main(int argc, char** argv) {
  std::string batches = "16,64,128", contexts = "4096,16384", bits = "16,2", out_path;
  int steps = 20;
  int32_t layers = 32;
  double spread = 0.0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", a.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--batches") {
      batches = v;
    } else if (a == "--contexts") {
      contexts = v;
    } else if (a == "--bits") {
      bits = v;
    } else if (a == "--steps") {
      steps = std::stoi(v);
    } else if (a == "--layers") {
      layers = std::stoi(v);
    } else if (a == "--budget-spread") {
      spread = std::stod(v);
    } else if (a == "--out") {
      out_path = v;
    } else {
      std::fprintf(stderr,
                   "usage: bench_host_step [--batches 16,64,128] [--contexts 4096,16384] "
                   "[--bits 16,2] [--steps 20] [--layers 32] [--budget-spread F] [--out FILE]\n");
      return 2;
    }
  }
  nlohmann::json pts = nlohmann::json::array();
  for (int64_t b : parse_list(batches))
    for (int64_t c : parse_list(contexts))
      for (int64_t k : parse_list(bits))
        pts.push_back(run(layers, b, c, static_cast<int>(k), steps, spread));
  const nlohmann::json out{{"host_threads", omp_get_max_threads()}, {"points", pts}};
  if (out_path.empty()) {
    std::puts(out.dump(2).c_str());
  } else {
    std::ofstream(out_path) << out.dump(2) << "\n";
  }
  return 0;
}
