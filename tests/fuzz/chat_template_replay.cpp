// Runs the chat template recognizer over every regular file in a directory (argv[1]), as the fuzz
// target does (chat_template_input.h). Any exception but InvalidArgument fails the run, a crash
// fails it by itself; `seed-valid-*` must render, `seed-bad-*` must be rejected. The ctest
// `chat_template_corpus_replay` runs it over tests/fuzz/corpus_chat_template.
#include <cstdint>
#include <cstdio>
#include <exception>
#include <span>
#include <vector>

#include "tests/fuzz/chat_template_input.h"
#include "tests/fuzz/corpus_dir.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  using pmkv::fuzz::name_starts;
  const auto files = pmkv::fuzz::corpus_files(argv[1]);
  if (!files) return 2;
  size_t rendered = 0, rejected = 0, failed = 0;
  for (const auto& p : *files) {
    const std::vector<char> raw = pmkv::fuzz::file_bytes(p);
    const std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(raw.data()), raw.size());
    try {
      if (pmkv::fuzz::run_chat_template_input(bytes) == pmkv::fuzz::TemplateOutcome::kRendered) {
        ++rendered;
        if (name_starts(p, "seed-bad-")) {
          std::fprintf(stderr, "FAIL %s: a bad seed rendered\n", p.c_str());
          ++failed;
        }
      } else {
        ++rejected;
        if (name_starts(p, "seed-valid-")) {
          std::fprintf(stderr, "FAIL %s: a valid seed was rejected\n", p.c_str());
          ++failed;
        }
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "FAIL %s: unexpected exception: %s\n", p.c_str(), e.what());
      ++failed;
    } catch (...) {
      std::fprintf(stderr, "FAIL %s: unexpected non-std exception\n", p.c_str());
      ++failed;
    }
  }
  std::printf("%zu files: %zu rendered, %zu rejected, %zu failed\n", files->size(), rendered,
              rejected, failed);
  return failed == 0 ? 0 : 1;
}
