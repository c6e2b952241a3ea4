#include "tests/fuzz/openai_request_input.h"

#include <cstdlib>
#include <string_view>

#include "engine/common/error.h"
#include "server/http/api_error.h"

namespace pmkv::fuzz {

RequestModel::RequestModel(const std::filesystem::path& model_dir)
    : tokenizer(Tokenizer::load(model_dir)), chat(&tokenizer) {
  info.tokenizer = &tokenizer;
  info.chat = &chat;
  info.served_name = "pmkv-ref";
  info.alt_name = "ref";
  info.vocab_size = tokenizer.vocab_size();
  info.max_model_len = 512;
  info.max_n = 8;
}

std::filesystem::path default_request_model_dir() {
  if (const char* dir = std::getenv("PMKV_FUZZ_MODEL")) return dir;
  return std::filesystem::path(PMKV_SOURCE_DIR) / "models" / "pmkv-ref";
}

RequestOutcome run_request_input(std::span<const uint8_t> input, const http::ModelInfo& model) {
  if (input.empty()) return RequestOutcome::kRejected;
  const bool chat = (input[0] & 1) != 0;
  const std::string_view body(reinterpret_cast<const char*>(input.data()) + 1, input.size() - 1);
  try {
    const http::ApiRequest api = chat ? http::parse_chat_request(body, model)
                                      : http::parse_completion_request(body, model);
    const std::vector<EngineRequest> requests = http::to_engine_requests(api, model, "fuzz");
    for (const EngineRequest& r : requests)
      r.params.validate();
  } catch (const http::ApiException&) {
    return RequestOutcome::kRejected;
  } catch (const InvalidArgument&) {
    return RequestOutcome::kRejected;
  }
  return RequestOutcome::kAccepted;
}

}  // namespace pmkv::fuzz
