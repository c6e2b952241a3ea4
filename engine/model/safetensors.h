#pragma once
// The safetensors file format: an 8-byte little-endian header length N, N bytes of JSON header
// ({name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}), then the data buffer.
//
// `parse_safetensors` is a pure function over the file's bytes (what the fuzzer drives); it
// validates the header completely and never reads outside the span. `SafetensorsFile` mmaps a
// file read-only and parses it. Every failure is a LoadError naming the file (and the tensor).
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model/weight_store.h"  // DType

namespace pmkv {

// Largest header accepted (the same limit as the reference Rust implementation).
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct SafetensorsTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte range [begin, end) relative to the start of the data buffer
  uint64_t end = 0;

  uint64_t num_bytes() const { return end - begin; }
};

struct SafetensorsHeader {
  uint64_t data_start = 0;                      // absolute file offset of the data buffer (8 + N)
  std::vector<SafetensorsTensor> tensors;       // sorted by name, names unique
  std::map<std::string, std::string> metadata;  // "__metadata__", empty when absent
};

// Parses and validates the whole file image `file`. `file_name` is used in messages only.
// On success every tensor's byte range lies inside the data buffer, has exactly
// numel * dtype_size bytes and overlaps no other tensor's range.
SafetensorsHeader parse_safetensors(std::span<const std::byte> file, const std::string& file_name);

// Parses a dtype string of the header ("BF16", "F16", "F32"); false for anything else.
bool parse_safetensors_dtype(std::string_view s, DType* out);

// A read-only memory-mapped safetensors file. Move-only.
class SafetensorsFile {
 public:
  // Maps and parses `path`. Throws LoadError naming the path on any problem.
  static SafetensorsFile open(const std::filesystem::path& path);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::filesystem::path& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<SafetensorsTensor>& tensors() const { return header_.tensors; }
  // nullptr when the file has no tensor of that name.
  const SafetensorsTensor* find(std::string_view name) const;
  // The stored bytes of `t`, which must be one of this file's tensors.
  std::span<const std::byte> data(const SafetensorsTensor& t) const;
  std::span<const std::byte> bytes() const { return {static_cast<const std::byte*>(map_), size_}; }

 private:
  SafetensorsFile() = default;
  void release() noexcept;

  std::filesystem::path path_;
  void* map_ = nullptr;  // nullptr for an empty mapping
  size_t size_ = 0;
  SafetensorsHeader header_;
};

}  // namespace pmkv
