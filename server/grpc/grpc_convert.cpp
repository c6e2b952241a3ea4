#include "server/grpc/grpc_convert.h"

#include "engine/common/error.h"

namespace pmkv::rpc {
namespace {

constexpr int32_t kMaxLogprobs = 20;

std::vector<chat::ChatMessage> messages_of(const v1::ChatMessages& chat) {
  std::vector<chat::ChatMessage> out;
  for (const v1::ChatMessage& m : chat.messages())
    out.push_back({m.role(), m.content()});
  return out;
}

std::vector<int32_t> encode_chat(const v1::ChatMessages& chat, const ModelFacts& model) {
  if (model.chat == nullptr) throw InvalidArgument("this server has no chat template");
  const bool add_gen = chat.has_add_generation_prompt() ? chat.add_generation_prompt() : true;
  return model.chat->encode(messages_of(chat), add_gen);
}

const Tokenizer& need_tokenizer(const ModelFacts& model) {
  if (model.tokenizer == nullptr) {
    throw InvalidArgument("the model has no tokenizer (tokenizer.model): send token_ids");
  }
  return *model.tokenizer;
}

std::vector<int32_t> prompt_ids(const v1::GenerateRequest& req, const ModelFacts& model) {
  switch (req.prompt_case()) {
    case v1::GenerateRequest::kText:
      return need_tokenizer(model).encode_prompt(req.text());
    case v1::GenerateRequest::kTokenIds: {
      std::vector<int32_t> ids(req.token_ids().ids().begin(), req.token_ids().ids().end());
      for (int32_t id : ids) {
        if (id < 0 || (model.vocab_size > 0 && id >= model.vocab_size)) {
          throw InvalidArgument("token_ids: id " + std::to_string(id) + " is outside the " +
                                "vocabulary [0, " + std::to_string(model.vocab_size) + ")");
        }
      }
      return ids;
    }
    case v1::GenerateRequest::kChat:
      return encode_chat(req.chat(), model);
    default:
      throw InvalidArgument("prompt is required: set text, token_ids or chat");
  }
}

SamplingParams sampling_of(const v1::SamplingParams& s) {
  SamplingParams p;
  if (s.has_temperature()) p.temperature = s.temperature();
  if (s.has_top_p()) p.top_p = s.top_p();
  if (s.has_top_k()) p.top_k = s.top_k();
  if (s.has_min_p()) p.min_p = s.min_p();
  if (s.has_repetition_penalty()) p.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) p.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) p.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) p.seed = s.seed();
  p.stop.assign(s.stop().begin(), s.stop().end());
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.ignore_eos = s.ignore_eos();
  p.include_stop_str_in_output = s.include_stop_str_in_output();
  return p;
}

void add_bits(google::protobuf::RepeatedPtrField<v1::BitsStats>* out, const auto& pages,
              const auto* tokens, int64_t page_bytes) {
  for (size_t i = 0; i < kv::kStatBits.size(); ++i) {
    v1::BitsStats* b = out->Add();
    b->set_bits(kv::kStatBits[i]);
    b->set_pages(pages[i]);
    if (tokens) b->set_tokens((*tokens)[i]);
    b->set_bytes(pages[i] * page_bytes);
  }
}

}  // namespace

EngineRequest to_engine_request(const v1::GenerateRequest& req, const ModelFacts& model) {
  EngineRequest e;
  e.request_id = req.request_id();
  e.prompt_ids = prompt_ids(req, model);
  if (e.prompt_ids.empty()) throw InvalidArgument("the prompt is empty");
  const int64_t len = static_cast<int64_t>(e.prompt_ids.size());
  const int64_t room = model.max_model_len - len;
  if (room < 1) {
    throw InvalidArgument("the prompt is " + std::to_string(len) + " tokens long; the model's " +
                          "context is " + std::to_string(model.max_model_len) +
                          " tokens, which leaves no room to generate");
  }
  e.params = sampling_of(req.sampling());
  if (req.sampling().has_max_tokens()) {
    e.params.max_tokens = req.sampling().max_tokens();
    if (e.params.max_tokens > room) {
      throw InvalidArgument("sampling.max_tokens " + std::to_string(e.params.max_tokens) +
                            " + the prompt's " + std::to_string(len) + " tokens exceed the " +
                            "model's context of " + std::to_string(model.max_model_len));
    }
  } else {
    e.params.max_tokens = static_cast<int32_t>(room);
  }
  e.params.validate();
  if (req.has_logprobs()) {
    if (req.logprobs() < 0 || req.logprobs() > kMaxLogprobs) {
      throw InvalidArgument("logprobs must be in [0, 20], got " + std::to_string(req.logprobs()));
    }
    e.logprobs = req.logprobs();
  }
  return e;
}

