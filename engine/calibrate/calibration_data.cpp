#include "engine/calibrate/calibration_data.h"

#include <unistd.h>

#include <cstdio>
#include <random>
#include <set>
#include <string>

#include "engine/common/error.h"
#include "engine/runtime/step_builder.h"

namespace pmkv::calibrate {

CalibrationSet make_calibration_set(const std::vector<int32_t>& tokens,
                                    const CalibrationOptions& o) {
  if (o.num_samples < 1 || o.seq_len < 2) {
    throw InvalidArgument("calibration: need at least 1 sample of at least 2 tokens");
  }
  const int32_t eff = o.effective_len == 0 ? o.seq_len : o.effective_len;
  if (eff % o.seq_len != 0) {
    throw InvalidArgument("calibration: effective_len (" + std::to_string(eff) +
                          ") must be a multiple of seq_len (" + std::to_string(o.seq_len) + ")");
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < o.seq_len + 1) {
    throw InvalidArgument("calibration: the text has " + std::to_string(n) +
                          " tokens, fewer than seq_len + 1 = " + std::to_string(o.seq_len + 1));
  }
  CalibrationSet set;
  set.stretch = eff / o.seq_len;
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int64_t> start(0, n - o.seq_len);
  std::set<int64_t> used;
  for (int32_t i = 0; i < o.num_samples; ++i) {
    int64_t s = start(rng);
    for (int tries = 0; tries < 16 && used.contains(s); ++tries)
      s = start(rng);
    used.insert(s);
    set.offsets.push_back(s);
    set.samples.emplace_back(tokens.begin() + s, tokens.begin() + s + o.seq_len);
  }
  return set;
}

std::vector<float> forward_sample(LocalModel& model, const std::vector<int32_t>& sample,
                                  int32_t stretch, bool want_logits) {
  const int64_t len = static_cast<int64_t>(sample.size());
  CpuBackend& backend = model.cpu_backend(len + 64);
  kv::KvCacheManager& kv = model.kv_manager(len + 64);
  constexpr kv::SeqId kSeq = 0;
  const SeqChunk chunk{kSeq, sample,
                       want_logits ? SeqChunk::Logits::kAll : SeqChunk::Logits::kNone};
  auto batch = build_step(kv, {&chunk, 1});
  if (!batch) throw Error("calibration: the KV pool cannot hold one sample");
  for (int32_t& p : batch->positions)
    p *= stretch;
  std::vector<float> logits(batch->logit_rows.size() *
                            static_cast<size_t>(model.config.vocab_size));
  try {
    backend.forward(*batch, logits);
  } catch (...) {
    kv.end_step();
    kv.release(kSeq);
    throw;
  }
  kv.end_step();
  kv.release(kSeq);
  return logits;
}

std::function<void(int64_t, int64_t)> progress_printer(const char* what) {
  const bool tty = isatty(STDERR_FILENO) != 0;
  return [what, tty, last = int64_t{-1}](int64_t done, int64_t total) mutable {
    const int64_t pct = total > 0 ? 100 * done / total : 100;
    if (!tty && pct / 10 == last / 10 && done != total) return;
    last = pct;
    std::fprintf(stderr,
                 tty ? "\r[pmkv calibrate] %s: %lld/%lld (%lld%%)"
                     : "[pmkv calibrate] %s: %lld/%lld (%lld%%)\n",
                 what, static_cast<long long>(done), static_cast<long long>(total),
                 static_cast<long long>(pct));
    if (tty && done == total) std::fputc('\n', stderr);
  };
}

}  // namespace pmkv::calibrate
