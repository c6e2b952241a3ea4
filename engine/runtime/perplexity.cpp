#include "engine/runtime/perplexity.h"

#include <chrono>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "engine/common/error.h"
#include "engine/runtime/step_builder.h"
#include "engine/sampling/sampler.h"

namespace pmkv {

double PerplexityResult::perplexity() const {
  return predicted > 0 ? std::exp(nll / static_cast<double>(predicted)) : 0.0;
}

PerplexityResult evaluate_perplexity(Backend& backend, kv::KvCacheManager& kv,
                                     std::span<const int32_t> tokens,
                                     const PerplexityOptions& opt) {
  if (opt.window < 2 || opt.chunk < 1) {
    throw InvalidArgument("perplexity: window must be >= 2 and chunk >= 1");
  }
  const int64_t vocab = backend.config().vocab_size;
  for (int32_t id : tokens) {
    if (id < 0 || id >= vocab) {
      throw InvalidArgument("perplexity: token id " + std::to_string(id) +
                            " outside the vocabulary");
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  PerplexityResult r;
  constexpr kv::SeqId kSeq = 0;
  std::vector<float> logits;
  const int64_t total = static_cast<int64_t>(tokens.size());
  for (int64_t w0 = 0; w0 + 1 < total; w0 += opt.window) {
    const auto window = tokens.subspan(w0, std::min<int64_t>(opt.window, total - w0));
    struct Release {
      kv::KvCacheManager& kv;
      ~Release() { kv.release(kSeq); }
    } release{kv};
    for (size_t c0 = 0; c0 < window.size(); c0 += opt.chunk) {
      const size_t n = std::min<size_t>(opt.chunk, window.size() - c0);
      const SeqChunk chunk{kSeq, window.subspan(c0, n), SeqChunk::Logits::kAll};
      auto batch = build_step(kv, {&chunk, 1});
      if (!batch) throw Error("perplexity: the KV pool cannot hold one window");
      if (!batch->over_budget.empty()) {
        kv.end_step();
        throw InvalidArgument("perplexity: the KV budget cannot hold a window of " +
                              std::to_string(window.size()) +
                              " tokens even at the floor bits; raise the budget or shorten the "
                              "window");
      }
      logits.resize(n * static_cast<size_t>(vocab));
      backend.forward(*batch, logits);
      kv.end_step();
      for (size_t i = 0; i < n; ++i) {
        const size_t next = c0 + i + 1;  // row i predicts window[next]
        if (next >= window.size()) break;
        const std::span<const float> row(logits.data() + i * vocab, vocab);
        if (opt.on_logits) opt.on_logits(r.predicted, row);
        r.nll -= Sampler::token_logprob(row, window[next]);
        ++r.predicted;
      }
      if (opt.on_progress) opt.on_progress(w0 + static_cast<int64_t>(c0 + n), total);
    }
    const kv::SeqKvStats st = kv.seq_stats(kSeq);
    for (const kv::LayerKvStats& l : st.layers) {
      r.kv_bytes += l.bytes;
      for (size_t b = 0; b < l.tokens_by_bits.size(); ++b)
        r.kv_tokens_by_bits[b] += l.tokens_by_bits[b];
    }
    r.demotions += st.demotions;
    ++r.windows;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace pmkv
