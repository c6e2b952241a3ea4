#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <fstream>
#include <sstream>
#include <system_error>

#include <nlohmann/json.hpp>

#include "engine/common/error.h"
#include "engine/tokenizer/sp_model.h"

namespace pmkv {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kModelFile = "tokenizer.model";
constexpr const char* kTokenizerConfig = "tokenizer_config.json";
constexpr const char* kGenerationConfig = "generation_config.json";
constexpr const char* kModelConfig = "config.json";
constexpr const char* kChatTemplateFile = "chat_template.jinja";

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw LoadError("cannot open " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw LoadError("cannot read " + path.string());
  return ss.str();
}

// The JSON object in `path`, or nothing when the file does not exist.
std::optional<json> read_json_object(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return std::nullopt;
  const std::string text = read_text_file(path);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw LoadError("cannot parse " + path.string() + ": " + e.what());
  }
  if (!j.is_object()) throw LoadError(path.string() + ": the top level must be a JSON object");
  return j;
}

// j[key] when present and not null.
const json* find_value(const json& j, const char* key) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<bool> get_bool(const json& j, const char* key, const fs::path& file) {
  const json* v = find_value(j, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) throw LoadError(file.string() + ": " + key + " must be a boolean");
  return v->get<bool>();
}

// A special token given as "</s>" or as an AddedToken object {"content": "</s>", ...}.
std::optional<std::string> get_token_text(const json& j, const char* key, const fs::path& file) {
  const json* v = find_value(j, key);
  if (v == nullptr) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_object()) {
    const auto it = v->find("content");
    if (it != v->end() && it->is_string()) return it->get<std::string>();
  }
  throw LoadError(file.string() + ": " + key +
                  " must be a string or an object with a string \"content\"");
}

int32_t checked_id(const json& v, const char* key, const fs::path& file, int32_t vocab_size) {
  if (!v.is_number_integer()) {
    throw LoadError(file.string() + ": " + key + " must be an integer or a list of integers");
  }
  const auto id = v.get<int64_t>();
  if (id < 0 || id >= vocab_size) {
    throw LoadError(file.string() + ": " + key + " " + std::to_string(id) +
                    " is outside the vocabulary of " + kModelFile + " (" +
                    std::to_string(vocab_size) + " pieces)");
  }
  return static_cast<int32_t>(id);
}

// An id given as an integer or as a list of integers (eos_token_id of Llama 3 style configs).
std::vector<int32_t> get_ids(const json& j, const char* key, const fs::path& file,
                             int32_t vocab_size) {
  const json* v = find_value(j, key);
  if (v == nullptr) return {};
  std::vector<int32_t> ids;
  if (v->is_array()) {
    for (const auto& e : *v) {
      ids.push_back(checked_id(e, key, file, vocab_size));
    }
  } else {
    ids.push_back(checked_id(*v, key, file, vocab_size));
  }
  return ids;
}

std::optional<int32_t> get_id(const json& j, const char* key, const fs::path& file,
                              int32_t vocab_size) {
  const json* v = find_value(j, key);
  if (v == nullptr) return std::nullopt;
  return checked_id(*v, key, file, vocab_size);
}

std::optional<std::string> get_chat_template(const json& j, const fs::path& file) {
  const json* v = find_value(j, "chat_template");
  if (v == nullptr) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_array()) {
    // Named templates: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}].
    for (const auto& e : *v) {
      if (!e.is_object() || !e.contains("name") || !e.contains("template") ||
          !e["name"].is_string() || !e["template"].is_string()) {
        throw LoadError(file.string() +
                        ": chat_template entries must be objects with string \"name\" and "
                        "\"template\"");
      }
      if (e["name"] == "default") return e["template"].get<std::string>();
    }
    return std::nullopt;
  }
  throw LoadError(file.string() + ": chat_template must be a string or a list of named templates");
}

void append_unique(std::vector<int32_t>& out, std::span<const int32_t> ids) {
  for (int32_t id : ids) {
    if (std::find(out.begin(), out.end(), id) == out.end()) out.push_back(id);
  }
}

}  // namespace

