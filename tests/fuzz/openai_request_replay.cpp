// Runs the OpenAI request parser over every regular file in a directory (argv[1]), as the fuzz
// target does (openai_request_input.h): each must be accepted or rejected with the expected
// exceptions; any other exception fails the run, a crash fails it by itself. Hand-written seeds
// are checked against their names: `seed-valid-*` must be accepted, `seed-bad-*` rejected. The
// ctest `openai_request_corpus_replay` runs it over tests/fuzz/corpus_openai_request.
#include <cstdint>
#include <cstdio>
#include <exception>
#include <span>
#include <vector>

#include "tests/fuzz/corpus_dir.h"
#include "tests/fuzz/openai_request_input.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  using pmkv::fuzz::name_starts;
  const auto files = pmkv::fuzz::corpus_files(argv[1]);
  if (!files) return 2;
  const pmkv::fuzz::RequestModel model(pmkv::fuzz::default_request_model_dir());
  size_t accepted = 0, rejected = 0, failed = 0;
  for (const auto& p : *files) {
    const std::vector<char> raw = pmkv::fuzz::file_bytes(p);
    const std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(raw.data()), raw.size());
    try {
      if (pmkv::fuzz::run_request_input(bytes, model.info) ==
          pmkv::fuzz::RequestOutcome::kAccepted) {
        ++accepted;
        if (name_starts(p, "seed-bad-")) {
          std::fprintf(stderr, "FAIL %s: a bad seed was accepted\n", p.c_str());
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
  std::printf("%zu files: %zu accepted, %zu rejected, %zu failed\n", files->size(), accepted,
              rejected, failed);
  return failed == 0 ? 0 : 1;
}
