#include "engine/kv/page_pool.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pmkv::kv {

PagePool::PagePool(int32_t num_pages) : in_use_(static_cast<size_t>(num_pages), 0) {
  if (num_pages < 0) throw std::invalid_argument("PagePool: negative page count");
  free_.reserve(num_pages);
  // Highest id at the bottom so that a fresh pool hands out 0, 1, 2, ...
  for (PageId p = num_pages - 1; p >= 0; --p)
    free_.push_back(p);
}

std::optional<PageId> PagePool::allocate() {
  if (free_.empty()) return std::nullopt;
  const PageId p = free_.back();
  free_.pop_back();
  in_use_[p] = 1;
  peak_used_ = std::max(peak_used_, num_used());
  return p;
}

void PagePool::free(PageId page) {
  if (page < 0 || page >= num_pages() || !in_use_[page]) {
    throw std::logic_error("PagePool::free: page " + std::to_string(page) + " is not in use");
  }
  in_use_[page] = 0;
  free_.push_back(page);
}

}  // namespace pmkv::kv
