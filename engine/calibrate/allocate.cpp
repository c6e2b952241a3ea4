#include "engine/calibrate/allocate.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "engine/common/error.h"
#include "kernels/kv_page_layout.h"

namespace pmkv::calibrate {

int32_t Sensitivity::num_layers() const {
  return k.empty() ? 0 : static_cast<int32_t>(k.begin()->second.size());
}

Sensitivity parse_sensitivity_json(const std::string& text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // out_of_range too: a number beyond a double
    throw InvalidArgument(source + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw InvalidArgument(source + ": not a JSON object");
  Sensitivity s;
  auto fail = [&](const std::string& what) { throw InvalidArgument(source + ": " + what); };
  if (!j.contains("bits") || !j["bits"].is_array()) fail("needs a `bits` list");
  for (const auto& b : j["bits"]) {
    if (!b.is_number_integer()) fail("`bits` must hold integers");
    s.bits.push_back(b.get<int>());
  }
  int32_t layers = -1;
  for (const char* kind : {"k", "v"}) {
    if (!j.contains(kind) || !j[kind].is_object())
      fail(std::string("needs a `") + kind + "` object");
    auto& dst = kind[0] == 'k' ? s.k : s.v;
    for (int b : s.bits) {
      const std::string key = std::to_string(b);
      if (!j[kind].contains(key) || !j[kind][key].is_array()) {
        fail(std::string("`") + kind + "` has no list for bits " + key);
      }
      std::vector<double> per_layer;
      for (const auto& x : j[kind][key]) {
        if (!x.is_number()) fail(std::string("`") + kind + "." + key + "` must hold numbers");
        per_layer.push_back(x.get<double>());
      }
      if (layers < 0) layers = static_cast<int32_t>(per_layer.size());
      if (static_cast<int32_t>(per_layer.size()) != layers || layers == 0) {
        fail("every list must have one value per layer (" + std::to_string(layers) + ")");
      }
      dst[b] = std::move(per_layer);
    }
  }
  return s;
}

std::string sensitivity_to_json(const Sensitivity& s, const std::string& extra) {
  nlohmann::json j;
  j["bits"] = s.bits;
  for (const auto& [b, v] : s.k)
    j["k"][std::to_string(b)] = v;
  for (const auto& [b, v] : s.v)
    j["v"][std::to_string(b)] = v;
  if (!extra.empty()) j.update(nlohmann::json::parse(extra));
  return j.dump(2);
}

int64_t layer_cost_bytes(const AllocationProblem& p, int bits) {
  return int64_t{bits} * p.kv_width * 2 * p.max_len / 8;
}

namespace {

void check(const Sensitivity& s, const AllocationProblem& p) {
  if (p.kv_width <= 0 || p.max_len <= 0 || p.memory_bytes <= 0 || p.head_dim <= 0 ||
      p.kv_width % p.head_dim != 0) {
    throw InvalidArgument(
        "allocate: memory, kv width, head dim and max_len must be positive, and the kv width a "
        "multiple of the head dim");
  }
  if (p.choices.empty()) throw InvalidArgument("allocate: no bit-width choices");
  for (int b : p.choices) {
    if (b != 16 && b != 8 && b != 4 && b != 2) {
      throw InvalidArgument("allocate: bits must be 16, 8, 4 or 2 (got " + std::to_string(b) + ")");
    }
    if (!s.k.contains(b) || !s.v.contains(b)) {
      throw InvalidArgument("allocate: the sensitivity file has no values for " +
                            std::to_string(b) + " bits");
    }
  }
}

Allocation finish(const Sensitivity& s, const AllocationProblem& p, std::vector<int> bits) {
  Allocation a;
  a.bits = std::move(bits);
  for (size_t l = 0; l < a.bits.size(); ++l) {
    a.layer_bytes.push_back(layer_cost_bytes(p, a.bits[l]));
    a.total_bytes += a.layer_bytes.back();
    a.total_sensitivity += s.k.at(a.bits[l])[l] + s.v.at(a.bits[l])[l];
    // Scale + zero for K and V per (token, KV head): f32 pairs at 16 and 8 bits, bf16 pairs at 4
    // and 2 (kv_page_layout.h).
    a.params_bytes += 2 * kv::param_bytes(a.bits[l]) * (p.kv_width / p.head_dim) * p.max_len;
  }
  return a;
}

}  // namespace

Allocation allocate(const Sensitivity& s, const AllocationProblem& p) {
  check(s, p);
  const int32_t L = s.num_layers();
  // One unit = kv_width * max_len / 4 bytes = the cost of one bit per layer.
  const int64_t unit = p.kv_width * 2 * p.max_len / 8;
  const int64_t capacity = p.memory_bytes / unit;  // whole units (a cost is b units)
  const int min_bits = *std::min_element(p.choices.begin(), p.choices.end());
  if (capacity < int64_t{min_bits} * L) {
    throw InvalidArgument("allocate: " + std::to_string(p.memory_bytes) + " bytes cannot hold " +
                          std::to_string(L) + " layers even at " + std::to_string(min_bits) +
                          " bits (" + std::to_string(int64_t{min_bits} * L * unit) + " bytes)");
  }
  const int64_t cap = std::min<int64_t>(capacity, int64_t{16} * L);
  const double inf = std::numeric_limits<double>::infinity();
  // best[l][u]: least sensitivity of layers [0, l) using exactly u units; choice[l][u] remembers.
  std::vector<std::vector<double>> best(L + 1, std::vector<double>(cap + 1, inf));
  std::vector<std::vector<int>> choice(L + 1, std::vector<int>(cap + 1, -1));
  best[0][0] = 0;
  for (int32_t l = 0; l < L; ++l) {
    for (int64_t u = 0; u <= cap; ++u) {
      if (best[l][u] == inf) continue;
      for (size_t c = 0; c < p.choices.size(); ++c) {
        const int b = p.choices[c];
        if (u + b > cap) continue;
        const double v = best[l][u] + s.k.at(b)[l] + s.v.at(b)[l];
        if (v < best[l + 1][u + b]) {
          best[l + 1][u + b] = v;
          choice[l + 1][u + b] = static_cast<int>(c);
        }
      }
    }
  }
  int64_t u_best = -1;
  for (int64_t u = 0; u <= cap; ++u) {
    if (best[L][u] < inf && (u_best < 0 || best[L][u] < best[L][u_best])) u_best = u;
  }
  std::vector<int> bits(L);
  for (int32_t l = L, u = static_cast<int32_t>(u_best); l > 0; --l) {
    const int b = p.choices[choice[l][u]];
    bits[l - 1] = b;
    u -= b;
  }
  return finish(s, p, std::move(bits));
}

Allocation allocate_brute_force(const Sensitivity& s, const AllocationProblem& p) {
  check(s, p);
  const int32_t L = s.num_layers();
  std::vector<size_t> idx(L, 0);
  std::vector<int> best_bits;
  double best = std::numeric_limits<double>::infinity();
  for (;;) {
    std::vector<int> bits(L);
    int64_t bytes = 0;
    double sens = 0;
    for (int32_t l = 0; l < L; ++l) {
      bits[l] = p.choices[idx[l]];
      bytes += layer_cost_bytes(p, bits[l]);
      sens += s.k.at(bits[l])[l] + s.v.at(bits[l])[l];
    }
    if (bytes <= p.memory_bytes && sens < best) {
      best = sens;
      best_bits = bits;
    }
    int32_t l = L - 1;
    while (l >= 0 && ++idx[l] == p.choices.size())
      idx[l--] = 0;
    if (l < 0) break;
  }
  if (best_bits.empty()) throw InvalidArgument("allocate: no assignment fits the memory");
  return finish(s, p, std::move(best_bits));
}

std::string budgets_yaml(const Allocation& a, const AllocationProblem& p,
                         const std::string& comment) {
  std::ostringstream o;
  o << "# pmkv KV budgets: one entry per layer (written by pmkv calibrate allocate).\n";
  if (!comment.empty()) o << "# " << comment << "\n";
  o << "# bits: the layer's final bit-width at max_len tokens; the KV cache sizes each layer's\n"
       "# page budget as a cache whose body ends at `bits` at max_len. budget_bytes: PM-KVQ's\n"
       "# codes-only cost (bits * kv_width * 2 * max_len / 8), for reference.\n";
  o << "max_len: " << p.max_len << "\n";
  o << "kv_width: " << p.kv_width << "\n";
  o << "total_bytes: " << a.total_bytes << "\n";
  o << "layers:\n";
  for (size_t l = 0; l < a.bits.size(); ++l) {
    o << "  - {layer: " << l << ", bits: " << a.bits[l] << ", budget_bytes: " << a.layer_bytes[l]
      << "}\n";
  }
  return o.str();
}

}  // namespace pmkv::calibrate
