#pragma once
// The architecture of a decoder-only transformer, read from a Hugging Face config.json.
// Supported model_type: llama, mistral, qwen2. Everything the CPU and CUDA backends need to build
// the forward pass is here; nothing here knows about files once parsed.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace pmkv {

enum class RopeType { kDefault, kLinear, kLlama3 };

struct RopeConfig {
  RopeType type = RopeType::kDefault;
  double theta = 10000.0;
  double factor = 1.0;                        // linear and llama3
  double low_freq_factor = 1.0;               // llama3
  double high_freq_factor = 4.0;              // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
  double partial_rotary_factor = 1.0;         // only 1.0 supported; kept to reject others clearly
};

struct ModelConfig {
  std::string model_type;  // "llama" | "mistral" | "qwen2"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // config's head_dim, or hidden_size / num_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // bias on q_proj, k_proj, v_proj (qwen2 always; llama attention_bias)
  bool o_bias = false;    // bias on o_proj (llama attention_bias)
  bool mlp_bias = false;  // bias on gate/up/down (llama mlp_bias)
  std::optional<int64_t> sliding_window;  // mistral / qwen2 use_sliding_window: keys with
                                          // q_pos - k_pos < sliding_window are visible
  std::string torch_dtype;                // informational ("bfloat16", ...)
  std::optional<int32_t> bos_token_id;    // from config.json
  std::vector<int32_t> eos_token_ids;     // from config.json (int or list)

  int64_t q_width() const { return num_heads * head_dim; }
  int64_t kv_width() const { return num_kv_heads * head_dim; }
  int64_t group_size() const { return num_heads / num_kv_heads; }
};

// Parses and validates config.json. Throws LoadError naming the file and key on anything
// missing, of the wrong type, inconsistent (heads not dividing, head_dim odd, ...) or unsupported.
ModelConfig parse_model_config(const std::filesystem::path& config_json);
ModelConfig parse_model_config_text(const std::string& json_text, const std::string& source_name);

// RoPE inverse frequencies (head_dim / 2 values) after the configured scaling, computed exactly as
// Hugging Face transformers' ROPE_INIT_FUNCTIONS do (in double, returned as float).
std::vector<float> rope_inv_freq(const ModelConfig& cfg);

}  // namespace pmkv
