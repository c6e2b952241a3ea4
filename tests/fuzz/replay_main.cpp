// Runs the safetensors parser over every regular file in a directory (argv[1]): each must either
// parse or be rejected with a pmkv::Error. Any other exception fails the run; a crash fails it by
// itself. The hand-written seeds are also checked against their names: `seed-valid-*` must parse,
// `seed-bad-*` must be rejected. The ctest `safetensors_corpus_replay` runs it over
// tests/fuzz/corpus.
#include <cstddef>
#include <optional>
#include <span>
#include <string>

#include "engine/common/error.h"
#include "engine/model/safetensors.h"
#include "tests/fuzz/corpus_dir.h"

int main(int argc, char** argv) {
  return pmkv::fuzz::replay_corpus(
      argc, argv,
      [](std::span<const uint8_t> bytes,
         const std::filesystem::path& p) -> std::optional<std::string> {
        try {
          pmkv::parse_safetensors(std::as_bytes(bytes), p.string());
        } catch (const pmkv::Error& e) {
          return e.what();
        }
        return std::nullopt;
      });
}
