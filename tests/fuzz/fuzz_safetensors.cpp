// libFuzzer target: the safetensors header parser over arbitrary bytes. A LoadError (any
// pmkv::Error) is the expected answer to a bad file; anything else (another exception, a crash,
// a sanitizer report, an out-of-bounds read) is a bug the fuzzer must see.
#include <cstddef>
#include <cstdint>
#include <span>

#include "engine/common/error.h"
#include "engine/model/safetensors.h"

namespace {
volatile unsigned g_sink;  // keeps the reads of the accepted ranges alive
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto h = pmkv::parse_safetensors(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size), "fuzz-input");
    // Touch every accepted range so ASan checks the parser's bounds promise.
    unsigned sum = 0;
    for (const auto& t : h.tensors) {
      const auto* begin = reinterpret_cast<const unsigned char*>(data) + h.data_start + t.begin;
      for (uint64_t i = 0; i < t.num_bytes(); ++i)
        sum += begin[i];
    }
    g_sink = sum;
  } catch (const pmkv::Error&) {
  }
  return 0;
}
