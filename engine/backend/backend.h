#pragma once
// Backend: runs the model over one StepBatch. One call per step, batch-oriented, so that a GPU
// backend can run a step as one graph. A backend owns the weights and the bytes of the KV pool;
// which pages a sequence owns is decided by the KvCacheManager and arrives in the StepBatch.
#include <cstdint>
#include <span>
#include <string>

#include "engine/backend/step_batch.h"
#include "engine/model/model_config.h"

namespace pmkv {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual const ModelConfig& config() const = 0;
  // Runs the step: writes the K/V of every row into its page slot, and the logits of
  // batch.logit_rows into `logits` ([logit_rows.size(), vocab_size] row-major).
  virtual void forward(const StepBatch& batch, std::span<float> logits) = 0;
};

}  // namespace pmkv
