#include "server/chat/chat_prompt.h"

#include "engine/common/error.h"

namespace pmkv::chat {
namespace {

std::string special_text(const Tokenizer& tok, std::optional<int32_t> id) {
  return id ? tok.piece(*id) : std::string();
}

}  // namespace

ChatPrompt::ChatPrompt(const Tokenizer* tokenizer) : tokenizer_(tokenizer) {
  if (tokenizer_ == nullptr) {
    reason_ = "the model has no tokenizer (tokenizer.model), so it cannot serve chat requests";
    return;
  }
  const std::optional<std::string> source = tokenizer_->chat_template();
  if (!source) {
    reason_ =
        "the model has no chat template (tokenizer_config.json chat_template or "
        "chat_template.jinja); use /v1/completions with a prompt instead";
    return;
  }
  try {
    template_ = ChatTemplate::recognize(*source, special_text(*tokenizer_, tokenizer_->bos_id()),
                                        special_text(*tokenizer_, tokenizer_->default_eos_id()));
  } catch (const InvalidArgument& e) {
    reason_ = e.what();
  }
}

std::string ChatPrompt::render(std::span<const ChatMessage> messages,
                               bool add_generation_prompt) const {
  if (!template_) throw InvalidArgument(reason_);
  return template_->render(messages, add_generation_prompt);
}

std::vector<int32_t> ChatPrompt::encode(std::span<const ChatMessage> messages,
                                        bool add_generation_prompt) const {
  const std::string text = render(messages, add_generation_prompt);
  return tokenizer_->encode_segments(text, /*parse_special=*/true);
}

}  // namespace pmkv::chat
