// Runs the safetensors parser over every regular file in a directory (argv[1]): each must either
// parse or be rejected with a pmkv::Error. Any other exception fails the run; a crash fails it by
// itself. The hand-written seeds are also checked against their names: `seed-valid-*` must parse,
// `seed-bad-*` must be rejected. The ctest `safetensors_corpus_replay` runs it over
// tests/fuzz/corpus.
#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <vector>

#include "engine/common/error.h"
#include "engine/model/safetensors.h"
#include "tests/fuzz/corpus_dir.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  using pmkv::fuzz::name_starts;
  const auto files = pmkv::fuzz::corpus_files(argv[1]);
  if (!files) return 2;
  size_t accepted = 0, rejected = 0, failed = 0;
  for (const auto& p : *files) {
    const std::vector<char> bytes = pmkv::fuzz::file_bytes(p);
    try {
      pmkv::parse_safetensors(std::span<const std::byte>(
                                  reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()),
                              p.string());
      ++accepted;
      if (name_starts(p, "seed-bad-")) {
        std::fprintf(stderr, "FAIL %s: a malformed seed was accepted\n", p.c_str());
        ++failed;
      }
    } catch (const pmkv::Error& e) {
      ++rejected;
      if (name_starts(p, "seed-valid-")) {
        std::fprintf(stderr, "FAIL %s: a valid seed was rejected: %s\n", p.c_str(), e.what());
        ++failed;
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "FAIL %s: unexpected exception: %s\n", p.c_str(), e.what());
      ++failed;
    } catch (...) {
      std::fprintf(stderr, "FAIL %s: unexpected non-std exception\n", p.c_str());
      ++failed;
    }
  }
  std::printf("%zu files: %zu accepted, %zu rejected with pmkv::Error, %zu failed\n", files->size(),
              accepted, rejected, failed);
  return failed == 0 ? 0 : 1;
}
