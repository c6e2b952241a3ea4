// Host side of decode attention: cuts each layer's page tables into work items (plan_decode),
// copies them to the device (upload_decode_plan) and hands out per-layer device views.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

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

[[noreturn]] __attribute__((noinline)) void fail(const char* what) {
  throw std::invalid_argument(std::string("plan_decode: ") + what);
}

// Inlined, with the throw out of line: it runs per page.
inline void check(bool ok, const char* what) {
  if (!ok) [[unlikely]]
    fail(what);
}

// Appends the runs of one layer. This and split_run are the plan's cost: a long-context batch
// has ~10^6 pages per step, so the per-page work is a table lookup and a few compares (one pass
// without a sliding window, two with one: the window's start needs the sequence's length).
void collect_runs(const DecodePlanConfig& cfg, const DecodeLayerTable& t, std::vector<Run>& runs) {
  const kv::PageGeometry g{cfg.num_kv_heads, cfg.head_dim, cfg.tokens16};
  int32_t capacity[17] = {};  // by bits; 0 for bit-widths that do not exist
  for (int b = 2; b <= 16; b *= 2)
    capacity[b] = kv::tokens_per_page(g, b);
  const auto check_page = [&](int32_t bits, int32_t n) {
    check(bits >= 0 && bits <= 16 && capacity[bits] > 0, "page bits not in {16, 8, 4, 2}");
    check(n >= 0 && n <= capacity[bits], "page tokens above the page's capacity");
  };
  for (int32_t s = 0; s < t.num_seqs; ++s) {
    const int32_t begin = t.page_starts[s], end = t.page_starts[s + 1];
    check(begin <= end, "page_starts not monotone");
    int64_t w0 = 0;
    if (cfg.sliding_window > 0) {
      int64_t total = 0;
      for (int32_t i = begin; i < end; ++i) {
        check_page(t.page_bits[i], t.page_tokens[i]);
        total += t.page_tokens[i];
      }
      w0 = std::max<int64_t>(0, total - cfg.sliding_window);
    }
    int32_t pos = 0;
    Run* open = nullptr;
    for (int32_t i = begin; i < end; ++i) {
      const int32_t n = t.page_tokens[i], bits = t.page_bits[i];
      if (cfg.sliding_window <= 0) check_page(bits, n);
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
    }
  }
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
    const int warps = decode_warps(run.bits);
    for (int w = 0; w < warps; ++w) {
      const int32_t c = count / warps + (w < count % warps ? 1 : 0);
      it.warp_page[w] = page;
      it.warp_tile[w] = tile;
      it.warp_tiles[w] = c;
      if (c > 0) {
        walk(t, c - 1, true, page, tile, page_pos);  // to the range's last tile
        last_page = page;
        left -= c;
        walk(t, 1, left > 0, page, tile, page_pos);  // past it: one walk over the pages, not two
      }
    }
    it.page_end = last_page + 1;
    items.push_back(it);
  }
}

}  // namespace

