#pragma once
// Read-only access to the tensors of a Hugging Face model directory: `model.safetensors`, or the
// shards listed by `model.safetensors.index.json`. Files are memory-mapped; nothing is copied until
// a backend asks for a tensor in the type it computes in.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pmkv {

enum class DType { kF32, kF16, kBF16 };
const char* dtype_name(DType d);
size_t dtype_size(DType d);

// Exact widening of one stored 16-bit value to fp32 (what load_f32 does per element).
// bf16: bits << 16. f16: IEEE binary16, subnormals, infinities and NaN payloads preserved.
float bf16_to_f32(uint16_t bits);
float f16_to_f32(uint16_t bits);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::filesystem::path file;  // the shard that holds it
};

class WeightStore {
 public:
  // Opens `dir`/model.safetensors, or every shard named in `dir`/model.safetensors.index.json.
  // Validates every header fully (see safetensors.h). Throws LoadError naming the file (and the
  // tensor) on any problem.
  static WeightStore open(const std::filesystem::path& dir);
  // A store with no tensors (`--load-format dummy`: the backend makes random weights of the
  // config's shape). Every lookup throws LoadError naming `dir`.
  static WeightStore none(const std::filesystem::path& dir);
  bool empty() const;

  WeightStore(WeightStore&&) noexcept;
  WeightStore& operator=(WeightStore&&) noexcept;
  ~WeightStore();

  bool contains(std::string_view name) const;
  // Throws LoadError "missing tensor NAME in DIR" when absent.
  const TensorInfo& info(std::string_view name) const;
  std::vector<std::string> names() const;

  // The tensor converted to fp32 (bf16/fp16 widened exactly). Throws LoadError naming file and
  // tensor when the shape is not `expected_shape`.
  std::vector<float> load_f32(std::string_view name, std::span<const int64_t> expected_shape) const;
  // The stored bytes, for backends that upload the native dtype as is.
  std::span<const std::byte> raw(std::string_view name) const;

 private:
  struct Impl;
  explicit WeightStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmkv
