#pragma once
// Decode attention over mixed-bit KV pages (split-KV, "flash-decoding"): one query token per
// sequence, GQA, pages at 16/8/4/2 bits (kernels/kv_page_layout.h).
//
// Plan once per step, run per layer (FlashInfer's plan()/run() split):
//  1. plan_decode() (host, plain C++) reads every layer's host page table (CSR) and cuts each
//     sequence's pages into work items: a contiguous run of 16-token tiles whose pages all have
//     one bit-width, sized so that a launch fills the GPU. A sequence covered by one item writes
//     its output directly; the others get a merge entry.
//  2. upload_decode_plan() / pack_decode_plan() put the layer table, items, merge entries and
//     per-bits item lists of all layers into a device workspace.
//  3. Per layer, launch_decode() runs the split kernel once per bit-width present (CTAs over
//     (items of that bit-width, KV head), the kernel templated on the bits). A sequence cut into
//     several items is merged (log-sum-exp combine of the partial states of a (sequence, KV
//     head)'s items) by the CTA that finishes its last item, found with a counter per merge entry
//     and KV head that the merging CTA resets (no merge kernel, no launch between layers' work).
//     The kernels read the layer's counts from the device, so a launch of fixed size can be
//     captured in a CUDA graph and replayed for the next step's plan.
//
// Semantics (engine/backend/cpu/paged_attention.cpp, causal_attention with n = 1): the query of
// sequence s attends to every token of its page table (its own new token included), or only the
// last `sliding_window` of them. Softmax in fp32 with max subtraction. Requires: group
// (query heads per KV head) <= 8, head_dim in {64, 128}, every sequence has >= 1 token (a
// sequence with none gets zeros).
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "kernels/kernels_common.h"