namespace {

// One way to cut a launch's runs into items: the item size asked for, the wave model's time, the
// CTAs, the largest item and what the merge adds (0: no run cut).
struct Cut {
  int64_t chunk, time, ctas, largest, merge;
};

// The item size (KV bytes of one head) for one launch's runs. A launch of C CTAs on R resident
// slots takes about ceil(C / R) waves, each as long as its largest item plus a fixed cost (the
// query load, the pipeline filling, the epilogue: about `overhead` bytes' worth, measured as 8
// tiles). Cutting every run into items just big enough for one wave (the obvious choice) gives,
// for example, 64 sequences x 8 KV heads = 512 CTAs on 396 slots: 1.29 waves of work in the time
// of 2 (16-bit pages at batch 64, 16K tokens: 83% of copy bandwidth, 91% cut in 4 full waves). So
// candidates that fill m = 1..8 waves are scored by waves x (largest item + overhead), and the
// fastest wins (fewer CTAs on ties: each item costs a partial state and a merge). More than one
// wave only with items of >= min_multiwave bytes (128 tiles): a partial last wave costs less than
// a full one (its CTAs share the SMs and the bandwidth with fewer others), so the model overrates
// cutting short runs finer; measured on the H200, batch 64 x 1K tokens lost 20-60% that way.
// A cut that splits any run also pays `merge_cost` (its sequences wait for a merge) plus
// `merge_item_cost` per item of its most-cut run (the merging CTA reads and weighs each item's
// partial state): without them the model cut short runs at small batches, where one item a run
// was 10-28% faster (2 and 4 bits at batch 16 x 256-1K tokens, batch 1 up to ~1K), and filled a
// wave at batch 1 x 4K, where 12-16 items were 14-19% faster than 20-33 (bench/RESULTS.md,
// sixteenth session). One item for every run, and the longest run in n = 2..24 items, are
// candidates too.
Cut choose_chunk(const std::vector<int64_t>& run_bytes, const std::vector<int32_t>& run_tiles,
                 int32_t kv_heads, int64_t resident, int64_t min_item, int64_t overhead,
                 int64_t min_multiwave, int64_t merge_cost, int64_t merge_item_cost) {
  if (run_bytes.empty()) return Cut{min_item, 0, 0, 0, 0};
  int64_t total = 0, longest = 0;
  for (int64_t b : run_bytes) {
    total += b;
    longest = std::max(longest, b);
  }
  // ceil(b / c) in double: exact for integers below 2^53 (a correctly rounded quotient of two
  // exact integers is an integer only when the division is exact), and 64-bit integer divisions
  // cost several times more; evaluate() runs ~24 times per launch over every run of a layer.
  const auto evaluate = [&](int64_t chunk) {
    chunk = std::max(chunk, min_item);
    const double c = static_cast<double>(chunk);
    int64_t items = 0, largest = 0, most = 1;
    for (size_t i = 0; i < run_bytes.size(); ++i) {
      const double b = static_cast<double>(run_bytes[i]);
      const int64_t n =
          std::clamp<int64_t>(static_cast<int64_t>(std::ceil(b / c)), 1, run_tiles[i]);
      items += n;
      most = std::max(most, n);
      largest = std::max(largest, static_cast<int64_t>(std::ceil(b / static_cast<double>(n))));
    }
    const int64_t ctas = items * kv_heads;
    const int64_t merge = most > 1 ? merge_cost + merge_item_cost * most : 0;
    return Cut{chunk, (ctas + resident - 1) / resident * (largest + overhead) + merge, ctas,
               largest, merge};
  };
  Cut best = evaluate((total * kv_heads + resident - 1) / resident);
  const auto consider = [&](const Cut& c) {
    if (c.ctas > resident && c.largest < min_multiwave) return;
    if (c.time < best.time || (c.time == best.time && c.ctas < best.ctas)) best = c;
  };
  consider(evaluate(longest));  // one item a run: no merge
  // Fewer CTAs than one wave's slots: the longest run in n items. With a merge cost that grows
  // with the items, a launch with few sequences (batch 1) is fastest well short of filling the GPU.
  // (Only where one item a run leaves slots free: the batches that are latency-bound.)
  if (static_cast<int64_t>(run_bytes.size()) * kv_heads < resident) {
    for (const int64_t n : {2, 3, 4, 6, 8, 12, 16, 24})
      consider(evaluate((longest + n - 1) / n));
  }
  for (int64_t m = 1; m <= 8; ++m) {
    const int64_t slots = m * resident;
    const Cut c = evaluate((total * kv_heads + slots - 1) / slots);
    consider(c);
    // Per-run rounding overflowed the m waves: grow the items until it fits (two refinements).
    Cut d = c;
    for (int k = 0; k < 2 && d.ctas > slots; ++k) {
      d = evaluate((d.chunk * d.ctas + slots - 1) / slots);
      consider(d);
    }
  }
  return best;
}

// Whether a launch of `runs` runs (longest: the longest's bytes) is faster on the dense variant
// with one item a run than on the default kernel cut as `cut` says. Measured on the H200 (bench/
// RESULTS.md, twenty-seventh session): an SM streams 2/4-bit pages at one rate with 3 or 4 CTAs
// resident, so what the dense variant changes is how many CTAs one wave holds. Where one item a
// sequence fits a dense wave and not a default one (batch 56 / 64 x 8 KV heads on 132 SMs) it won
// where the default plan cut the runs into several waves of items (64 x 16K: 3.5-6%) or ran one
// item a run in 1.3 waves (56-64 x 4K at 4 bits: 13-17%), and lost where the default plan's items
// spread evenly (56 x 16K). Both sides are timed as the busiest SM's load, ceil(CTAs / SMs)
// items of the launch's largest (plus the fixed cost an item, plus the merge of a cut): a tie
// (one item a run either way) goes dense, whose CTAs are all resident at once.
bool dense_pays(int64_t runs, int64_t longest, const Cut& cut, int32_t kv_heads, int32_t num_sms,
                int bits, int64_t overhead) {
  const int64_t ctas = runs * kv_heads;
  if (ctas <= int64_t{num_sms} * decode_ctas_per_sm(bits) ||
      ctas > int64_t{num_sms} * decode_dense_ctas_per_sm(bits)) {
    return false;
  }
  const auto load = [&](int64_t n, int64_t largest) {
    return (n + num_sms - 1) / num_sms * (largest + overhead);
  };
  return load(ctas, longest) <= load(cut.ctas, cut.largest) + cut.merge;
}

// One layer's plan with layer-relative offsets (item_begin, merge_begin, bits_begin at 0).
struct LayerPart {
  std::vector<DecodeWorkItem> items;
  std::vector<DecodeMergeItem> merges;
  std::vector<int32_t> bit_items;
  DecodeLayerPlan lp;
  uint32_t dense_mask = 0;  // see DecodePlan::dense_mask
  std::exception_ptr error;
};

// Whether layer t is layer p moved by a constant number of pages: as many sequences, every
// sequence's pages `*delta` CSR positions after p's, with the same bit-widths and token counts.
// plan_layer reads nothing else, so t's plan is then p's with every page index moved by *delta
// (byte for byte what planning t gives; an invalid p is invalid t alike).
bool same_shape(const DecodeLayerTable& p, const DecodeLayerTable& t, int32_t* delta) {
  if (p.num_seqs != t.num_seqs) return false;
  const int32_t S = p.num_seqs;
  const int32_t d = S > 0 ? t.page_starts[0] - p.page_starts[0] : 0;
  for (int32_t s = 0; s <= S; ++s) {
    if (t.page_starts[s] - p.page_starts[s] != d) return false;
  }
  for (int32_t s = 0; s < S; ++s) {  // CSR ranges; compared per sequence (no layout assumed)
    const int32_t b = p.page_starts[s], n = p.page_starts[s + 1] - b;
    if (n < 0) return false;  // invalid: left to plan_layer's checks
    const size_t bytes = static_cast<size_t>(n) * sizeof(int32_t);
    if (std::memcmp(p.page_bits + b, t.page_bits + b + d, bytes) != 0 ||
        std::memcmp(p.page_tokens + b, t.page_tokens + b + d, bytes) != 0) {
      return false;
    }
  }
  *delta = d;
  return true;
}

// Moves every page index of a layer's plan by `d` (items only: merges and per-bits lists hold
// layer-relative item indices).
void move_pages(LayerPart& part, int32_t d) {
  for (DecodeWorkItem& it : part.items) {
    it.page_end += d;
    for (int w = 0; w < decode_warps(it.bits); ++w)
      it.warp_page[w] += d;
  }
}

void plan_layer(const DecodePlanConfig& cfg, const DecodeLayerTable& t, LayerPart& out) {
  std::vector<Run> runs;
  collect_runs(cfg, t, runs);
  // Each bit-width is its own launch; its runs are cut into items of about `chunk` KV bytes (never
  // smaller than min_item_bytes), chunk chosen per launch by choose_chunk.
  std::vector<int64_t> bytes_of[4];
  std::vector<int32_t> tiles_of_bits[4];
  for (const Run& run : runs) {
    const int b = decode_bits_index(run.bits);
    bytes_of[b].push_back(int64_t{run.num_tiles} * kDecodeTileTokens * 2 *
                          (kv::row_bytes(cfg.head_dim, run.bits) + kv::param_bytes(run.bits)));
    tiles_of_bits[b].push_back(run.num_tiles);
  }
  int64_t chunk_of[4];
  for (int b = 0; b < 4; ++b) {
    const int per_sm = cfg.ctas_per_sm > 0 ? cfg.ctas_per_sm : decode_ctas_per_sm(16 >> b);
    const int64_t tile_bytes = int64_t{kDecodeTileTokens} * 2 *
                               (kv::row_bytes(cfg.head_dim, 16 >> b) + kv::param_bytes(16 >> b));
    const int64_t item_cost = 8 * tile_bytes;  // an item's fixed cost (choose_chunk)
    const auto chunk_for = [&](int ctas_per_sm) {
      return choose_chunk(bytes_of[b], tiles_of_bits[b], cfg.num_kv_heads,
                          int64_t{cfg.num_sms} * ctas_per_sm, cfg.min_item_bytes, item_cost,
                          128 * tile_bytes, cfg.merge_cost_bytes, cfg.merge_item_cost_bytes);
    };
    Cut cut = chunk_for(per_sm);
    // Short items: plan for one CTA an SM fewer than the kernel keeps resident (16 bits: 1 of 2;
    // 4 and 2 bits: 2 of 3; 8 bits run one 8-warp CTA an SM, decode.h). The wave model counts every
    // resident CTA as a full-speed slot, but co-resident CTAs share the SM's issue slots (2/4 bits
    // are SM-bound) or its bandwidth share, while each item pays a fixed cost (query, first tiles,
    // epilogue, merge: ~5-9 us on an H200, bench/RESULTS.md): for items of fewer than short_tiles
    // tiles, fewer, longer items won (batch 16 x 1K-4K and 64 x 4K: 2-14% faster); for longer ones
    // the extra CTA's latency hiding wins (16 x 16K-64K: 3-7% slower without it). 8 bits as 3 CTAs
    // of 4 warps (the PMKV_DECODE_WARPS8=4 build), nearer the bandwidth bound, lost at 64 x 4K
    // (128-tile items, +6%) and won at 16 x 1K-4K (21-85 tiles): half the bound.
    const int64_t short_tiles = (16 >> b) == 8 ? 128 : 256;
    if (cfg.ctas_per_sm == 0 && per_sm > 1 && cut.chunk < short_tiles * tile_bytes) {
      cut = chunk_for(per_sm - 1);
    }
    chunk_of[b] = cut.chunk;
    // The dense variant (DecodePlanConfig::dense): one item a run.
    using Dense = DecodePlanConfig::Dense;
    if (cfg.ctas_per_sm == 0 && cfg.group <= 4 && decode_dense_ctas_per_sm(16 >> b) > 0 &&
        !bytes_of[b].empty() && cfg.dense != Dense::kNever) {
      const int64_t longest = *std::max_element(bytes_of[b].begin(), bytes_of[b].end());
      if (cfg.dense == Dense::kAlways ||
          dense_pays(static_cast<int64_t>(bytes_of[b].size()), longest, cut, cfg.num_kv_heads,
                     cfg.num_sms, 16 >> b, item_cost)) {
        chunk_of[b] = longest;
        out.dense_mask |= 1u << b;
      }
    }
  }
  std::vector<DecodeWorkItem>& items = out.items;
  DecodeLayerPlan& lp = out.lp;
  size_t r = 0;
  for (int32_t s = 0; s < t.num_seqs; ++s) {
    const int32_t first = static_cast<int32_t>(items.size());
    for (; r < runs.size() && runs[r].seq == s; ++r) {
      const Run& run = runs[r];
      const int64_t run_bytes = int64_t{run.num_tiles} * kDecodeTileTokens * 2 *
                                (kv::row_bytes(cfg.head_dim, run.bits) + kv::param_bytes(run.bits));
      const int64_t chunk = chunk_of[decode_bits_index(run.bits)];
      const int64_t n = std::clamp<int64_t>((run_bytes + chunk - 1) / chunk, 1, run.num_tiles);
      split_run(run, static_cast<int32_t>(n), t, items);
    }
    const int32_t count = static_cast<int32_t>(items.size()) - first;
    if (count == 0) {  // no visible token: an empty item whose CTAs write zeros
      DecodeWorkItem it{};
      it.seq = s;
      it.bits = 16;
      it.direct = 1;
      it.page_end = t.page_starts[s];
      for (int w = 0; w < decode_warps(it.bits); ++w)
        it.warp_page[w] = t.page_starts[s];
      items.push_back(it);
    } else if (count == 1) {
      items.back().direct = 1;
    } else {
      const int32_t m = static_cast<int32_t>(out.merges.size());
      for (int32_t i = first; i < first + count; ++i)
        items[i].merge = m;
      out.merges.push_back({s, first, count, 0});
    }
  }
  lp.num_items = static_cast<int32_t>(items.size());
  for (int b = 0; b < 4; ++b) {
    lp.bits_begin[b] = static_cast<int32_t>(out.bit_items.size());
    for (int32_t i = 0; i < lp.num_items; ++i) {
      if (decode_bits_index(items[i].bits) == b) out.bit_items.push_back(i);
    }
    lp.bits_count[b] = static_cast<int32_t>(out.bit_items.size()) - lp.bits_begin[b];
  }
  lp.num_merges = static_cast<int32_t>(out.merges.size());
}

}  // namespace

