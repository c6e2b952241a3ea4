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

}  // namespace pmkv::kv
