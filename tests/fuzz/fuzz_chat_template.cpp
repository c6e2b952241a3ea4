// libFuzzer target: chat template recognition and rendering over arbitrary template text (a model
// directory's tokenizer_config.json is outside our control). InvalidArgument ("unsupported chat
// template", or messages the template rejects) is the expected answer; any other exception, a
// crash or a sanitizer report is a finding. The input's first 8 bytes (when present) also pick the
// messages rendered, so recognized templates render varied conversations.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tests/fuzz/chat_template_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)pmkv::fuzz::run_chat_template_input(std::span<const uint8_t>(data, size));
  return 0;
}