void plan_decode(const DecodePlanConfig& cfg, std::span<const DecodeLayerTable> layers,
                 DecodePlan* plan, const DecodeParallelFor& parallel_for) {
  check(cfg.num_kv_heads > 0 && cfg.tokens16 > 0, "num_kv_heads and tokens16 must be positive");
  check(cfg.group >= 1 && cfg.group <= kDecodeMaxGroup, "group must be in [1, 8]");
  check(cfg.head_dim == 64 || cfg.head_dim == 128, "head_dim must be 64 or 128");
  check(cfg.num_sms > 0 && cfg.ctas_per_sm >= 0, "num_sms must be positive");
  check(cfg.merge_cost_bytes >= 0 && cfg.merge_item_cost_bytes >= 0,
        "merge_cost_bytes and merge_item_cost_bytes must be >= 0");
  // Layers are planned independently (on the caller's threads when it gives parallel_for), then
  // concatenated in layer order. A layer shaped like the one before it takes that layer's plan
  // with its page indices moved (see same_shape): checking costs a compare of the tables, planning
  // a walk over them, and the layers of a uniformly configured cache are all alike.
  const int num_layers = static_cast<int>(layers.size());
  const auto run = [&](int n, const std::function<void(int)>& body) {
    if (parallel_for && n > 1) {
      parallel_for(n, body);
    } else {
      for (int i = 0; i < n; ++i)
        body(i);
    }
  };
  std::vector<int32_t> shift(layers.size(), 0);  // layer l = layer l - 1 moved by shift[l] pages
  std::vector<char> alike(layers.size(), 0);
  run(num_layers - 1,
      [&](int i) { alike[i + 1] = same_shape(layers[i], layers[i + 1], &shift[i + 1]) ? 1 : 0; });
  std::vector<int> source(layers.size());  // the planned layer whose plan layer l reuses
  std::vector<int> planned;
  for (int l = 0; l < num_layers; ++l) {
    if (l > 0 && alike[l]) {
      source[l] = source[l - 1];
      shift[l] += shift[l - 1];  // now relative to the source
    } else {
      source[l] = l;
      shift[l] = 0;
      planned.push_back(l);
    }
  }
  std::vector<LayerPart> parts(layers.size());
  run(static_cast<int>(planned.size()), [&](int i) {
    const int l = planned[i];
    try {
      plan_layer(cfg, layers[l], parts[l]);
    } catch (...) {
      parts[l].error = std::current_exception();
    }
  });
  for (const int l : planned) {
    if (parts[l].error) std::rethrow_exception(parts[l].error);
  }
  run(num_layers, [&](int l) {
    if (source[l] == l) return;
    parts[l] = parts[source[l]];
    move_pages(parts[l], shift[l]);
  });
  plan->items.clear();
  plan->merges.clear();
  plan->layers.clear();
  plan->bit_items.clear();
  plan->num_kv_heads = cfg.num_kv_heads;
  plan->group = cfg.group;
  plan->head_dim = cfg.head_dim;
  plan->max_layer_items = 0;
  plan->dense_mask = 0;
  for (const LayerPart& part : parts) {
    plan->dense_mask |= part.dense_mask;
    DecodeLayerPlan lp = part.lp;
    lp.item_begin = static_cast<int32_t>(plan->items.size());
    lp.merge_begin = static_cast<int32_t>(plan->merges.size());
    for (int b = 0; b < 4; ++b)
      lp.bits_begin[b] += static_cast<int32_t>(plan->bit_items.size());
    plan->items.insert(plan->items.end(), part.items.begin(), part.items.end());
    plan->merges.insert(plan->merges.end(), part.merges.begin(), part.merges.end());
    plan->bit_items.insert(plan->bit_items.end(), part.bit_items.begin(), part.bit_items.end());
    plan->max_layer_items = std::max(plan->max_layer_items, lp.num_items);
    plan->layers.push_back(lp);
  }
  const DecodeWorkspaceLayout layout = decode_workspace_layout(*plan);
  plan->partials_offset = layout.partial_lse_offset;
  plan->workspace_bytes = layout.total_bytes;
}

