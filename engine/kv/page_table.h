#pragma once
// One entry of a (sequence, layer) page table: pages are listed in token order; an entry says which
// page, at which bit-width, and how many of the layer's tokens it holds (the last page of a table
// may be partly filled).
#include <cstdint>

#include "engine/kv/page_pool.h"

namespace pmkv::kv {

struct PageRef {
  PageId page;
  int32_t bits;
  int32_t num_tokens;
};

// Where a step writes the K/V of its new tokens in one (sequence, layer): `count` consecutive new
// tokens go to slots [slot, slot + count) of `page`, always a 16-bit page (sink or window). The
// step's flush ops may then move them into the body.
struct KvWrite {
  PageId page;
  int32_t slot;
  int32_t count;
};

}  // namespace pmkv::kv
