// The sampling kernel (kernels/sampling) per sampling mode: time per launch of `rows` rows of a
// `vocab`-token row of fp32 logits, against the byte floor of reading the logits once (every pass
// after the first reads the row from L2).
//
// The logits are normal(0, sigma) (sigma 3: a model's logits crowd into a few exponents, what the
// radix selection's top digit sees), refreshed from a pristine copy before every launch because
// penalties and temperatures rewrite them; the copy is timed alone and subtracted. Modes: greedy,
// t1 (temperature 1), topk50, topp09, minp, penalties (32 history ids a row), and each with
// log-probabilities (lp0: the token's; lp5, lp20: top entries).
//
// usage: bench_sampling [--rows 1,16,64] [--vocab 128256] [--iters 50] [--sigma 3]
//                       [--modes greedy,topk50,...] [--out FILE]
// Prints a table and writes one JSON object (device, commit from $COMMIT, the points).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/sampling/sampling.h"

namespace {

using pmkv::kernels::SamplingLaunch;
using pmkv::kernels::SamplingRow;

struct Mode {
  std::string name;
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  bool penalties = false;
  int32_t logprobs = -1;
};

std::vector<Mode> modes() {
  std::vector<Mode> base = {{"greedy"},
                            {"t1", 1.0f},
                            {"t0.8", 0.8f},
                            {"topk50", 1.0f, 50},
                            {"topp09", 1.0f, 0, 0.9f},
                            {"topk50+topp095", 0.8f, 50, 0.95f},
                            {"t0.7+topp095", 0.7f, 0, 0.95f},
                            {"minp005", 1.0f, 0, 1.0f, 0.05f},
                            {"penalties", 0.0f, 0, 1.0f, 0.0f, true}};
  std::vector<Mode> out;
  for (const Mode& m : base) {
    out.push_back(m);
    for (int32_t lp : {0, 5, 20}) {
      if (m.name != "greedy" && m.name != "t0.8" && lp != 5) continue;
      Mode x = m;
      x.logprobs = lp;
      x.name += "+lp" + std::to_string(lp);
      out.push_back(x);
    }
  }
  return out;
}

template <class T>
T* device_alloc(size_t n) {
  T* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  std::string rows_list = "1,16,64", out_path, only;  // only: ",name,name," or all
  int32_t vocab = 128256, iters = 50;
  float sigma = 3.0f;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--rows")
      rows_list = next();
    else if (a == "--vocab")
      vocab = std::stoi(next());
    else if (a == "--iters")
      iters = std::stoi(next());
    else if (a == "--sigma")
      sigma = std::stof(next());
    else if (a == "--out")
      out_path = next();
    else if (a == "--modes")
      only = "," + next() + ",";
    else {
      std::fprintf(stderr,
                   "usage: bench_sampling [--rows 1,16,64] [--vocab N] [--iters N] [--sigma S] "
                   "[--modes a,b] [--out FILE]\n");
      return 2;
    }
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const std::vector<int64_t> row_counts = pmkv::bench::parse_list(rows_list);
  const int64_t max_rows = *std::max_element(row_counts.begin(), row_counts.end());
  const size_t n = static_cast<size_t>(max_rows) * vocab;

  std::mt19937 rng(12345);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> host(n);
  for (float& x : host)
    x = normal(rng);
  float* pristine = device_alloc<float>(n);
  float* logits = device_alloc<float>(n);
  CK(cudaMemcpy(pristine, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));

  // Penalty history: 32 distinct ids a row, half in the prompt, counts 1-3.
  constexpr int kHist = 32;
  std::vector<int32_t> starts(max_rows + 1), ids, counts;
  std::vector<uint8_t> in_prompt;
  for (int64_t r = 0; r < max_rows; ++r) {
    starts[r] = static_cast<int32_t>(ids.size());
    for (int j = 0; j < kHist; ++j) {
      ids.push_back(static_cast<int32_t>((r * 7919 + j * 3989) % vocab));
      counts.push_back(j % 2 == 0 ? 0 : 1 + j % 3);
      in_prompt.push_back(j % 2 == 0 ? 1 : 0);
    }
  }
  starts[max_rows] = static_cast<int32_t>(ids.size());
  int32_t* d_starts = device_alloc<int32_t>(starts.size());
  int32_t* d_ids = device_alloc<int32_t>(ids.size());
  int32_t* d_counts = device_alloc<int32_t>(counts.size());
  uint8_t* d_in_prompt = device_alloc<uint8_t>(in_prompt.size());
  CK(cudaMemcpy(d_starts, starts.data(), starts.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_counts, counts.data(), counts.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_in_prompt, in_prompt.data(), in_prompt.size(), cudaMemcpyHostToDevice));
  SamplingRow* d_params = device_alloc<SamplingRow>(max_rows);
  int32_t* d_tokens = device_alloc<int32_t>(max_rows);
  const size_t top = static_cast<size_t>(max_rows) * pmkv::kernels::kMaxSamplingLogprobs;
  float* d_lp = device_alloc<float>(max_rows);
  int32_t* d_top_ids = device_alloc<int32_t>(top);
  float* d_top_lp = device_alloc<float>(top);
  void* d_ws = device_alloc<uint8_t>(static_cast<size_t>(pmkv::kernels::sampling_workspace_bytes(
      static_cast<int32_t>(max_rows), vocab, static_cast<int32_t>(max_rows))));

  // Device-to-device copy bandwidth (read + write), the floor's unit.
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto time_ms = [&](auto&& body) {
    body();  // warm-up
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(e0));
    for (int it = 0; it < iters; ++it)
      body();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return static_cast<double>(ms) / iters;
  };