DecodeCapacity decode_plan_sizes(const DecodePlan& plan) {
  return {static_cast<int32_t>(plan.layers.size()), static_cast<int32_t>(plan.items.size()),
          static_cast<int32_t>(plan.merges.size()), static_cast<int32_t>(plan.bit_items.size()),
          plan.max_layer_items};
}

DecodeWorkspaceLayout decode_workspace_layout(const DecodeCapacity& c, int32_t num_kv_heads,
                                              int32_t group, int32_t head_dim) {
  DecodeWorkspaceLayout w;
  w.capacity = c;
  w.num_kv_heads = num_kv_heads;
  w.group = group;
  w.head_dim = head_dim;
  w.layers_offset = 0;
  w.items_offset = w.layers_offset + align_up(int64_t{c.layers} * int64_t(sizeof(DecodeLayerPlan)));
  w.merges_offset = w.items_offset + align_up(int64_t{c.items} * int64_t(sizeof(DecodeWorkItem)));
  w.bit_items_offset =
      w.merges_offset + align_up(int64_t{c.merges} * int64_t(sizeof(DecodeMergeItem)));
  w.counters_offset = w.bit_items_offset + align_up(int64_t{c.bit_items} * 4);
  w.counters_bytes = int64_t{c.layer_items} * num_kv_heads * 4;  // a layer's merges <= its items
  w.partial_lse_offset = w.counters_offset + align_up(w.counters_bytes);
  const int64_t slots = int64_t{c.layer_items} * num_kv_heads * group;
  w.partial_o_offset = w.partial_lse_offset + align_up(slots * 4);
  w.tables_bytes = w.partial_lse_offset;
  w.total_bytes = w.partial_o_offset + align_up(slots * head_dim * 4);
  return w;
}

