#include "server/chat/chat_template.h"

#include <cstdint>

#include "engine/common/error.h"

namespace pmkv::chat {
namespace {

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";
constexpr std::string_view kDsUser = "<｜User｜>";
constexpr std::string_view kDsAssistant = "<｜Assistant｜>";
constexpr std::string_view kDsEnd = "<｜end▁of▁sentence｜>";
constexpr std::string_view kThinkEnd = "</think>";

bool contains(std::string_view s, std::string_view what) {
  return s.find(what) != std::string_view::npos;
}

// The body of a Jinja string literal with its escapes resolved (\n, \t, \\, \', \").
std::string unescape_literal(std::string_view body) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 == body.size()) {
      out += body[i];
      continue;
    }
    const char c = body[++i];
    out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
  }
  return out;
}

// The string literal of `source` that contains position `pos`, unescaped; nullopt when `pos` is
// not inside a quoted literal.
std::optional<std::string> literal_around(std::string_view source, size_t pos) {
  const size_t open = source.find_last_of("'\"", pos);
  if (open == std::string_view::npos) return std::nullopt;
  const char quote = source[open];
  for (size_t i = open + 1; i < source.size(); ++i) {
    if (source[i] == '\\') {
      ++i;
    } else if (source[i] == quote) {
      if (i < pos) return std::nullopt;
      return unescape_literal(source.substr(open + 1, i - open - 1));
    }
  }
  return std::nullopt;
}

// ChatML: a literal '<|im_start|>system\nTEXT<|im_end|>\n' is the default system message.
std::optional<std::string> chatml_default_system(std::string_view source) {
  const std::string head = std::string(kImStart) + "system\n";
  const std::string tail = std::string(kImEnd) + "\n";
  for (size_t pos = source.find(kImStart); pos != std::string_view::npos;
       pos = source.find(kImStart, pos + 1)) {
    const auto lit = literal_around(source, pos);
    if (!lit || lit->size() < head.size() + tail.size()) continue;
    if (lit->compare(0, head.size(), head) != 0) continue;
    if (lit->compare(lit->size() - tail.size(), tail.size(), tail) != 0) continue;
    return lit->substr(head.size(), lit->size() - head.size() - tail.size());
  }
  return std::nullopt;
}

// Decodes one UTF-8 code point at s[i] (well-formedness is the JSON parser's job; bad bytes count
// as one non-space byte). Sets `len`.
uint32_t decode_at(std::string_view s, size_t i, size_t& len) {
  const auto c = static_cast<unsigned char>(s[i]);
  len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (len == 1 || i + len > s.size()) {
    len = 1;
    return c;
  }
  uint32_t cp = c & (0x7Fu >> len);
  for (size_t k = 1; k < len; ++k)
    cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3Fu);
  return cp;
}

// Python's str.isspace().
bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

void check_roles(std::span<const ChatMessage> messages) {
  if (messages.empty()) throw InvalidArgument("messages must not be empty");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") {
      throw InvalidArgument("messages[" + std::to_string(i) + "].role '" + r +
                            "' is not supported (use system, user or assistant)");
    }
  }
}

}  // namespace

std::string_view to_string(TemplateFamily family) {
  switch (family) {
    case TemplateFamily::kLlama2:
      return "llama2";
    case TemplateFamily::kChatML:
      return "chatml";
    case TemplateFamily::kDeepSeekR1:
      return "deepseek-r1";
  }
  return "unknown";
}

std::string strip_whitespace(std::string_view s) {
  size_t begin = 0;
  size_t end = 0;  // one past the last non-space code point
  bool seen = false;
  for (size_t i = 0, len = 0; i < s.size(); i += len) {
    const bool space = is_space(decode_at(s, i, len));
    if (space) continue;
    if (!seen) begin = i;
    seen = true;
    end = i + len;
  }
  return seen ? std::string(s.substr(begin, end - begin)) : std::string();
}

ChatTemplate ChatTemplate::recognize(std::string_view source, std::string bos_text,
                                     std::string eos_text) {
  if (contains(source, kDsUser) && contains(source, kDsAssistant)) {
    ChatTemplate t(TemplateFamily::kDeepSeekR1, std::move(bos_text), std::move(eos_text));
    t.think_prefix_ = contains(source, std::string(kDsAssistant) + "<think>");
    return t;
  }
  if (contains(source, "[INST]") && contains(source, "[/INST]") && contains(source, "<<SYS>>")) {
    return ChatTemplate(TemplateFamily::kLlama2, std::move(bos_text), std::move(eos_text));
  }
  if (contains(source, kImStart) && contains(source, kImEnd)) {
    ChatTemplate t(TemplateFamily::kChatML, std::move(bos_text), std::move(eos_text));
    t.default_system_ = chatml_default_system(source);
    return t;
  }
  throw InvalidArgument(
      "unsupported chat template: the model's chat_template is not one of the formats pmkv "
      "renders (Llama 2 [INST]/<<SYS>>, ChatML <|im_start|>/<|im_end|>, DeepSeek-R1 "
      "<｜User｜>/<｜Assistant｜>)");
}

std::string ChatTemplate::render(std::span<const ChatMessage> messages,
                                 bool add_generation_prompt) const {
  check_roles(messages);
  switch (family_) {
    case TemplateFamily::kLlama2:
      return render_llama2(messages);
    case TemplateFamily::kChatML:
      return render_chatml(messages, add_generation_prompt);
    case TemplateFamily::kDeepSeekR1:
      return render_deepseek_r1(messages, add_generation_prompt);
  }
  return {};
}

std::string ChatTemplate::render_llama2(std::span<const ChatMessage> messages) const {
  std::optional<std::string_view> system;
  if (messages.front().role == "system") {
    system = messages.front().content;
    messages = messages.subspan(1);
  }
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if ((m.role == "user") != (i % 2 == 0)) {
      throw InvalidArgument(
          "Conversation roles must alternate user/assistant/user/assistant/... (after an "
          "optional first system message), as the model's chat template requires");
    }
    std::string content = m.content;
    if (i == 0 && system) {
      content = "<<SYS>>\n" + std::string(*system) + "\n<</SYS>>\n\n" + m.content;
    }
    if (m.role == "user") {
      out += bos_ + "[INST] " + strip_whitespace(content) + " [/INST]";
    } else if (m.role == "assistant") {
      out += " " + strip_whitespace(content) + " " + eos_;
    }
  }
  return out;
}

std::string ChatTemplate::render_chatml(std::span<const ChatMessage> messages, bool add_gen) const {
  std::string out;
  if (default_system_ && messages.front().role != "system") {
    out += std::string(kImStart) + "system\n" + *default_system_ + std::string(kImEnd) + "\n";
  }
  for (const ChatMessage& m : messages) {
    out += std::string(kImStart) + m.role + "\n" + m.content + std::string(kImEnd) + "\n";
  }
  if (add_gen) out += std::string(kImStart) + "assistant\n";
  return out;
}

std::string ChatTemplate::render_deepseek_r1(std::span<const ChatMessage> messages,
                                             bool add_gen) const {
  std::string system;
  for (const ChatMessage& m : messages) {
    if (m.role == "system") system = m.content;
  }
  std::string out = bos_ + system;
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      out += std::string(kDsUser) + m.content;
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      if (const size_t cut = content.rfind(kThinkEnd); cut != std::string_view::npos) {
        content = content.substr(cut + kThinkEnd.size());
      }
      out += std::string(kDsAssistant) + std::string(content) + std::string(kDsEnd);
    }
  }
  if (add_gen) out += std::string(kDsAssistant) + (think_prefix_ ? "<think>\n" : "");
  return out;
}

}  // namespace pmkv::chat