namespace pmkv::kernels {

inline constexpr int kDecodeTileTokens = 16;  // tokens per tile (one mma K/N extent)
inline constexpr int kDecodeMaxGroup = 8;     // query heads per KV head a CTA can hold
inline constexpr int kDecodeMaxWarps = 8;     // warps a CTA can have; each walks its own tile range

// Warps per CTA of a bit-width's kernel: 8 bits run one CTA of 8 warps an SM, the others CTAs of 4
// (16 bits 2 an SM, 4 and 2 bits 3). Against 3 CTAs of 4 (same call, bench/RESULTS.md, ninth
// session) one 8-warp CTA made 8 bits 7-20% faster at batch 1 and 5-14% at batch 16 (a short
// item's fixed cost is paid once for twice the warps) and 7% slower at 64 x 1K (one CTA an SM no
// longer overlaps one item's epilogue with the next one's start). At 16 bits it was mixed: 16 x
// 16K-64K 2.5-4% faster, 16 x 4K 1.5% and 64 x 1K 17% slower, so 16 bits keep 4.
// PMKV_DECODE_WARPS16 and PMKV_DECODE_WARPS8: build-time knobs for A/B runs (4 or 8).
#ifndef PMKV_DECODE_WARPS16
#define PMKV_DECODE_WARPS16 4
#endif
#ifndef PMKV_DECODE_WARPS8
#define PMKV_DECODE_WARPS8 8
#endif
inline constexpr int decode_warps(int bits) {
  return bits == 16 ? PMKV_DECODE_WARPS16 : bits == 8 ? PMKV_DECODE_WARPS8 : 4;
}
static_assert((PMKV_DECODE_WARPS16 == 4 || PMKV_DECODE_WARPS16 == 8) &&
                  (PMKV_DECODE_WARPS8 == 4 || PMKV_DECODE_WARPS8 == 8),
              "4 or 8 warps");

// One CTA's work for one KV head (each bit-width's grid is [its items, num_kv_heads]): num_tiles
// consecutive 16-token tiles of one sequence whose pages all have one bit-width, cut into
// decode_warps(bits) contiguous ranges (one per warp) that the plan has already located in the
// page table; the entries past them are unused (zero tiles).
struct DecodeWorkItem {
  int32_t seq;        // sequence index
  int32_t bits;       // bit-width of every page in the item
  int32_t page_end;   // CSR index past the item's last page (bounds the page-info prefetch)
  int32_t lo_first;   // sliding window: tokens of warp 0's first tile before the window start
  int32_t direct;     // 1: the only item of its sequence: writes the output, no merge
  int32_t num_tiles;  // sum of warp_tiles; 0 only for a sequence with no visible token (zeros)
  int32_t merge;      // not direct: the sequence's merge entry (layer-relative)
  int32_t pad;
  int32_t warp_page[kDecodeMaxWarps];   // first page (index into the layer's CSR arrays)
  int32_t warp_tile[kDecodeMaxWarps];   // first tile inside that page
  int32_t warp_tiles[kDecodeMaxWarps];  // tiles of the warp's range (0: idle warp)
};

// Combines the partial states of items [item_begin, item_begin + num_items) (layer-relative
// indices, num_items >= 2) into the output rows of sequence `seq`: the split kernel's CTA that
// finishes the last of them (a counter per entry and KV head) does it.
struct DecodeMergeItem {
  int32_t seq;
  int32_t item_begin;
  int32_t num_items;
  int32_t pad;
};

struct DecodePlanConfig {
  int32_t num_kv_heads = 0;
  int32_t group = 0;  // query heads per KV head (num_heads = num_kv_heads * group)
  int32_t head_dim = 0;
  int32_t tokens16 = 0;        // tokens in a 16-bit page (kv::PageGeometry::tokens16)
  int32_t sliding_window = 0;  // 0: none; else only the last `sliding_window` tokens are visible
  int32_t num_sms = 132;       // cudaDeviceProp::multiProcessorCount
  // Resident CTAs an SM the plan counts on; 0: decode_ctas_per_sm(bits) per bit-width, one fewer
  // when the items come out short (decode_plan.cpp), or the dense variant where it pays (below).
  int32_t ctas_per_sm = 0;
  // The dense kernel variant of 2/4 bits (decode_dense_ctas_per_sm: 4 CTAs an SM, groups of at
  // most 4): kAuto takes it for a launch whose sequences, one item each, fit one dense wave and
  // not one of the default kernel, when that beats the default plan (decode_plan.cpp,
  // dense_pays); kNever / kAlways (tests, benchmarks: every 2/4-bit launch, one item a run).
  // Only with ctas_per_sm 0.
  enum class Dense { kAuto, kNever, kAlways };
  Dense dense = Dense::kAuto;
  int64_t min_item_bytes = 16 << 10;  // smallest item worth a CTA (KV bytes of one head)
  // What cutting a sequence into several items adds to a launch, in the plan's unit (KV bytes of
  // one head): the partial states, the fence and count, and the merging CTA's serial combine,
  // ~3-4 us on an H200 whatever the bit-width, which a CTA streams ~70-130 KB of one head in
  // (bench/RESULTS.md, sixteenth session).
  int64_t merge_cost_bytes = 96 << 10;
  // And per item of the most-cut run: the merging CTA reads and weighs every item's partial state
  // (at batch 1 x 4K, 4 bits, 33 items a head took 18.5 us, 16 items 14.9: bench/RESULTS.md).
  // Both 0: a split costs nothing beyond its items (the plan before the sixteenth session, but for
  // the extra candidates of small launches).
  int64_t merge_item_cost_bytes = 2 << 10;
};

// One layer's page table on the host, CSR over sequences: the pages of sequence s are
// [page_starts[s], page_starts[s + 1]), in token order.
struct DecodeLayerTable {
  int32_t num_seqs = 0;
  const int32_t* page_starts = nullptr;  // [num_seqs + 1]
  const int32_t* page_bits = nullptr;    // [num_pages] 16, 8, 4 or 2
  const int32_t* page_tokens = nullptr;  // [num_pages] valid tokens of each page (0..capacity)
};

// Index of a bit-width in the per-bits arrays below: 16 -> 0, 8 -> 1, 4 -> 2, 2 -> 3.
inline constexpr int decode_bits_index(int bits) {
  return bits == 16 ? 0 : bits == 8 ? 1 : bits == 4 ? 2 : 3;
}

struct DecodeLayerPlan {
  int32_t item_begin = 0;  // into DecodePlan::items
  int32_t num_items = 0;
  int32_t merge_begin = 0;  // into DecodePlan::merges
  int32_t num_merges = 0;
  int32_t bits_begin[4] = {};  // into DecodePlan::bit_items, per decode_bits_index
  int32_t bits_count[4] = {};
};

// Host plan of one step. Reuse one object across steps: plan_decode() clears and refills it.
struct DecodePlan {
  std::vector<DecodeWorkItem> items;    // all layers, layer after layer
  std::vector<DecodeMergeItem> merges;  // all layers
  std::vector<int32_t> bit_items;       // layer-relative item indices, grouped by bits per layer
  std::vector<DecodeLayerPlan> layers;  // [num_layers]
  int32_t num_kv_heads = 0;
  int32_t group = 0;
  int32_t head_dim = 0;
  int32_t max_layer_items = 0;  // partial slots: max_layer_items * num_kv_heads
  // Bit-widths (by decode_bits_index) whose launches take the dense variant: one set for the
  // step's layers (a layer planned without it runs correctly on it; a graph keys on one mask).
  uint32_t dense_mask = 0;
  int64_t workspace_bytes = 0;  // device workspace upload_decode_plan() needs
  int64_t partials_offset = 0;  // byte offset of the partial states in the workspace
};

// Runs body(0), ..., body(n - 1), in any order and on any threads (body is thread-safe across
// distinct indices and does not throw). Empty: a plain loop.
using DecodeParallelFor = std::function<void(int n, const std::function<void(int)>& body)>;

// Builds the plan (the layers independently, through parallel_for when given: the caller owns the
// threads). Throws std::invalid_argument on a bad config or table (bits not in {16, 8, 4, 2}, page
// tokens above the page's capacity, group > 8, head_dim not 64/128).
void plan_decode(const DecodePlanConfig& cfg, std::span<const DecodeLayerTable> layers,
                 DecodePlan* plan, const DecodeParallelFor& parallel_for = {});

// Table sizes a device workspace is laid out for. A plan fits a layout whose capacities are >= its
// sizes: the kernels read each layer's offsets and counts from the layer table on the device, so a
// CUDA-graph decode step keeps one layout (one set of pointers) across steps and only growth
// re-lays it out.
struct DecodeCapacity {
  int32_t layers = 0;
  int32_t items = 0;        // all layers
  int32_t merges = 0;       // all layers
  int32_t bit_items = 0;    // all layers (== items)
  int32_t layer_items = 0;  // the most items of one layer (partial-state slots)
  bool holds(const DecodeCapacity& need) const {
    return layers >= need.layers && items >= need.items && merges >= need.merges &&
           bit_items >= need.bit_items && layer_items >= need.layer_items;
  }
};
DecodeCapacity decode_plan_sizes(const DecodePlan& plan);

// Byte offsets in the workspace (each 256-byte aligned): the tables (layer table, items, merge
// entries, per-bits item lists, merge counters: `tables_bytes`, what one upload copies; the
// counters are packed as zeros and the kernels leave them zero), then the partial states (scratch
// of the kernels).
struct DecodeWorkspaceLayout {
  DecodeCapacity capacity;
  int32_t num_kv_heads = 0;
  int32_t group = 0;
  int32_t head_dim = 0;
  int64_t layers_offset = 0;
  int64_t items_offset = 0;
  int64_t merges_offset = 0;
  int64_t bit_items_offset = 0;
  int64_t counters_offset = 0;  // int32 [capacity.layer_items * num_kv_heads]
  int64_t counters_bytes = 0;
  int64_t partial_lse_offset = 0;
  int64_t partial_o_offset = 0;
  int64_t tables_bytes = 0;
  int64_t total_bytes = 0;
};
DecodeWorkspaceLayout decode_workspace_layout(const DecodeCapacity& capacity, int32_t num_kv_heads,
                                              int32_t group, int32_t head_dim);
// The layout of exactly this plan's sizes (plan.workspace_bytes == its total_bytes).
DecodeWorkspaceLayout decode_workspace_layout(const DecodePlan& plan);

// Copies the plan's tables into `workspace` (device, >= plan.workspace_bytes, 256-byte aligned),
// laid out for exactly its sizes; the partial-state area after them is scratch for
// launch_decode. The copy is a cudaMemcpyAsync from pageable host memory: it has finished reading
// `plan` when it returns.
cudaError_t upload_decode_plan(const DecodePlan& plan, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream);

// The same tables written into host memory at `dst` (layout.tables_bytes bytes) as `layout` places
// them: a caller that keeps a pinned staging buffer copies them with one truly asynchronous
// cudaMemcpyAsync (no stream sync, which a copy from pageable memory implies). Throws
// std::invalid_argument when the layout's capacity does not hold the plan.
void pack_decode_plan(const DecodePlan& plan, const DecodeWorkspaceLayout& layout, void* dst);
void pack_decode_plan(const DecodePlan& plan, void* dst);  // the plan's exact layout

// Device pointers of one layer's part of an uploaded plan. The kernels read the layer's counts and
// offsets from `layer` (device memory); the launch sizes are host values: a bit-width's launch has
// split_ctas[b] CTAs per KV head (0: not launched) and each CTA takes that bit-width's items
// blockIdx.x, blockIdx.x + gridDim.x, ... (fewer CTAs than items loop; more exit at once).
struct DecodeLayerView {
  const DecodeLayerPlan* layer = nullptr;   // this layer's entry of the layer table
  const DecodeWorkItem* items = nullptr;    // every layer's items (layer->item_begin: this one's)
  const DecodeMergeItem* merges = nullptr;  // every layer's merge entries
  const int32_t* bit_items = nullptr;       // every layer's per-bits item lists
  int32_t* merge_counters = nullptr;        // [merge entries * num_kv_heads], zero between launches
  int32_t split_ctas[4] = {};               // per decode_bits_index
  uint32_t dense_mask = 0;                  // DecodePlan::dense_mask (a host value, like the sizes)
  float* partial_lse = nullptr;  // [layer items * num_kv_heads, group] log2-sum-exp of a partial
  float* partial_o = nullptr;    // [layer items * num_kv_heads, group, head_dim] normalized output
};
// Exact launch sizes (one CTA per item) for a plan uploaded by upload_decode_plan or packed with
// its exact layout.
DecodeLayerView decode_layer_view(const DecodePlan& plan, void* workspace, int layer);
// Fixed launch sizes for a workspace laid out by `layout` (what a captured graph bakes in).
DecodeLayerView decode_layer_view(const DecodeWorkspaceLayout& layout, void* workspace, int layer,
                                  const int32_t (&split_ctas)[4], uint32_t dense_mask = 0);

struct DecodeParams {
  const void* pool = nullptr;  // page p starts at pool + p * page_bytes (256-byte aligned)
  int64_t page_bytes = 0;
  int32_t num_kv_heads = 0;
  int32_t group = 0;  // query heads per KV head; query head = kv_head * group + i
  int32_t head_dim = 0;
  int32_t tokens16 = 0;
  const int32_t* page_ids = nullptr;     // [num_pages] this layer's CSR page ids (device)
  const int32_t* page_tokens = nullptr;  // [num_pages] this layer's CSR token counts (device)
  DecodeLayerView plan;
  // [num_seqs, num_kv_heads * group, head_dim], q_dtype, contiguous, 16-byte aligned
  const void* q = nullptr;
  DType q_dtype = DType::kBF16;
  void* out = nullptr;  // [num_seqs, num_kv_heads * group, head_dim], out_dtype, contiguous
  DType out_dtype = DType::kBF16;
  float scale = 0.0f;  // softmax scale, usually 1/sqrt(head_dim)
  // Programmatic dependent launch (kernels/pdl.cuh; not on the legacy default stream): the
  // launches may start while the kernel before them runs; each CTA reads the plan and the page
  // tables (host-uploaded before the step: never written by a kernel) and waits before it touches
  // q, the pool, the partial states or the output. Off: a plain launch.
  bool pdl = false;
  // Which bit-widths' launches to make, by decode_bits_index (bit 0: 16 bits, 1: 8, 2: 4, 3: 2):
  // a caller may run the launches of one layer on different streams, since they share nothing
  // but the merge (whichever CTA arrives last at a sequence's merge does it, in item order).
  uint32_t bits_mask = 0xF;
};

// Resident split-kernel CTAs per SM the kernel for `bits` was built for (its register budget).
int decode_ctas_per_sm(int bits);
// The same for the dense variant of `bits` (4 and 2 bits), 0 where there is none.
int decode_dense_ctas_per_sm(int bits);

// Runs the split kernel (one launch per bit-width present) on `stream`. Returns the first CUDA
// error (launch configuration errors included); cudaErrorInvalidValue on unsupported shapes.
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream);

#ifdef PMKV_DECODE_TRACE
// The CTA-timeline probe (decode_kernel.cuh, builds with PMKV_DECODE_TRACE only): launches after
// this call write their CTAs' time stamps into `buffer` (device, kDecodeTraceSlots uint64 a CTA);
// null stops.
inline constexpr int kDecodeTraceSlots = 32;
void set_decode_trace(uint64_t* buffer);
#endif

}  // namespace pmkv::kernels
