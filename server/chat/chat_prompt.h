#pragma once
// ChatPrompt: a model's chat template, resolved once at server start, turning messages into prompt
// token ids. A model without a tokenizer, without a chat template or with an unsupported one still
// serves completions; its chat requests get InvalidArgument with the reason.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "server/chat/chat_template.h"

namespace pmkv::chat {

class ChatPrompt {
 public:
  // `tokenizer` may be null (then every chat request is rejected). Never throws.
  explicit ChatPrompt(const Tokenizer* tokenizer);

  // Renders the messages with the model's template and tokenizes the text the way Hugging Face
  // tokenizes a rendered template (special-token text such as "<s>" becomes its id, no BOS/EOS
  // added). Throws InvalidArgument when the model cannot do chat or the messages are rejected.
  std::vector<int32_t> encode(std::span<const ChatMessage> messages,
                              bool add_generation_prompt) const;
  // The rendered text (same errors as encode()).
  std::string render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  bool available() const { return template_.has_value(); }
  // Why chat is unavailable (empty when available()).
  const std::string& unavailable_reason() const { return reason_; }
  const std::optional<ChatTemplate>& chat_template() const { return template_; }

 private:
  const Tokenizer* tokenizer_;
  std::optional<ChatTemplate> template_;
  std::string reason_;
};

}  // namespace pmkv::chat