DecodeWorkspaceLayout decode_workspace_layout(const DecodePlan& plan) {
  return decode_workspace_layout(decode_plan_sizes(plan), plan.num_kv_heads, plan.group,
                                 plan.head_dim);
}

void pack_decode_plan(const DecodePlan& plan, const DecodeWorkspaceLayout& layout, void* dst) {
  check(layout.capacity.holds(decode_plan_sizes(plan)), "the workspace layout is too small");
  check(layout.num_kv_heads == plan.num_kv_heads && layout.group == plan.group &&
            layout.head_dim == plan.head_dim,
        "the workspace layout is for another shape");
  auto* base = static_cast<char*>(dst);
  auto put = [&](int64_t offset, const auto& v) {
    if (!v.empty()) std::memcpy(base + offset, v.data(), v.size() * sizeof(v[0]));
  };
  put(layout.layers_offset, plan.layers);
  put(layout.items_offset, plan.items);
  put(layout.merges_offset, plan.merges);
  put(layout.bit_items_offset, plan.bit_items);
  std::memset(base + layout.counters_offset, 0, static_cast<size_t>(layout.counters_bytes));
}

void pack_decode_plan(const DecodePlan& plan, void* dst) {
  pack_decode_plan(plan, decode_workspace_layout(plan), dst);
}

