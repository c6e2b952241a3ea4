// The only translation unit that includes sentencepiece (its absl shim clashes with gRPC's abseil).
#include <sentencepiece_processor.h>

#include <string>
#include <vector>

#include "engine/common/error.h"
#include "engine/tokenizer/sp_model.h"

namespace pmkv::detail {

SpModel::SpModel(const std::filesystem::path& file)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const auto status = sp_->Load(file.string());
  if (!status.ok()) {
    throw LoadError("cannot load sentencepiece model " + file.string() + ": " + status.ToString());
  }
  if (sp_->GetPieceSize() <= 0) {
    throw LoadError("sentencepiece model " + file.string() + " has no pieces");
  }
}

SpModel::~SpModel() = default;

std::vector<int32_t> SpModel::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) {
    throw InvalidArgument("sentencepiece cannot encode the text: " + status.ToString());
  }
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string SpModel::decode(std::span<const int32_t> ids) const {
  const std::vector<int> v(ids.begin(), ids.end());
  std::string text;
  const auto status = sp_->Decode(v, &text);
  if (!status.ok()) {
    throw InvalidArgument("sentencepiece cannot decode the ids: " + status.ToString());
  }
  return text;
}

int32_t SpModel::size() const {
  return sp_->GetPieceSize();
}

const std::string& SpModel::piece(int32_t id) const {
  return sp_->IdToPiece(id);
}

std::optional<int32_t> SpModel::piece_to_id(std::string_view piece) const {
  // PieceToId answers the unknown id for pieces not in the vocabulary: confirm the match.
  const int id = sp_->PieceToId(piece);
  if (id < 0 || id >= sp_->GetPieceSize() || sp_->IdToPiece(id) != piece) return std::nullopt;
  return id;
}

bool SpModel::is_byte(int32_t id) const {
  return sp_->IsByte(id);
}
bool SpModel::is_control(int32_t id) const {
  return sp_->IsControl(id);
}
bool SpModel::is_unknown(int32_t id) const {
  return sp_->IsUnknown(id);
}

std::optional<int32_t> SpModel::bos_id() const {
  const int id = sp_->bos_id();
  if (id < 0) return std::nullopt;
  return id;
}

std::optional<int32_t> SpModel::eos_id() const {
  const int id = sp_->eos_id();
  if (id < 0) return std::nullopt;
  return id;
}

}  // namespace pmkv::detail
