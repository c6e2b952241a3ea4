#pragma once
// Calibration samples and the forward pass calibration runs on them: n windows of seq_len tokens
// drawn (seeded) from a token stream, evaluated with positions stretched by effective_len /
// seq_len (PM-KVQ's positional interpolation: token i gets RoPE position i * stretch, so a short
// sample sweeps the angles a long context reaches).
#include <cstdint>
#include <functional>
#include <vector>

#include "engine/runtime/local_model.h"

namespace pmkv::calibrate {

struct CalibrationSet {
  std::vector<std::vector<int32_t>> samples;
  std::vector<int64_t> offsets;  // where each sample starts in the token stream
  int32_t stretch = 1;           // effective_len / seq_len
};

struct CalibrationOptions {
  int32_t num_samples = 8;
  int32_t seq_len = 512;
  int32_t effective_len = 0;  // 0: = seq_len (no stretch); must be a multiple of seq_len
  uint64_t seed = 0;
};

// Draws the samples: windows at seeded random offsets (distinct when the text allows). Throws
// InvalidArgument when the text has fewer than seq_len + 1 tokens or the lengths do not divide.
CalibrationSet make_calibration_set(const std::vector<int32_t>& tokens,
                                    const CalibrationOptions& options);

// One forward of a sample as a single chunk from an empty cache, positions stretched. Returns the
// logits of every position ([len, vocab]) when `want_logits`, else nothing. The backend's
// attention probe, if set, sees every layer.
std::vector<float> forward_sample(LocalModel& model, const std::vector<int32_t>& sample,
                                  int32_t stretch, bool want_logits);

// Progress on stderr ("[pmkv calibrate] what: done/total"), a line per 10% when not a terminal.
std::function<void(int64_t, int64_t)> progress_printer(const char* what);

}  // namespace pmkv::calibrate
