#pragma once
// What the corpus replay runners share: the files of a corpus directory and the seed-name check.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
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

}  // namespace pmkv::fuzz
