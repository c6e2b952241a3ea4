// libFuzzer target: OpenAI request bodies through the parser the HTTP server runs
// (tests/fuzz/openai_request_input.h says what an input is and what counts as a finding). An
// exception other than the expected rejections escapes and aborts: libFuzzer reports it.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "tests/fuzz/openai_request_input.h"

namespace {
std::unique_ptr<pmkv::fuzz::RequestModel> g_model;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_model = std::make_unique<pmkv::fuzz::RequestModel>(pmkv::fuzz::default_request_model_dir());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)pmkv::fuzz::run_request_input(std::span<const uint8_t>(data, size), g_model->info);
  return 0;
}