struct Tokenizer::Impl {
  std::unique_ptr<detail::SpModel> sp;
  std::vector<int16_t> byte_value;  // per id: the byte of a <0xNN> piece, -1 otherwise
  // Special tokens recognised in text by encode_segments(), grouped by first byte, longest first.
  std::array<std::vector<std::pair<std::string, int32_t>>, 256> specials;
  bool has_specials = false;
  std::optional<int32_t> bos;
  std::vector<int32_t> eos;
  std::optional<int32_t> default_eos;
  bool add_bos = true;
  bool add_eos = false;
  std::optional<std::string> chat_template;
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

bool Tokenizer::available(const fs::path& model_dir) {
  std::error_code ec;
  return fs::is_regular_file(model_dir / kModelFile, ec);
}

Tokenizer Tokenizer::load(const fs::path& model_dir) {
  const fs::path model_file = model_dir / kModelFile;
  if (!available(model_dir)) {
    throw LoadError("no " + std::string(kModelFile) + " in " + model_dir.string() +
                    " (only sentencepiece tokenizers are supported)");
  }
  auto impl = std::make_unique<Impl>();
  impl->sp = std::make_unique<detail::SpModel>(model_file);
  const detail::SpModel& sp = *impl->sp;
  const int32_t n = sp.size();

  impl->byte_value.assign(static_cast<size_t>(n), -1);
  for (int32_t id = 0; id < n; ++id) {
    const bool control = sp.is_control(id);
    const bool unknown = sp.is_unknown(id);
    if (sp.is_byte(id)) {
      // sentencepiece spells byte pieces "<0xNN>".
      const std::string& p = sp.piece(id);
      unsigned value = 0;
      const bool well_formed =
          p.size() == 6 && p.starts_with("<0x") && p[5] == '>' &&
          std::from_chars(p.data() + 3, p.data() + 5, value, 16).ptr == p.data() + 5;
      if (!well_formed) {
        throw LoadError(model_file.string() + ": byte piece " + std::to_string(id) + " is \"" + p +
                        "\", expected <0xNN>");
      }
      impl->byte_value[static_cast<size_t>(id)] = static_cast<int16_t>(value);
    } else if ((control || unknown) && !sp.piece(id).empty()) {
      const std::string& p = sp.piece(id);
      impl->specials[static_cast<unsigned char>(p[0])].emplace_back(p, id);
      impl->has_specials = true;
    }
  }
  for (auto& group : impl->specials) {
    std::stable_sort(group.begin(), group.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  }

  const fs::path tok_file = model_dir / kTokenizerConfig;
  const fs::path gen_file = model_dir / kGenerationConfig;
  const fs::path cfg_file = model_dir / kModelConfig;
  const std::optional<json> tok = read_json_object(tok_file);
  const std::optional<json> gen = read_json_object(gen_file);
  const std::optional<json> cfg = read_json_object(cfg_file);

  // A special token named by tokenizer_config.json must be a piece of the vocabulary.
  auto tok_piece_id = [&](const char* key) -> std::optional<int32_t> {
    if (!tok) return std::nullopt;
    const std::optional<std::string> text = get_token_text(*tok, key, tok_file);
    if (!text) return std::nullopt;
    const std::optional<int32_t> id = sp.piece_to_id(*text);
    if (!id) {
      throw LoadError(tok_file.string() + ": " + key + " \"" + *text + "\" is not a piece of " +
                      model_file.string());
    }
    return id;
  };

  if (tok) {
    impl->add_bos = get_bool(*tok, "add_bos_token", tok_file).value_or(true);
    impl->add_eos = get_bool(*tok, "add_eos_token", tok_file).value_or(false);
    impl->chat_template = get_chat_template(*tok, tok_file);
  }
  if (!impl->chat_template) {
    std::error_code ec;
    const fs::path jinja = model_dir / kChatTemplateFile;
    if (fs::is_regular_file(jinja, ec)) impl->chat_template = read_text_file(jinja);
  }

  // BOS: the first source that names one (tokenizer_config.json's bos_token is looked up only
  // when the id files name none).
  if (gen) impl->bos = get_id(*gen, "bos_token_id", gen_file, n);
  if (!impl->bos && cfg) impl->bos = get_id(*cfg, "bos_token_id", cfg_file, n);
  if (!impl->bos) impl->bos = tok_piece_id("bos_token");
  if (!impl->bos) impl->bos = sp.bos_id();

  // EOS: every id any source names.
  const std::optional<int32_t> tok_eos = tok_piece_id("eos_token");
  if (gen) append_unique(impl->eos, get_ids(*gen, "eos_token_id", gen_file, n));
  if (cfg) append_unique(impl->eos, get_ids(*cfg, "eos_token_id", cfg_file, n));
  if (tok_eos) append_unique(impl->eos, std::span<const int32_t>(&*tok_eos, 1));
  if (impl->eos.empty() && sp.eos_id()) impl->eos.push_back(*sp.eos_id());

  impl->default_eos = tok_eos;
  if (!impl->default_eos) impl->default_eos = sp.eos_id();
  if (!impl->default_eos && !impl->eos.empty()) impl->default_eos = impl->eos.front();

  return Tokenizer(std::move(impl));
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= impl_->sp->size()) {
    throw InvalidArgument("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                          std::to_string(impl_->sp->size()) + ")");
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos && impl_->bos) ids.push_back(*impl_->bos);
  const std::vector<int32_t> body = impl_->sp->encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

std::vector<int32_t> Tokenizer::encode_segments(std::string_view text, bool parse_special) const {
  if (!parse_special || !impl_->has_specials) return impl_->sp->encode(text);
  std::vector<int32_t> ids;
  auto encode_plain = [&](std::string_view segment) {
    if (segment.empty()) return;
    const std::vector<int32_t> part = impl_->sp->encode(segment);
    ids.insert(ids.end(), part.begin(), part.end());
  };
  size_t segment_start = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    // The first byte of a special token is never a UTF-8 continuation byte, so a match starts on
    // a character boundary.
    const auto& group = impl_->specials[static_cast<unsigned char>(text[pos])];
    const auto match = std::find_if(group.begin(), group.end(), [&](const auto& special) {
      return text.substr(pos).starts_with(special.first);
    });
    if (match == group.end()) {
      ++pos;
      continue;
    }
    encode_plain(text.substr(segment_start, pos - segment_start));
    ids.push_back(match->second);
    pos += match->first.size();
    segment_start = pos;
  }
  encode_plain(text.substr(segment_start));
  return ids;
}

std::vector<int32_t> Tokenizer::encode_prompt(std::string_view text, bool parse_special) const {
  std::vector<int32_t> ids;
  if (impl_->add_bos && impl_->bos) ids.push_back(*impl_->bos);
  const std::vector<int32_t> body = encode_segments(text, parse_special);
  ids.insert(ids.end(), body.begin(), body.end());
  if (impl_->add_eos && impl_->default_eos) ids.push_back(*impl_->default_eos);
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  for (int32_t id : ids) {
    check_id(id);
  }
  return impl_->sp->decode(ids);
}

const std::string& Tokenizer::piece(int32_t id) const {
  check_id(id);
  return impl_->sp->piece(id);
}

std::optional<int32_t> Tokenizer::piece_to_id(std::string_view piece) const {
  return impl_->sp->piece_to_id(piece);
}

int32_t Tokenizer::vocab_size() const {
  return impl_->sp->size();
}
std::optional<int32_t> Tokenizer::bos_id() const {
  return impl_->bos;
}
const std::vector<int32_t>& Tokenizer::eos_ids() const {
  return impl_->eos;
}
std::optional<int32_t> Tokenizer::default_eos_id() const {
  return impl_->default_eos;
}
bool Tokenizer::add_bos_token() const {
  return impl_->add_bos;
}
bool Tokenizer::add_eos_token() const {
  return impl_->add_eos;
}

bool Tokenizer::is_byte_piece(int32_t id) const {
  check_id(id);
  return impl_->byte_value[static_cast<size_t>(id)] >= 0;
}

std::optional<uint8_t> Tokenizer::byte_value(int32_t id) const {
  check_id(id);
  const int16_t v = impl_->byte_value[static_cast<size_t>(id)];
  if (v < 0) return std::nullopt;
  return static_cast<uint8_t>(v);
}

bool Tokenizer::is_control(int32_t id) const {
  check_id(id);
  return impl_->sp->is_control(id);
}

std::optional<std::string> Tokenizer::chat_template() const {
  return impl_->chat_template;
}

}  // namespace pmkv