  std::printf("device %s, vocab %d, sigma %.1f, %d iterations\n", prop.name, vocab, sigma, iters);
  std::printf("%-18s %5s %10s %10s %10s\n", "mode", "rows", "us", "floor us", "x floor");
  std::string json = "{\"device\": \"" + std::string(prop.name) + "\", \"commit\": \"" +
                     (std::getenv("COMMIT") ? std::getenv("COMMIT") : "") +
                     "\", \"vocab\": " + std::to_string(vocab) +
                     ", \"sigma\": " + std::to_string(sigma) + ", \"points\": [";
  bool first = true;
  for (const int64_t rows : row_counts) {
    const size_t bytes = static_cast<size_t>(rows) * vocab * sizeof(float);
    const double copy_ms =
        time_ms([&] { CK(cudaMemcpyAsync(logits, pristine, bytes, cudaMemcpyDeviceToDevice)); });
    // The copy moves 2 x bytes; reading the logits once is half of it at copy bandwidth.
    const double floor_us = copy_ms * 1e3 / 2.0;
    for (const Mode& m : modes()) {
      if (!only.empty() && only.find("," + m.name + ",") == std::string::npos) continue;
      std::vector<SamplingRow> prm(rows);
      int32_t copies = 0;
      for (int64_t r = 0; r < rows; ++r) {
        SamplingRow& k = prm[r];
        k = {};
        k.temperature = m.temperature;
        k.top_k = m.top_k;
        k.top_p = m.top_p;
        k.min_p = m.min_p;
        k.repetition_penalty = m.penalties ? 1.3f : 1.0f;
        k.presence_penalty = m.penalties ? 0.4f : 0.0f;
        k.frequency_penalty = m.penalties ? 0.5f : 0.0f;
        k.logprobs = m.logprobs;
        k.logprob_slot = -1;
        if (m.logprobs >= 0 && pmkv::kernels::sampling_rewrites_row(k, true)) {
          k.logprob_slot = copies++;
        }
        k.seed = 1000 + static_cast<uint64_t>(r);
        k.offset = 7;
      }
      CK(cudaMemcpy(d_params, prm.data(), prm.size() * sizeof(SamplingRow),
                    cudaMemcpyHostToDevice));
      SamplingLaunch l;
      l.logits = logits;
      l.rows = static_cast<int32_t>(rows);
      l.vocab = vocab;
      l.params = d_params;
      l.hist_starts = d_starts;
      l.hist_ids = d_ids;
      l.hist_output_counts = d_counts;
      l.hist_in_prompt = d_in_prompt;
      l.out_tokens = d_tokens;
      if (m.logprobs >= 0) {
        l.out_logprob = d_lp;
        l.out_top_ids = d_top_ids;
        l.out_top_logprobs = d_top_lp;
        l.logprob_copies = copies;
      }
      l.workspace = d_ws;
      l.workspace_bytes = pmkv::kernels::sampling_workspace_bytes(l.rows, vocab, copies);
      const double total_ms = time_ms([&] {
        CK(cudaMemcpyAsync(logits, pristine, bytes, cudaMemcpyDeviceToDevice));
        CK(pmkv::kernels::launch_sampling(l, nullptr));
      });
      const double us = (total_ms - copy_ms) * 1e3;
      std::printf("%-18s %5lld %10.1f %10.1f %10.1f\n", m.name.c_str(),
                  static_cast<long long>(rows), us, floor_us, us / floor_us);
      json += std::string(first ? "" : ", ") + "{\"mode\": \"" + m.name +
              "\", \"rows\": " + std::to_string(rows) + ", \"us\": " + std::to_string(us) +
              ", \"read_floor_us\": " + std::to_string(floor_us) +
              ", \"times_floor\": " + std::to_string(us / floor_us) + "}";
      first = false;
    }
  }
  json += "]}\n";
  if (!out_path.empty()) {
    FILE* f = std::fopen(out_path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  return 0;
}
