#include "engine/runtime/generator.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <string>

#include "engine/common/error.h"
#include "engine/runtime/step_builder.h"
#include "engine/sampling/sampler.h"
#include "engine/tokenizer/detokenizer.h"

namespace pmkv {

namespace {

struct Sequence {
  kv::SeqId id;
  const GenerationRequest* request;
  size_t num_computed = 0;  // prompt tokens already in the KV cache
  std::vector<int32_t> output;
  Sampler sampler;
  std::optional<IncrementalDetokenizer> detok;
  StopChecker stop;
  bool done = false;
};

// Returns every page the run still holds, however the run ends.
struct ReleaseGuard {
  kv::KvCacheManager& kv;
  std::vector<Sequence>& seqs;
  ~ReleaseGuard() {
    for (const Sequence& s : seqs)
      kv.release(s.id);
  }
};

}  // namespace

Generator::Generator(Backend& backend, kv::KvCacheManager& kv, const Tokenizer* tokenizer,
                     std::vector<int32_t> eos_ids, Options options)
    : backend_(backend),
      kv_(kv),
      tokenizer_(tokenizer),
      eos_ids_(std::move(eos_ids)),
      options_(options) {}

std::vector<GenerationResult> Generator::run(std::span<const GenerationRequest> requests,
                                             const OnText& on_text) {
  const int64_t vocab = backend_.config().vocab_size;
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerationRequest& r = requests[i];
    const std::string who = "request " + std::to_string(i) + ": ";
    r.params.validate();
    if (r.prompt_ids.empty()) throw InvalidArgument(who + "the prompt is empty");
    for (int32_t id : r.prompt_ids) {
      if (id < 0 || id >= vocab) {
        throw InvalidArgument(who + "prompt token id " + std::to_string(id) +
                              " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
      }
    }
    if (!tokenizer_ && !r.params.stop.empty()) {
      throw InvalidArgument(who + "stop strings need a tokenizer");
    }
  }

  timings_ = {};
  std::vector<GenerationResult> results(requests.size());
  std::vector<Sequence> seqs;
  seqs.reserve(requests.size());
  // Ids unique within this manager: above every id already present is not needed, because a run
  // releases all of its sequences before returning.
  for (size_t i = 0; i < requests.size(); ++i) {
    Sequence s{static_cast<kv::SeqId>(i),
               &requests[i],
               0,
               {},
               Sampler(requests[i].params),
               std::nullopt,
               StopChecker(requests[i].params, eos_ids_)};
    if (kv_.contains(s.id)) throw std::logic_error("Generator: KV manager holds sequence ids");
    if (tokenizer_) s.detok.emplace(*tokenizer_, requests[i].prompt_ids);
    seqs.push_back(std::move(s));
  }
  ReleaseGuard guard{kv_, seqs};

  std::vector<float> logits;
  std::vector<DeviceSampling> sampling_rows;
  std::vector<int32_t> device_tokens;
  std::vector<SeqChunk> chunks;
  std::vector<size_t> chunk_seq;  // chunks[k] belongs to seqs[chunk_seq[k]]
  using Clock = std::chrono::steady_clock;
  for (;;) {
    chunks.clear();
    chunk_seq.clear();
    int32_t budget = options_.max_step_tokens;
    int64_t prompt_tokens = 0;
    for (size_t i = 0; i < seqs.size() && budget > 0; ++i) {
      Sequence& s = seqs[i];
      if (s.done) continue;
      const auto& prompt = s.request->prompt_ids;
      if (s.num_computed < prompt.size()) {
        const size_t n = std::min<size_t>(prompt.size() - s.num_computed, budget);
        const bool last = s.num_computed + n == prompt.size();
        chunks.push_back({s.id, std::span(prompt).subspan(s.num_computed, n),
                          last ? SeqChunk::Logits::kLast : SeqChunk::Logits::kNone,
                          static_cast<int32_t>(prompt.size())});
        s.num_computed += n;
        prompt_tokens += static_cast<int64_t>(n);
        budget -= static_cast<int32_t>(n);
      } else {
        chunks.push_back({s.id, std::span(&s.output.back(), 1), SeqChunk::Logits::kLast});
        budget -= 1;
      }
      chunk_seq.push_back(i);
    }
    if (chunks.empty()) break;

    const auto t0 = Clock::now();
    auto batch = build_step(kv_, chunks);
    if (!batch) {
      throw Error("the KV cache pool is too small for this batch (" +
                  std::to_string(kv_.pool().num_free()) + " free pages)");
    }
    // On a backend that samples on the device, logits stay there; the host gets tokens.
    const bool on_device = backend_.samples_on_device();
    if (on_device) {
      sampling_rows.clear();
      for (size_t k = 0; k < chunks.size(); ++k) {
        if (chunks[k].logits == SeqChunk::Logits::kNone) continue;
        const Sequence& s = seqs[chunk_seq[k]];
        sampling_rows.push_back({&s.request->params, s.sampler.seed(), s.output.size(),
                                 s.request->prompt_ids, s.output});
      }
      device_tokens.resize(sampling_rows.size());
      backend_.forward_sample(*batch, sampling_rows, device_tokens);
    } else {
      logits.resize(batch->logit_rows.size() * static_cast<size_t>(vocab));
      backend_.forward(*batch, logits);
    }
    kv_.end_step();

    auto finish = [&](size_t i, const StopUpdate& u) {
      Sequence& s = seqs[i];
      GenerationResult& res = results[i];
      if (!u.text.empty()) {
        if (!res.text) res.text.emplace();
        *res.text += u.text;
        if (on_text) on_text(i, u.text);
      }
      if (!u.finished()) return;
      s.done = true;
      res.finish_reason = *u.finish;
      res.output_ids = s.output;
      if (tokenizer_ && !res.text) res.text.emplace();
      res.kv = kv_.seq_stats(s.id);
      kv_.release(s.id);
    };
    // Floor action: a sequence whose KV budget cannot hold it even at the floor bits ends here.
    std::vector<uint8_t> ended(chunks.size(), 0);
    for (int32_t k : batch->over_budget) {
      Sequence& s = seqs[chunk_seq[k]];
      spdlog::warn(
          "sequence {}: KV budget exhausted at the floor bits after {} tokens; finishing "
          "with reason length",
          chunk_seq[k], kv_.num_tokens(s.id));
      ended[k] = 1;
      finish(chunk_seq[k], s.stop.finish(FinishReason::kLength, s.detok ? s.detok->flush() : ""));
    }

    size_t row = 0;
    for (size_t k = 0; k < chunks.size(); ++k) {
      if (chunks[k].logits == SeqChunk::Logits::kNone) continue;
      const size_t this_row = row++;
      if (ended[k]) continue;
      Sequence& s = seqs[chunk_seq[k]];
      const int32_t token =
          on_device ? device_tokens[this_row]
                    : s.sampler.sample(std::span<float>(logits.data() + this_row * vocab, vocab),
                                       s.request->prompt_ids, s.output);
      s.output.push_back(token);
      std::string text;
      if (s.detok) {
        text = s.detok->push(token);
        if (s.stop.tokens_remaining() == 1) text += s.detok->flush();
      }
      finish(chunk_seq[k], s.stop.append(token, text));
    }
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (prompt_tokens > 0) {
      timings_.prefill_tokens += prompt_tokens;
      timings_.prefill_seconds += dt;
    } else {
      timings_.decode_tokens += static_cast<int64_t>(chunks.size());
      timings_.decode_seconds += dt;
    }
  }
  return results;
}

}  // namespace pmkv
