#pragma once
// Internal to pmkv_tokenizer: a thin wrapper of sentencepiece::SentencePieceProcessor with a plain
// C++ interface, so that only tokenizer_sp.cpp includes the sentencepiece header.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}  // namespace sentencepiece

namespace pmkv::detail {

class SpModel {
 public:
  // Throws LoadError naming `file` when it cannot be read or is not a sentencepiece model.
  explicit SpModel(const std::filesystem::path& file);
  ~SpModel();
  SpModel(const SpModel&) = delete;
  SpModel& operator=(const SpModel&) = delete;

  // Throws InvalidArgument when sentencepiece rejects the text.
  std::vector<int32_t> encode(std::string_view text) const;
  // Ids must be in [0, size()) (checked by the caller).
  std::string decode(std::span<const int32_t> ids) const;

  int32_t size() const;
  const std::string& piece(int32_t id) const;
  std::optional<int32_t> piece_to_id(std::string_view piece) const;  // exact match only
  bool is_byte(int32_t id) const;
  bool is_control(int32_t id) const;
  bool is_unknown(int32_t id) const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace pmkv::detail
