#pragma once
// The byte work a step asks of the backend's KV pool besides writing new tokens: plain structs
// the KvCacheManager plans and the backends execute (CPU: engine/backend/cpu/kv_page_ops.cpp;
// CUDA: kernels/kv/). Per layer they run in this order, after the layer's attention (which reads
// the tables as they were before them, KvCacheManager::attention_table): every RequantOp, then
// every DemoteOp. Ops of one kind within a layer are
// independent (no op reads a page another op of that kind writes), so a GPU runs each kind as one
// launch.
#include <array>
#include <cstdint>

#include "engine/kv/page_pool.h"

namespace pmkv::kv {

// Window flush: re-codes `count` tokens from slots [src_slot, src_slot + count) of page `src`
// (at src_bits) into slots [dst_slot, ...) of page `dst` at dst_bits <= src_bits, by repeated
// integer halving of the codes (PM-KVQ's real backend). src != dst.
struct RequantOp {
  PageId src;
  int32_t src_bits;
  int32_t src_slot;
  PageId dst;
  int32_t dst_bits;
  int32_t dst_slot;
  int32_t count;
};

// Demotion in place: the first tokens[i] tokens of pages src[0..num_src) (all at from_bits, in
// token order) become the first sum(tokens) tokens of page src[0] at to_bits = from_bits / 2^m,
// num_src <= 2^m. The other source pages are freed by the manager after the step.
struct DemoteOp {
  static constexpr int kMaxSources = 8;
  std::array<PageId, kMaxSources> src{};
  std::array<int32_t, kMaxSources> tokens{};
  int32_t num_src = 0;
  int32_t from_bits = 16;
  int32_t to_bits = 16;
};

}  // namespace pmkv::kv
