#pragma once
// Block-wise KV memory allocation (PM-KVQ): choose one final bit-width per layer minimizing the
// summed sensitivity (K + V) under a total memory budget for one sequence, where a layer at final
// bits b costs b * kv_width * 2 * max_len / 8 bytes (codes only, as in PM-KVQ). A multiple-choice
// knapsack, solved exactly by dynamic programming: costs are multiples of kv_width * max_len / 4
// bytes (b units for b bits), so the table has at most layers x (16 * layers) cells.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pmkv::calibrate {

// Per layer and per bit-width sensitivities, as `pmkv calibrate sensitivity` writes them
// (JSON {"bits": [...], "k": {"8": [per-layer], ...}, "v": {...}}).
struct Sensitivity {
  std::vector<int> bits;
  std::map<int, std::vector<double>> k;  // bits -> per layer
  std::map<int, std::vector<double>> v;
  int32_t num_layers() const;
};

Sensitivity parse_sensitivity_json(const std::string& json_text, const std::string& source);
std::string sensitivity_to_json(const Sensitivity& s, const std::string& extra_json_fields = "");

struct AllocationProblem {
  std::vector<int> choices;  // final bit-widths allowed, e.g. {4, 2}
  int64_t memory_bytes = 0;  // total for one sequence, all layers
  int64_t kv_width = 0;      // num_kv_heads * head_dim
  int64_t max_len = 0;
  int64_t head_dim = 128;  // only for the scale/zero overhead report
};

struct Allocation {
  std::vector<int> bits;             // per layer
  std::vector<int64_t> layer_bytes;  // per layer: b * kv_width * 2 * max_len / 8
  int64_t total_bytes = 0;
  double total_sensitivity = 0;
  // Scale/zero overhead PM-KVQ's count leaves out (pmkv stores a scale and zero per token and KV
  // head, for K and V: 16 bytes per (token, KV head) at 16 and 8 bits, 8 at 4 and 2), all layers,
  // at max_len tokens.
  int64_t params_bytes = 0;
};

int64_t layer_cost_bytes(const AllocationProblem& p, int bits);

// Exact optimum (ties: the lexicographically first bit vector in layer order, choices in the
// given order). Throws InvalidArgument when even the cheapest choice for every layer does not fit,
// or when inputs are inconsistent (a choice without sensitivities, non-positive sizes).
Allocation allocate(const Sensitivity& s, const AllocationProblem& p);
// Exhaustive search, for tests (layers^choices grows fast: small instances only).
Allocation allocate_brute_force(const Sensitivity& s, const AllocationProblem& p);

// The budgets file the KV cache reads (engine/kv/kv_config.h): YAML with max_len and one entry per
// layer {layer, bits, budget_bytes}; the runtime sizes each layer's page budget as a cache whose
// body ends at `bits` at max_len tokens (budget_bytes is PM-KVQ's codes-only cost, for reference).
std::string budgets_yaml(const Allocation& a, const AllocationProblem& p,
                         const std::string& comment);

}  // namespace pmkv::calibrate
