#include "engine/model/weight_store.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/common/error.h"
#include "engine/model/safetensors.h"

namespace pmkv {

namespace {

using json = nlohmann::json;

// safetensors stores little-endian data; load_f32 and raw() hand it out as is.
static_assert(std::endian::native == std::endian::little, "pmkv needs a little-endian host");

std::string shape_str(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// A shard name from the index must name a file directly inside the model directory.
bool is_plain_file_name(const std::string& s) {
  if (s.empty() || s == "." || s == "..") return false;
  if (s.find("..") != std::string::npos) return false;
  return s.find_first_of(std::string_view("/\\\0", 3)) == std::string::npos;
}

}  // namespace

float bf16_to_f32(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in float
    float v = std::ldexp(static_cast<float>(mant), -24);
    return std::bit_cast<float>(std::bit_cast<uint32_t>(v) | sign);
  }
  if (exp == 31) {
    // inf (mant == 0) or nan (payload kept)
    return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  }
  return std::bit_cast<float>(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

struct WeightStore::Impl {
  std::filesystem::path dir;
  std::vector<SafetensorsFile> files;
  struct Entry {
    TensorInfo info;
    const SafetensorsFile* file;
    const SafetensorsTensor* tensor;
  };
  std::map<std::string, Entry, std::less<>> tensors;

  const Entry& get(std::string_view name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      throw LoadError("missing tensor " + std::string(name) + " in " + dir.string());
    }
    return it->second;
  }

  // Registers every tensor of every file; call once all files are opened (pointers are stable
  // from then on).
  void index_tensors() {
    for (const SafetensorsFile& f : files) {
      for (const SafetensorsTensor& t : f.tensors()) {
        auto [it, inserted] = tensors.try_emplace(
            t.name, Entry{TensorInfo{t.name, t.dtype, t.shape, f.path()}, &f, &t});
        if (!inserted) {
          throw LoadError("tensor " + t.name + " is present in two shards: " +
                          it->second.info.file.string() + " and " + f.path().string());
        }
      }
    }
  }
};

WeightStore::WeightStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WeightStore::WeightStore(WeightStore&&) noexcept = default;
WeightStore& WeightStore::operator=(WeightStore&&) noexcept = default;
WeightStore::~WeightStore() = default;

WeightStore WeightStore::none(const std::filesystem::path& dir) {
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  return WeightStore(std::move(impl));
}

bool WeightStore::empty() const {
  return impl_->tensors.empty();
}

WeightStore WeightStore::open(const std::filesystem::path& dir) {
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    throw LoadError("model directory " + dir.string() + " does not exist or is not a directory");
  }
  const auto index_path = dir / "model.safetensors.index.json";
  const auto single_path = dir / "model.safetensors";

  if (std::filesystem::exists(index_path, ec)) {
    const std::string index_name = index_path.string();
    std::ifstream in(index_path, std::ios::binary);
    if (!in) throw LoadError("cannot read " + index_name);
    std::stringstream ss;
    ss << in.rdbuf();
    json index;
    try {
      index = json::parse(ss.str());
    } catch (const json::exception& e) {
      throw LoadError("malformed JSON in " + index_name + ": " + e.what());
    }
    if (!index.is_object()) throw LoadError(index_name + " is not a JSON object");
    auto wm = index.find("weight_map");
    if (wm == index.end()) throw LoadError("missing key weight_map in " + index_name);
    if (!wm->is_object()) throw LoadError("key weight_map in " + index_name + " is not an object");
    if (wm->empty()) throw LoadError("key weight_map in " + index_name + " is empty");

    // tensor -> shard name, and each shard opened once in first-seen order.
    std::map<std::string, size_t> shard_index;
    std::vector<std::pair<std::string, std::string>> listed;
    for (const auto& [tensor, shard] : wm->items()) {
      if (!shard.is_string()) {
        throw LoadError("weight_map entry for tensor " + tensor + " in " + index_name +
                        " is not a string");
      }
      const std::string& s = shard.get_ref<const std::string&>();
      if (!is_plain_file_name(s)) {
        throw LoadError("weight_map entry for tensor " + tensor + " in " + index_name +
                        " names shard '" + s + "', which is not a plain file name in " +
                        dir.string());
      }
      listed.emplace_back(tensor, s);
      if (!shard_index.count(s)) shard_index.emplace(s, shard_index.size());
    }
    std::vector<std::string> order(shard_index.size());
    for (const auto& [s, i] : shard_index)
      order[i] = s;
    impl->files.reserve(order.size());
    for (const auto& s : order)
      impl->files.push_back(SafetensorsFile::open(dir / s));
    for (const auto& [tensor, s] : listed) {
      const SafetensorsFile& f = impl->files[shard_index.at(s)];
      if (f.find(tensor) == nullptr) {
        throw LoadError("tensor " + tensor + " listed in " + index_name + " is not in its shard " +
                        f.path().string());
      }
    }
  } else if (std::filesystem::exists(single_path, ec)) {
    impl->files.push_back(SafetensorsFile::open(single_path));
  } else {
    throw LoadError("no model.safetensors or model.safetensors.index.json in " + dir.string());
  }
  impl->index_tensors();
  spdlog::debug("weights: {} tensors from {} file(s) in {}", impl->tensors.size(),
                impl->files.size(), dir.string());
  return WeightStore(std::move(impl));
}

bool WeightStore::contains(std::string_view name) const {
  return impl_->tensors.find(name) != impl_->tensors.end();
}

const TensorInfo& WeightStore::info(std::string_view name) const {
  return impl_->get(name).info;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->tensors.size());
  for (const auto& [name, e] : impl_->tensors)
    out.push_back(name);
  return out;
}

std::span<const std::byte> WeightStore::raw(std::string_view name) const {
  const auto& e = impl_->get(name);
  return e.file->data(*e.tensor);
}

std::vector<float> WeightStore::load_f32(std::string_view name,
                                         std::span<const int64_t> expected_shape) const {
  const auto& e = impl_->get(name);
  const auto& shape = e.info.shape;
  if (!std::equal(shape.begin(), shape.end(), expected_shape.begin(), expected_shape.end())) {
    throw LoadError("tensor " + std::string(name) + " in " + e.info.file.string() + " has shape " +
                    shape_str(shape) + ", expected " + shape_str(expected_shape));
  }
  const std::span<const std::byte> bytes = e.file->data(*e.tensor);
  const size_t n = bytes.size() / dtype_size(e.info.dtype);
  std::vector<float> out(n);
  switch (e.info.dtype) {
    case DType::kF32:
      if (n) std::memcpy(out.data(), bytes.data(), n * sizeof(float));
      break;
    case DType::kBF16:
    case DType::kF16: {
      const bool bf16 = e.info.dtype == DType::kBF16;
      for (size_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, bytes.data() + 2 * i, 2);  // little-endian host, unaligned-safe
        out[i] = bf16 ? bf16_to_f32(bits) : f16_to_f32(bits);
      }
      break;
    }
  }
  return out;
}

}  // namespace pmkv
