#pragma once
// pmkv.v1 messages <-> engine structs. Protobuf stops here; the engine sees EngineRequest only.
#include <string>
#include <vector>

#include "engine/serving/serving_engine.h"
#include "pmkv/v1/pmkv.pb.h"
#include "server/chat/chat_prompt.h"

namespace pmkv::rpc {

// What converting a request needs to know about the served model.
struct ModelFacts {
  const Tokenizer* tokenizer = nullptr;
  const chat::ChatPrompt* chat = nullptr;
  int32_t vocab_size = 0;
  int32_t max_model_len = 0;
  int32_t num_layers = 0;
};

// Throws InvalidArgument naming the field (no prompt, ids out of range, prompt too long,
// max_tokens beyond the context, bad sampling values, chat without a template).
EngineRequest to_engine_request(const v1::GenerateRequest& req, const ModelFacts& model);

// The ids a Tokenize call asks for (InvalidArgument on bad input).
std::vector<int32_t> tokenize(const v1::TokenizeRequest& req, const ModelFacts& model);

// The budgets an UpdateBudgets call asks for (empty = none).
std::vector<int64_t> budgets_of(const v1::UpdateBudgetsRequest& req, const ModelFacts& model);

// One engine update as a response message (finish_reason set when the stream finished).
v1::GenerateResponse to_response(const StreamUpdate& update);

void fill_kv_stats(const EngineStats& stats, v1::KvStats* out);

}  // namespace pmkv::rpc
