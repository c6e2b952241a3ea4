#pragma once
// Shared by the tokenizer and detokenizer tests: the shared models they read and a temporary
// model directory.
#include <unistd.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

namespace pmkv::testing {

inline const std::filesystem::path kLlama2Model =
    std::filesystem::path(PMKV_SHARED_DIR) / "models/llama2-tokenizer/tokenizer.model";
inline const std::filesystem::path kTok512Model =
    std::filesystem::path(PMKV_SHARED_DIR) / "models/stories260K/tok512.model";

// A fresh directory under the system temp dir holding a copy of `sp_model` as tokenizer.model
// (none when empty), removed with everything in it at scope exit.
class TempModelDir {
 public:
  explicit TempModelDir(const std::filesystem::path& sp_model = kLlama2Model) {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("pmkv_tok_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
    if (!sp_model.empty()) std::filesystem::copy_file(sp_model, path_ / "tokenizer.model");
  }
  ~TempModelDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempModelDir(const TempModelDir&) = delete;
  TempModelDir& operator=(const TempModelDir&) = delete;

  void write(const std::string& name, const std::string& content) const {
    std::ofstream out(path_ / name, std::ios::binary);
    out << content;
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace pmkv::testing

// Catch2 v2 has no SKIP: warn and leave the test case when the shared models are missing.
#define REQUIRE_MODEL(path)                                  \
  do {                                                       \
    if (!std::filesystem::exists(path)) {                    \
      WARN("skipped: " << (path).string() << " is missing"); \
      return;                                                \
    }                                                        \
  } while (false)
