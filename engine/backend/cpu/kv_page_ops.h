#pragma once
// CPU execution of the KV page operations of engine/kv/page_ops.h on a byte pool: the oracle the
// CUDA kernels (kernels/kv/) must match bit for bit.
#include "engine/backend/cpu/paged_attention.h"
#include "engine/kv/page_ops.h"

namespace pmkv::cpu {

void apply_requant(const KvPoolView& pool, const kv::RequantOp& op);
void apply_demote(const KvPoolView& pool, const kv::DemoteOp& op);

}  // namespace pmkv::cpu