cudaError_t upload_decode_plan(const DecodePlan& plan, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream) {
  if (workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
  const DecodeWorkspaceLayout layout = decode_workspace_layout(plan);
  std::vector<char> host(static_cast<size_t>(layout.tables_bytes));
  pack_decode_plan(plan, layout, host.data());
  if (host.empty()) return cudaSuccess;
  return cudaMemcpyAsync(workspace, host.data(), host.size(), cudaMemcpyHostToDevice, stream);
}

DecodeLayerView decode_layer_view(const DecodeWorkspaceLayout& layout, void* workspace, int layer,
                                  const int32_t (&split_ctas)[4], uint32_t dense_mask) {
  check(layer >= 0 && layer < layout.capacity.layers, "layer out of range");
  auto* base = static_cast<char*>(workspace);
  DecodeLayerView v;
  v.layer = reinterpret_cast<const DecodeLayerPlan*>(base + layout.layers_offset) + layer;
  v.items = reinterpret_cast<const DecodeWorkItem*>(base + layout.items_offset);
  v.merges = reinterpret_cast<const DecodeMergeItem*>(base + layout.merges_offset);
  v.bit_items = reinterpret_cast<const int32_t*>(base + layout.bit_items_offset);
  v.merge_counters = reinterpret_cast<int32_t*>(base + layout.counters_offset);
  for (int b = 0; b < 4; ++b)
    v.split_ctas[b] = split_ctas[b];
  v.dense_mask = dense_mask;
  v.partial_lse = reinterpret_cast<float*>(base + layout.partial_lse_offset);
  v.partial_o = reinterpret_cast<float*>(base + layout.partial_o_offset);
  return v;
}

DecodeLayerView decode_layer_view(const DecodePlan& plan, void* workspace, int layer) {
  const DecodeLayerPlan& lp = plan.layers.at(static_cast<size_t>(layer));
  return decode_layer_view(decode_workspace_layout(plan), workspace, layer, lp.bits_count,
                           plan.dense_mask);
}

}  // namespace pmkv::kernels
