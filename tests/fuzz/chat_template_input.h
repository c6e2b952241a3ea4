#pragma once
// One input for the chat template recognizer (server/chat/chat_template.h), shared by the
// libFuzzer target and the corpus replay: bytes 0-7 (when the input is longer than 8 bytes) pick
// the conversation rendered, the rest is the template's Jinja text. Recognized or rejected with
// InvalidArgument; rendering the picked messages renders or rejects them with InvalidArgument.
// Anything else is a finding.
#include <cstdint>
#include <span>

namespace pmkv::fuzz {

enum class TemplateOutcome { kRendered, kRejected };

TemplateOutcome run_chat_template_input(std::span<const uint8_t> input);

}  // namespace pmkv::fuzz
