#pragma once
// Turns "these sequences advance by these tokens" into a StepBatch: reserves the KV slots of the
// new tokens in the KvCacheManager and copies the page tables the step's attention reads
// (KvCacheManager::attention_table: before the step's flushes and demotions, which the backend
// runs after the forward; so ops planned after build_step, e.g. demote_for_pressure, leave the
// batch's tables valid). Positions are token indices (a
// sequence's i-th token has RoPE position i).
#include <cstdint>
#include <optional>
#include <span>

#include "engine/backend/step_batch.h"
#include "engine/kv/kv_cache_manager.h"

namespace pmkv {

struct SeqChunk {
  kv::SeqId seq;
  std::span<const int32_t> tokens;  // the new tokens, in order
  enum class Logits { kNone, kLast, kAll } logits = Logits::kLast;
  // The sequence's prompt length: with kv_cache.hold_prompt its KV stays at 16 bits until the
  // whole prompt is in the cache (KvCacheManager::append). 0: nothing held (teacher-forced text).
  int32_t prompt_len = 0;
};

// Reserves KV for every chunk and builds the batch (tables, write slots, flush/demotion ops). When
// the pool cannot hold all chunks, returns nullopt and leaves the manager exactly as it was.
// After running the batch the caller calls kv.end_step().
std::optional<StepBatch> build_step(kv::KvCacheManager& kv, std::span<const SeqChunk> chunks);
// The same into `b`, whose vectors keep their capacity from step to step (a long-context batch
// copies ~10^6 page references per step: reusing the memory spares its allocation and page
// faults). Returns false (nothing changed, `b` unspecified) when the pool cannot hold the chunks.
bool build_step(kv::KvCacheManager& kv, std::span<const SeqChunk> chunks, StepBatch& b);

}  // namespace pmkv
