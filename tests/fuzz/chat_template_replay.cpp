// Runs the chat template recognizer over every regular file in a directory (argv[1]), as the fuzz
// target does (chat_template_input.h). Any exception but InvalidArgument fails the run, a crash
// fails it by itself; `seed-valid-*` must render, `seed-bad-*` must be rejected. The ctest
// `chat_template_corpus_replay` runs it over tests/fuzz/corpus_chat_template.
#include <optional>
#include <span>
#include <string>

#include "tests/fuzz/chat_template_input.h"
#include "tests/fuzz/corpus_dir.h"

int main(int argc, char** argv) {
  return pmkv::fuzz::replay_corpus(
      argc, argv,
      [](std::span<const uint8_t> bytes,
         const std::filesystem::path&) -> std::optional<std::string> {
        if (pmkv::fuzz::run_chat_template_input(bytes) == pmkv::fuzz::TemplateOutcome::kRendered) {
          return std::nullopt;
        }
        return "rejected";
      });
}
