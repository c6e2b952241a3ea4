// Runs the OpenAI request parser over every regular file in a directory (argv[1]), as the fuzz
// target does (openai_request_input.h): each must be accepted or rejected with the expected
// exceptions; any other exception fails the run, a crash fails it by itself. Hand-written seeds
// are checked against their names: `seed-valid-*` must be accepted, `seed-bad-*` rejected. The
// ctest `openai_request_corpus_replay` runs it over tests/fuzz/corpus_openai_request.
#include <optional>
#include <span>
#include <string>

#include "tests/fuzz/corpus_dir.h"
#include "tests/fuzz/openai_request_input.h"

int main(int argc, char** argv) {
  const pmkv::fuzz::RequestModel model(pmkv::fuzz::default_request_model_dir());
  return pmkv::fuzz::replay_corpus(argc, argv,
                                   [&](std::span<const uint8_t> bytes,
                                       const std::filesystem::path&) -> std::optional<std::string> {
                                     if (pmkv::fuzz::run_request_input(bytes, model.info) ==
                                         pmkv::fuzz::RequestOutcome::kAccepted) {
                                       return std::nullopt;
                                     }
                                     return "rejected";
                                   });
}
