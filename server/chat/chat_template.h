#pragma once
// Chat templates: a list of messages -> the prompt text a chat model was trained on.
//
// Not a Jinja engine: a model's tokenizer_config.json chat_template is *recognized* by markers it
// must contain, and rendered by C++ that writes exactly what Hugging Face's apply_chat_template
// (jinja2 with trim_blocks and lstrip_blocks) writes for plain system/user/assistant messages:
//  - Llama 2 chat ("[INST]", "[/INST]", "<<SYS>>"): the system message is folded into the first
//    user turn, contents are strip()ped, roles must alternate user/assistant, each user turn
//    starts with the BOS text and each assistant turn ends with the EOS text; there is no
//    generation prompt (the prompt ends with " [/INST]").
//  - ChatML ("<|im_start|>", "<|im_end|>": Qwen, Qwen2, Qwen2.5, generic): "<|im_start|>ROLE\n"
//    CONTENT "<|im_end|>\n" per message; a default system message when the template has one (a
//    literal '<|im_start|>system\n...<|im_end|>\n') and the first message is not a system one;
//    "<|im_start|>assistant\n" as the generation prompt.
//  - DeepSeek-R1 ("<｜User｜>", "<｜Assistant｜>"): BOS text, the last system message's content,
//    then "<｜User｜>" + content and "<｜Assistant｜>" + content + "<｜end▁of▁sentence｜>" with
//    past assistant turns cut to what follows their last "</think>"; the generation prompt is
//    "<｜Assistant｜>", plus "<think>\n" when the template's generation prompt has it.
// Anything else is rejected (InvalidArgument: "unsupported chat template").
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace pmkv::chat {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

enum class TemplateFamily { kLlama2, kChatML, kDeepSeekR1 };

std::string_view to_string(TemplateFamily family);

class ChatTemplate {
 public:
  // Recognizes `source` (the Jinja text). bos_text/eos_text are what the template's bos_token and
  // eos_token variables hold (the tokenizer's special token texts). Throws InvalidArgument naming
  // the supported families when the template is not one of them.
  static ChatTemplate recognize(std::string_view source, std::string bos_text,
                                std::string eos_text);

  // The prompt text. Throws InvalidArgument for what the real template rejects or cannot render
  // (empty message list, Llama 2 roles that do not alternate, a role other than system, user or
  // assistant).
  std::string render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  TemplateFamily family() const { return family_; }
  // ChatML: the template's default system message, if it has one.
  const std::optional<std::string>& default_system() const { return default_system_; }

 private:
  ChatTemplate(TemplateFamily family, std::string bos, std::string eos)
      : family_(family), bos_(std::move(bos)), eos_(std::move(eos)) {}
  std::string render_llama2(std::span<const ChatMessage> messages) const;
  std::string render_chatml(std::span<const ChatMessage> messages, bool add_gen) const;
  std::string render_deepseek_r1(std::span<const ChatMessage> messages, bool add_gen) const;

  TemplateFamily family_;
  std::string bos_;
  std::string eos_;
  std::optional<std::string> default_system_;  // ChatML
  bool think_prefix_ = false;                  // DeepSeek-R1: generation prompt opens <think>
};

// Python's str.strip() (Unicode whitespace) over UTF-8 text.
std::string strip_whitespace(std::string_view s);

}  // namespace pmkv::chat
