#include "engine/serving/output_processor.h"

#include <spdlog/spdlog.h>

#include <utility>

namespace pmkv {

namespace {

double seconds(Sequence::Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

TokenEvent OutputProcessor::sample(Sequence& s, Pick pick) {
  TokenEvent ev;
  if (pick.token) {  // sampled on the device
    ev.token_id = *pick.token;
    if (pick.logprobs != nullptr) {
      ev.logprob = pick.logprobs->logprob;
      ev.top_logprobs = pick.logprobs->top;
    }
    if (pick.at >= 0) {
      s.tokens.at(pick.at) = ev.token_id;
      if (s.placeholder_at == pick.at) s.placeholder_at = s.placeholder_row = -1;
    } else {
      s.tokens.push_back(ev.token_id);
    }
    return ev;
  }
  const std::span<float> logits = pick.logits;
  const int32_t k = s.request.logprobs;
  // Log-probabilities come from the raw logits; sample() rewrites the row (penalties, temperature).
  if (k >= 0) raw_.assign(logits.begin(), logits.end());
  ev.token_id = s.sampler.sample(logits, s.prompt(), s.output());
  if (k >= 0) {
    ev.logprob = Sampler::token_logprob(raw_, ev.token_id);
    if (k > 0) ev.top_logprobs = Sampler::top_logprobs(raw_, k);
  }
  s.tokens.push_back(ev.token_id);
  return ev;
}

std::string OutputProcessor::detokenize(Sequence& s, int32_t token) {
  if (!s.detok) return {};
  std::string text = s.detok->push(token);
  // The last token: the detokenizer releases what it holds (stop_checker.h's contract).
  if (s.stop.tokens_remaining() == 1) text += s.detok->flush();
  return text;
}

bool OutputProcessor::on_logits(Sequence& s, Pick pick, Clock::time_point now) {
  TokenEvent ev = sample(s, pick);
  StopUpdate u = s.stop.append(ev.token_id, detokenize(s, ev.token_id));
  ev.text = std::move(u.text);
  StreamUpdate up;
  up.tokens.push_back(std::move(ev));
  if (u.finished()) {
    up.end = StreamEnd::kFinished;
    up.finish_reason = u.finish;
  }
  push(s, std::move(up), now);
  return u.finished();
}

void OutputProcessor::on_floor(Sequence& s, Pick pick, Clock::time_point now) {
  spdlog::warn(
      "request {}: KV budget exhausted at the floor bits after {} tokens; finishing "
      "with reason length",
      s.request.request_id, s.num_computed);
  StreamUpdate up;
  StopUpdate u;
  if (!pick.empty()) {
    TokenEvent ev = sample(s, pick);
    std::string text = detokenize(s, ev.token_id);
    if (s.detok) text += s.detok->flush();
    u = s.stop.append(ev.token_id, text);
    up.tokens.push_back(std::move(ev));
  }
  if (!u.finished()) {
    StopUpdate f = s.stop.finish(FinishReason::kLength, s.detok ? s.detok->flush() : "");
    u.text += f.text;
    u.finish = f.finish;
  }
  if (!up.tokens.empty()) up.tokens.back().text = std::move(u.text);
  up.end = StreamEnd::kFinished;
  up.finish_reason = u.finish;
  push(s, std::move(up), now);
}

void OutputProcessor::end(Sequence& s, StreamEnd end, std::string error, Clock::time_point now) {
  StreamUpdate up;
  up.end = end;
  up.error = std::move(error);
  push(s, std::move(up), now);
}

void OutputProcessor::push(Sequence& s, StreamUpdate u, Clock::time_point now) {
  if (!u.tokens.empty()) {
    if (!s.last_token) {
      metrics_.time_to_first_token.observe(seconds(now - s.arrival));
      metrics_.prompt_tokens += static_cast<uint64_t>(s.num_prompt);
    } else {
      metrics_.inter_token_latency.observe(seconds(now - *s.last_token));
    }
    s.last_token = now;
    metrics_.generation_tokens += u.tokens.size();
  }
  if (u.end) {
    switch (*u.end) {
      case StreamEnd::kFinished:
        ++metrics_.finished;
        metrics_.request_latency.observe(seconds(now - s.arrival));
        break;
      case StreamEnd::kCancelled:
        ++metrics_.cancelled;
        break;
      case StreamEnd::kRejected:
        ++metrics_.rejected;
        break;
      case StreamEnd::kShutdown:
        break;
      case StreamEnd::kError:
        ++metrics_.failed;
        break;
    }
  }
  u.prompt_tokens = s.num_prompt;
  u.completion_tokens = s.num_generated();
  s.stream->push(std::move(u));
}

}  // namespace pmkv