std::vector<int32_t> tokenize(const v1::TokenizeRequest& req, const ModelFacts& model) {
  switch (req.input_case()) {
    case v1::TokenizeRequest::kText: {
      const Tokenizer& tok = need_tokenizer(model);
      const bool special = req.has_add_special_tokens() ? req.add_special_tokens() : true;
      return special ? tok.encode_prompt(req.text()) : tok.encode_segments(req.text(), true);
    }
    case v1::TokenizeRequest::kChat:
      return encode_chat(req.chat(), model);
    default:
      throw InvalidArgument("input is required: set text or chat");
  }
}

std::vector<int64_t> budgets_of(const v1::UpdateBudgetsRequest& req, const ModelFacts& model) {
  switch (req.budgets_case()) {
    case v1::UpdateBudgetsRequest::kPerLayer:
      return {req.per_layer().bytes().begin(), req.per_layer().bytes().end()};
    case v1::UpdateBudgetsRequest::kUniformBytes:
      return std::vector<int64_t>(static_cast<size_t>(model.num_layers), req.uniform_bytes());
    case v1::UpdateBudgetsRequest::kClear:
      return {};
    default:
      throw InvalidArgument("budgets is required: set per_layer, uniform_bytes or clear");
  }
}

v1::GenerateResponse to_response(const StreamUpdate& u) {
  v1::GenerateResponse r;
  std::string text;
  for (const TokenEvent& t : u.tokens) {
    v1::Token* tok = r.add_tokens();
    tok->set_id(t.token_id);
    tok->set_text(t.text);
    if (t.logprob) tok->set_logprob(*t.logprob);
    for (const auto& [id, lp] : t.top_logprobs) {
      v1::TopLogprob* top = tok->add_top_logprobs();
      top->set_token_id(id);
      top->set_logprob(lp);
    }
    text += t.text;
  }
  r.set_text(std::move(text));
  if (u.end == StreamEnd::kFinished) {
    r.set_finish_reason(u.finish_reason == FinishReason::kStop ? v1::FINISH_REASON_STOP
                                                               : v1::FINISH_REASON_LENGTH);
  }
  r.set_prompt_tokens(u.prompt_tokens);
  r.set_completion_tokens(u.completion_tokens);
  return r;
}

void fill_kv_stats(const EngineStats& s, v1::KvStats* out) {
  const kv::KvPoolStats& kv = s.kv;
  out->set_pages_total(kv.pages_total);
  out->set_pages_used(kv.pages_used);
  out->set_pages_peak(kv.pages_peak);
  out->set_page_bytes(kv.page_bytes);
  out->set_bytes_total(kv.pages_total * kv.page_bytes);
  out->set_bytes_used(kv.pages_used * kv.page_bytes);
  add_bits(out->mutable_by_bits(), kv.pages_by_bits, &kv.tokens_by_bits, kv.page_bytes);
  for (size_t l = 0; l < kv.layers.size(); ++l) {
    const kv::LayerKvStats& ls = kv.layers[l];
    v1::LayerStats* layer = out->add_layers();
    layer->set_layer(static_cast<int32_t>(l));
    layer->set_pages(ls.pages);
    layer->set_bytes(ls.bytes);
    layer->set_budget_bytes(ls.budget_bytes);
    add_bits(layer->mutable_by_bits(), ls.pages_by_bits, &ls.tokens_by_bits, kv.page_bytes);
  }
  out->set_demotions_total(kv.demotions_total);
  out->set_flushes_total(kv.flushes_total);
  out->set_num_sequences(kv.num_sequences);
  out->set_budgets_source(s.budgets_source);
  out->set_budget_chain_tokens(s.budget_chain_tokens);
  out->set_key_scales_source(s.key_scales_source);
  out->set_preemptions_total(static_cast<int64_t>(s.preemptions_total));
  out->set_requests_running(s.requests_running);
  out->set_requests_waiting(s.requests_waiting);
  out->set_async_steps(s.async_steps);
  out->set_discarded_tokens_total(static_cast<int64_t>(s.discarded_tokens_total));
  out->set_device_wait_seconds_total(s.device_wait_seconds_total);
  out->set_idle_seconds_total(s.idle_seconds_total);
}

}  // namespace pmkv::rpc
