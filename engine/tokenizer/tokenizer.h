#pragma once
// The tokenizer of a Hugging Face model directory whose vocabulary is a sentencepiece model
// (tokenizer.model: Llama 1/2, Mistral, TinyLlama, ...), plus the special-token facts scattered
// over tokenizer_config.json, generation_config.json and config.json.
//
// Encoding is sentencepiece's own Encode (the dummy-prefix "▁" comes from the model's normalizer
// spec), which is what Hugging Face's slow LlamaTokenizer does in legacy mode. Decoding is
// sentencepiece's Decode: control pieces (<s>, </s>) decode to nothing, the leading "▁" of the
// first word of a decode is dropped, and runs of byte pieces (<0xE2><0x82><0xAC>) become UTF-8 with
// one U+FFFD per invalid byte.
//
// sentencepiece is an implementation detail (tokenizer_sp.cpp); this header does not include it.
// All const member functions may be called concurrently from several threads.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pmkv {

class Tokenizer {
 public:
  // Loads model_dir/tokenizer.model and, when present, model_dir/tokenizer_config.json,
  // generation_config.json and config.json (see README.md for the resolution rules).
  // Throws LoadError naming the file (and key) when tokenizer.model is missing or malformed, a JSON
  // file does not parse, a key has the wrong type, or a special token is not in the vocabulary.
  static Tokenizer load(const std::filesystem::path& model_dir);
  // True when model_dir/tokenizer.model exists (the directory has a tokenizer this class can load).
  static bool available(const std::filesystem::path& model_dir);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // sentencepiece's Encode of text, preceded by bos_id() when add_bos and a BOS token exists.
  // Text that spells a special token ("<s>") is encoded as plain characters.
  // Throws InvalidArgument when sentencepiece rejects the text.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;

  // What Hugging Face's `tokenizer(text)` gives for a slow (legacy) LlamaTokenizer: BOS when the
  // config's add_bos_token (default true), EOS when add_eos_token (default false), and, when
  // parse_special, every occurrence of a special token's text (the control and unknown pieces of
  // the model, e.g. "<s>", "</s>", "<unk>") becomes that token; the text between them is encoded
  // segment by segment with sentencepiece (each segment gets its own dummy prefix, as in legacy
  // mode).
  std::vector<int32_t> encode_prompt(std::string_view text, bool parse_special = true) const;

  // encode_prompt() without the config's BOS/EOS: Hugging Face's `tokenizer(text,
  // add_special_tokens=False)`. This is how a rendered chat template is tokenized (the template
  // writes "<s>" itself, as text).
  std::vector<int32_t> encode_segments(std::string_view text, bool parse_special) const;

  // sentencepiece's Decode. Throws InvalidArgument naming the id when an id is outside
  // [0, vocab_size()).
  std::string decode(std::span<const int32_t> ids) const;

  // The raw piece of id ("▁Hello", "<0x0A>", "</s>"). Throws InvalidArgument when out of range.
  const std::string& piece(int32_t id) const;
  // The id whose piece is exactly `piece`, if any.
  std::optional<int32_t> piece_to_id(std::string_view piece) const;
  int32_t vocab_size() const;

  // BOS: generation_config.json bos_token_id > config.json bos_token_id > tokenizer_config.json
  // bos_token looked up in the vocabulary > the sentencepiece model's <s>. Empty when none.
  std::optional<int32_t> bos_id() const;
  // EOS ids: the union (in this order, without duplicates) of generation_config.json eos_token_id,
  // config.json eos_token_id and tokenizer_config.json eos_token's id; the sentencepiece model's
  // </s> when all three are absent. Empty when none.
  const std::vector<int32_t>& eos_ids() const;
  // The token add_eos_token appends: tokenizer_config.json's eos_token, else the model's </s>, else
  // eos_ids().front().
  std::optional<int32_t> default_eos_id() const;
  bool add_bos_token() const;
  bool add_eos_token() const;

  // Byte-fallback pieces <0x00>..<0xFF>. Both throw InvalidArgument when id is out of range.
  bool is_byte_piece(int32_t id) const;
  std::optional<uint8_t> byte_value(int32_t id) const;
  // Control pieces (<s>, </s>): they decode to nothing.
  bool is_control(int32_t id) const;

  // tokenizer_config.json's chat_template (a string, or the entry named "default" of a list of
  // {name, template}), else the content of chat_template.jinja in the model directory.
  std::optional<std::string> chat_template() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  void check_id(int32_t id) const;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmkv
