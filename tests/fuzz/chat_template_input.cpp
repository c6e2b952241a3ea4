#include "tests/fuzz/chat_template_input.h"

#include <string>
#include <string_view>
#include <vector>

#include "engine/common/error.h"
#include "server/chat/chat_template.h"

namespace pmkv::fuzz {

TemplateOutcome run_chat_template_input(std::span<const uint8_t> input) {
  uint64_t pick = 0;
  if (input.size() > 8) {
    for (int i = 0; i < 8; ++i)
      pick = pick << 8 | input[i];
    input = input.subspan(8);
  }
  const std::string_view source(reinterpret_cast<const char*>(input.data()), input.size());
  // pick: bits 0-2 the message count (mod 5), bit 3 add_generation_prompt, then 4 bits a
  // message: role (2 bits), content (2 bits).
  static constexpr const char* kRoles[] = {"system", "user", "assistant", "tool"};
  static constexpr const char* kContents[] = {"Hi", "", "<think>a</think>b", "{{ x }}\n"};
  std::vector<chat::ChatMessage> messages;
  uint64_t p = pick >> 4;
  for (uint64_t n = (pick & 7) % 5; n > 0; --n, p >>= 4)
    messages.push_back({kRoles[p & 3], kContents[(p >> 2) & 3]});
  const bool add_generation_prompt = (pick >> 3 & 1) != 0;
  try {
    const chat::ChatTemplate t = chat::ChatTemplate::recognize(source, "<s>", "</s>");
    (void)t.render(messages, add_generation_prompt);
  } catch (const InvalidArgument&) {
    return TemplateOutcome::kRejected;
  }
  return TemplateOutcome::kRendered;
}

}  // namespace pmkv::fuzz
