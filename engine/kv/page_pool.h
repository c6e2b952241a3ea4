#pragma once
// PagePool: the ids of the KV pool's fixed-size pages and who may use them. Ids only: the bytes
// live in the backend (kernels/kv_page_layout.h says what is inside a page). One free list,
// allocate and free in O(1). Owned by the engine thread; not thread-safe.
#include <cstdint>
#include <optional>
#include <vector>

namespace pmkv::kv {

using PageId = int32_t;

class PagePool {
 public:
  explicit PagePool(int32_t num_pages);

  // A free page, or nullopt when the pool is exhausted.
  std::optional<PageId> allocate();
  // Returns `page` to the free list. Freeing a page that is not in use is a logic error (throws).
  void free(PageId page);

  int32_t num_pages() const { return static_cast<int32_t>(in_use_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_pages() - num_free(); }
  int32_t peak_used() const { return peak_used_; }
  bool in_use(PageId page) const { return in_use_.at(page) != 0; }

 private:
  std::vector<PageId> free_;     // stack: the most recently freed page is reused first
  std::vector<uint8_t> in_use_;  // [num_pages]
  int32_t peak_used_ = 0;
};

}  // namespace pmkv::kv
