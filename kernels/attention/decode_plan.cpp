// Host side of decode attention: cuts each layer's page tables into work items (plan_decode),
// copies them to the device (upload_decode_plan) and hands out per-layer device views.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/attention/decode.h"
#include "kernels/kv_page_layout.h"

namespace pmkv::kernels {

namespace {

constexpr int64_t kAlign = 256;

int64_t align_up(int64_t x) {
  return (x + kAlign - 1) / kAlign * kAlign;
}

int32_t tiles_of(int32_t tokens) {
  return (tokens + kDecodeTileTokens - 1) / kDecodeTileTokens;
}

// A maximal run of one sequence's visible tiles whose pages share one bit-width.
struct Run {
  int32_t seq;
  int32_t bits;
  int32_t page;      // CSR index of the first page
  int32_t tile;      // first visible tile in it
  int32_t page_pos;  // sequence position of that page's first token
  int32_t num_tiles;
  int32_t window_start;
};

void check(bool ok, const char* what) {  // const char*: no string built on the hot path
  if (!ok) throw std::invalid_argument(std::string("plan_decode: ") + what);
}

// Appends the runs of one layer; returns the KV bytes of one KV head over all of them.
int64_t collect_runs(const DecodePlanConfig& cfg, const DecodeLayerTable& t,
                     std::vector<Run>& runs) {
  const kv::PageGeometry g{cfg.num_kv_heads, cfg.head_dim, cfg.tokens16};
  int64_t bytes = 0;
  for (int32_t s = 0; s < t.num_seqs; ++s) {
    const int32_t begin = t.page_starts[s], end = t.page_starts[s + 1];
    check(begin <= end, "page_starts not monotone");
    int64_t total = 0;
    for (int32_t i = begin; i < end; ++i) {
      check(kv::is_valid_bits(t.page_bits[i]), "page bits not in {16, 8, 4, 2}");
      check(t.page_tokens[i] >= 0 && t.page_tokens[i] <= kv::tokens_per_page(g, t.page_bits[i]),
            "page tokens above the page's capacity");
      total += t.page_tokens[i];
    }
    const int64_t w0 =
        cfg.sliding_window > 0 ? std::max<int64_t>(0, total - cfg.sliding_window) : 0;
    int32_t pos = 0;
    Run* open = nullptr;
    for (int32_t i = begin; i < end; ++i) {
      const int32_t n = t.page_tokens[i], bits = t.page_bits[i];
      const int32_t page_pos = pos;
      pos += n;
      if (n == 0 || pos <= w0) continue;  // empty, or entirely before the window
      const int32_t first_tile =
          w0 > page_pos ? static_cast<int32_t>((w0 - page_pos) / kDecodeTileTokens) : 0;
      const int32_t tiles = tiles_of(n) - first_tile;
      if (open == nullptr || open->bits != bits) {
        runs.push_back({s, bits, i, first_tile, page_pos, 0, static_cast<int32_t>(w0)});
        open = &runs.back();
      }
      open->num_tiles += tiles;
      bytes += int64_t{tiles} * kDecodeTileTokens * 2 * (kv::row_bytes(cfg.head_dim, bits) + 8);
    }
  }
  return bytes;
}

// Moves (page, tile, page_pos) on by `n` tiles. With `more` (a tile follows in the run), it then
// steps past ends of pages and empty pages so that it names that tile; without, it stops at the
// end.
void walk(const DecodeLayerTable& t, int32_t n, bool more, int32_t& page, int32_t& tile,
          int32_t& page_pos) {
  tile += n;
  while (tile > tiles_of(t.page_tokens[page]) || (more && tile == tiles_of(t.page_tokens[page]))) {
    tile -= tiles_of(t.page_tokens[page]);
    page_pos += t.page_tokens[page];
    ++page;
  }
}

// Splits `run` into `n` items of balanced tile counts, each cut into per-warp ranges.
void split_run(const Run& run, int32_t n, const DecodeLayerTable& t,
               std::vector<DecodeWorkItem>& items) {
  int32_t page = run.page, tile = run.tile, page_pos = run.page_pos;
  int32_t left = run.num_tiles;
  for (int32_t k = 0; k < n; ++k) {
    const int32_t count = run.num_tiles / n + (k < run.num_tiles % n ? 1 : 0);
    DecodeWorkItem it{};
    it.seq = run.seq;
    it.bits = run.bits;
    it.num_tiles = count;
    // Tokens of the item's first tile before the window start (only the sequence's first item).
    it.lo_first = std::max(0, run.window_start - (page_pos + tile * kDecodeTileTokens));
    int32_t last_page = page;
    for (int w = 0; w < kDecodeWarps; ++w) {
      const int32_t c = count / kDecodeWarps + (w < count % kDecodeWarps ? 1 : 0);
      it.warp_page[w] = page;
      it.warp_tile[w] = tile;
      it.warp_tiles[w] = c;
      if (c > 0) {
        int32_t p = page, tl = tile, pp = page_pos;
        walk(t, c - 1, true, p, tl, pp);  // the range's last tile
        last_page = p;
        left -= c;
        walk(t, c, left > 0, page, tile, page_pos);
      }
    }
    it.page_end = last_page + 1;
    items.push_back(it);
  }
}

}  // namespace

void plan_decode(const DecodePlanConfig& cfg, std::span<const DecodeLayerTable> layers,
                 DecodePlan* plan) {
  check(cfg.num_kv_heads > 0 && cfg.tokens16 > 0, "num_kv_heads and tokens16 must be positive");
  check(cfg.group >= 1 && cfg.group <= kDecodeMaxGroup, "group must be in [1, 8]");
  check(cfg.head_dim == 64 || cfg.head_dim == 128, "head_dim must be 64 or 128");
  check(cfg.num_sms > 0 && cfg.ctas_per_sm >= 0, "num_sms must be positive");
  plan->items.clear();
  plan->merges.clear();
  plan->layers.clear();
  plan->bit_items.clear();
  plan->num_kv_heads = cfg.num_kv_heads;
  plan->group = cfg.group;
  plan->head_dim = cfg.head_dim;
  plan->max_layer_items = 0;
  std::vector<Run> runs;
  for (const DecodeLayerTable& t : layers) {
    runs.clear();
    collect_runs(cfg, t, runs);
    // Each bit-width is its own launch: one wave of CTAs of about equal KV bytes per launch, never
    // smaller than min_item_bytes.
    int64_t bits_bytes[4] = {};
    for (const Run& run : runs) {
      bits_bytes[decode_bits_index(run.bits)] += int64_t{run.num_tiles} * kDecodeTileTokens * 2 *
                                                 (kv::row_bytes(cfg.head_dim, run.bits) + 8);
    }
    int64_t chunk_of[4];
    for (int b = 0; b < 4; ++b) {
      const int per_sm = cfg.ctas_per_sm > 0 ? cfg.ctas_per_sm : decode_ctas_per_sm(16 >> b);
      const int64_t target_ctas = int64_t{cfg.num_sms} * per_sm;
      chunk_of[b] = std::max<int64_t>(
          cfg.min_item_bytes, (bits_bytes[b] * cfg.num_kv_heads + target_ctas - 1) / target_ctas);
    }
    DecodeLayerPlan lp;
    lp.item_begin = static_cast<int32_t>(plan->items.size());
    lp.merge_begin = static_cast<int32_t>(plan->merges.size());
    size_t r = 0;
    for (int32_t s = 0; s < t.num_seqs; ++s) {
      const int32_t first = static_cast<int32_t>(plan->items.size());
      for (; r < runs.size() && runs[r].seq == s; ++r) {
        const Run& run = runs[r];
        const int64_t run_bytes = int64_t{run.num_tiles} * kDecodeTileTokens * 2 *
                                  (kv::row_bytes(cfg.head_dim, run.bits) + 8);
        const int64_t chunk = chunk_of[decode_bits_index(run.bits)];
        const int64_t n = std::clamp<int64_t>((run_bytes + chunk - 1) / chunk, 1, run.num_tiles);
        split_run(run, static_cast<int32_t>(n), t, plan->items);
      }
      const int32_t count = static_cast<int32_t>(plan->items.size()) - first;
      if (count == 1) {
        plan->items.back().direct = 1;
      } else {
        plan->merges.push_back({s, first - lp.item_begin, count, 0});
      }
    }
    lp.num_items = static_cast<int32_t>(plan->items.size()) - lp.item_begin;
    for (int b = 0; b < 4; ++b) {
      lp.bits_begin[b] = static_cast<int32_t>(plan->bit_items.size());
      for (int32_t i = 0; i < lp.num_items; ++i) {
        if (decode_bits_index(plan->items[lp.item_begin + i].bits) == b)
          plan->bit_items.push_back(i);
      }
      lp.bits_count[b] = static_cast<int32_t>(plan->bit_items.size()) - lp.bits_begin[b];
    }
    lp.num_merges = static_cast<int32_t>(plan->merges.size()) - lp.merge_begin;
    plan->max_layer_items = std::max(plan->max_layer_items, lp.num_items);
    plan->layers.push_back(lp);
  }
  const int64_t items_bytes = align_up(int64_t(plan->items.size()) * sizeof(DecodeWorkItem));
  const int64_t merges_bytes = align_up(int64_t(plan->merges.size()) * sizeof(DecodeMergeItem));
  const int64_t bit_items_bytes = align_up(int64_t(plan->bit_items.size()) * sizeof(int32_t));
  const int64_t slots = int64_t{plan->max_layer_items} * cfg.num_kv_heads * cfg.group;
  plan->partials_offset = items_bytes + merges_bytes + bit_items_bytes;
  plan->workspace_bytes = plan->partials_offset + align_up(slots * int64_t(sizeof(float))) +
                          align_up(slots * cfg.head_dim * int64_t(sizeof(float)));
}

cudaError_t upload_decode_plan(const DecodePlan& plan, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream) {
  if (workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
  auto* base = static_cast<char*>(workspace);
  const size_t items_bytes = plan.items.size() * sizeof(DecodeWorkItem);
  const size_t merges_bytes = plan.merges.size() * sizeof(DecodeMergeItem);
  if (items_bytes > 0) {
    const cudaError_t e =
        cudaMemcpyAsync(base, plan.items.data(), items_bytes, cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return e;
  }
  if (merges_bytes > 0) {
    const cudaError_t e = cudaMemcpyAsync(base + align_up(int64_t(items_bytes)), plan.merges.data(),
                                          merges_bytes, cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return e;
  }
  const size_t bit_items_bytes = plan.bit_items.size() * sizeof(int32_t);
  if (bit_items_bytes > 0) {
    return cudaMemcpyAsync(base + align_up(int64_t(items_bytes)) + align_up(int64_t(merges_bytes)),
                           plan.bit_items.data(), bit_items_bytes, cudaMemcpyHostToDevice, stream);
  }
  return cudaSuccess;
}

void pack_decode_plan(const DecodePlan& plan, void* dst) {
  auto* base = static_cast<char*>(dst);
  const int64_t items_bytes = align_up(int64_t(plan.items.size()) * sizeof(DecodeWorkItem));
  const int64_t merges_bytes = align_up(int64_t(plan.merges.size()) * sizeof(DecodeMergeItem));
  if (!plan.items.empty()) {
    std::memcpy(base, plan.items.data(), plan.items.size() * sizeof(DecodeWorkItem));
  }
  if (!plan.merges.empty()) {
    std::memcpy(base + items_bytes, plan.merges.data(),
                plan.merges.size() * sizeof(DecodeMergeItem));
  }
  if (!plan.bit_items.empty()) {
    std::memcpy(base + items_bytes + merges_bytes, plan.bit_items.data(),
                plan.bit_items.size() * sizeof(int32_t));
  }
}

DecodeLayerView decode_layer_view(const DecodePlan& plan, void* workspace, int layer) {
  const DecodeLayerPlan& lp = plan.layers.at(static_cast<size_t>(layer));
  auto* base = static_cast<char*>(workspace);
  const int64_t items_bytes = align_up(int64_t(plan.items.size()) * sizeof(DecodeWorkItem));
  const int64_t slots = int64_t{plan.max_layer_items} * plan.num_kv_heads * plan.group;
  DecodeLayerView v;
  v.items = reinterpret_cast<const DecodeWorkItem*>(base) + lp.item_begin;
  v.num_items = lp.num_items;
  v.merges = reinterpret_cast<const DecodeMergeItem*>(base + items_bytes) + lp.merge_begin;
  v.num_merges = lp.num_merges;
  const int64_t merges_bytes = align_up(int64_t(plan.merges.size()) * sizeof(DecodeMergeItem));
  const auto* bit_items = reinterpret_cast<const int32_t*>(base + items_bytes + merges_bytes);
  for (int b = 0; b < 4; ++b) {
    v.bit_items[b] = bit_items + lp.bits_begin[b];
    v.bit_count[b] = lp.bits_count[b];
  }
  v.partial_lse = reinterpret_cast<float*>(base + plan.partials_offset);
  v.partial_o = reinterpret_cast<float*>(base + plan.partials_offset +
                                         align_up(slots * int64_t(sizeof(float))));
  return v;
}

}  // namespace pmkv::kernels
