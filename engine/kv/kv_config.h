#pragma once
// Configuration of the mixed-precision KV cache (the `kv_cache` section of the YAML config, or a
// file given alone with --kv-config). Every key is documented in config/default.yaml.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "kernels/kv_page_layout.h"

namespace pmkv::kv {

enum class DemotionPolicy {
  kBlock,        // PM-KVQ: the whole body of a (sequence, layer) drops a step when over budget
  kOldestFirst,  // only the oldest body pages, as few as needed
};
enum class FloorAction {
  kFinish,  // at the floor and still over budget: finish the sequence ("length") and log it
};

std::string to_string(DemotionPolicy p);

struct KvCacheConfig {
  // Page size. 0 = automatic: a 16-bit page holds 16 tokens of all KV heads.
  int64_t page_bytes = 0;
  int32_t init_bits = 16;  // bits a body page enters at (block: until demoted)
  std::vector<int32_t> bit_ladder = {16, 8, 4, 2};
  int32_t floor_bits = 2;       // lowest bits a page may reach (on the ladder)
  int32_t sink_tokens = 1;      // first tokens, 16-bit forever
  int32_t window_tokens = 128;  // newest tokens at 16 bits, flushed in chunks of this
  DemotionPolicy policy = DemotionPolicy::kBlock;
  FloorAction floor_action = FloorAction::kFinish;
  // The prompt stays at 16 bits until its last chunk is computed, then is flushed and demoted
  // at once (KvCacheManager::append's prompt_len): the prompt attends to itself at full
  // precision, as PM-KVQ's single-pass prefill, whatever the scheduler's chunking.
  bool hold_prompt = true;
  // Budget per (sequence, layer) in bytes of pages; empty = no budget. Either uniform
  // (per_layer_bytes, or uniform_bits + max_len: the pages a uniform cache of that many bits
  // would hold at max_len tokens) or read from a budgets file (one entry per layer).
  std::optional<int64_t> per_layer_bytes;
  std::optional<int32_t> uniform_bits;
  std::optional<int64_t> uniform_max_len;
  std::optional<std::filesystem::path> budget_file;
  // Key reparameterization scales (pmkv calibrate rep-scales), folded into q_proj/k_proj at load.
  std::optional<std::filesystem::path> key_scales;

  // Checks values and their consistency (InvalidArgument naming the key on failure).
  void validate() const;
};

// Parses a YAML document: the `kv_cache` mapping, or the document itself when it has no such key.
// Unknown keys and bad values throw InvalidArgument naming the key (with the `kv_cache.` prefix).
KvCacheConfig parse_kv_config_yaml(const std::string& yaml_text, const std::string& source_name);
KvCacheConfig load_kv_config(const std::filesystem::path& file);

// Tokens of a 16-bit page when `page_bytes` is auto (0). 32, not 16: decode attention at 16 bits,
// batch 16 x 4K, runs 5% faster (76.0 -> 71.7-72.4 us on the H200; bench/RESULTS.md, tenth
// session), a warp streaming two tiles a page where it streamed one.
inline constexpr int32_t kDefaultTokens16 = 32;

// Page geometry for a model: `page_bytes` 0 (auto) gives kDefaultTokens16 tokens at 16 bits, or
// 16 where window_tokens is not a multiple of kDefaultTokens16; otherwise the largest tokens16
// whose page fits (InvalidArgument if not even one token fits).
PageGeometry resolve_geometry(const KvCacheConfig& c, int32_t num_kv_heads, int32_t head_dim);

// The per-layer byte budgets for a model of `num_layers` layers with `geometry` (empty when
// the config has no budget). Budgets file: YAML `layers: [{layer: i, bits: b, budget_bytes: n}]`,
// one entry per layer (bits informational); errors name the file and entry.
std::vector<int64_t> resolve_layer_budgets(const KvCacheConfig& c, int32_t num_layers,
                                           const PageGeometry& geometry);

// Pages one (sequence, layer) holds for `tokens` tokens when its body is entirely at `bits`
// (sink and window pages at 16 bits).
int64_t pages_for_uniform(const KvCacheConfig& c, const PageGeometry& g, int64_t tokens, int bits);

}  // namespace pmkv::kv
