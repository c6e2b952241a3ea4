#pragma once
// What the corpus replay runners share: the files of a corpus, the seed-name check, the replay
// loop.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <vector>

namespace pmkv::fuzz {

// The regular files of `dir`, sorted; nullopt (after a message on stderr) when it cannot be
// listed or holds none.
inline std::optional<std::vector<std::filesystem::path>> corpus_files(const char* dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.is_regular_file()) files.push_back(e.path());
  }
  if (ec) {
    std::fprintf(stderr, "cannot list %s: %s\n", dir, ec.message().c_str());
    return std::nullopt;
  }
  if (files.empty()) {
    std::fprintf(stderr, "no files in %s\n", dir);
    return std::nullopt;
  }
  std::sort(files.begin(), files.end());
  return files;
}

inline std::vector<char> file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Hand-written seeds say what they must do by name: `seed-valid-*` pass, `seed-bad-*` fail.
inline bool name_starts(const std::filesystem::path& p, const char* prefix) {
  return p.filename().string().rfind(prefix, 0) == 0;
}

// Replays a corpus: main(argc, argv) of a replay runner. `run` parses one input and returns
// nullopt when it is accepted, or why it was rejected (the parser's expected exceptions, caught by
// `run`); any other exception fails the input, a crash fails the run by itself. Seeds are held to
// their names: `seed-valid-*` must be accepted, `seed-bad-*` rejected. Prints a summary line.
using ReplayRun = std::function<std::optional<std::string>(std::span<const uint8_t>,
                                                           const std::filesystem::path&)>;
inline int replay_corpus(int argc, char** argv, const ReplayRun& run) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const auto files = corpus_files(argv[1]);
  if (!files) return 2;
  size_t accepted = 0, rejected = 0, failed = 0;
  for (const auto& p : *files) {
    const std::vector<char> raw = file_bytes(p);
    const std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(raw.data()), raw.size());
    try {
      const std::optional<std::string> why = run(bytes, p);
      ++(why ? rejected : accepted);
      if (!why && name_starts(p, "seed-bad-")) {
        std::fprintf(stderr, "FAIL %s: a bad seed was accepted\n", p.c_str());
        ++failed;
      } else if (why && name_starts(p, "seed-valid-")) {
        std::fprintf(stderr, "FAIL %s: a valid seed was rejected: %s\n", p.c_str(), why->c_str());
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
  std::printf("%zu files: %zu accepted, %zu rejected, %zu failed\n", files->size(), accepted,
              rejected, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace pmkv::fuzz
