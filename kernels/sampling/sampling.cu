// Token sampling, one CTA of 1024 threads per row. Mirrors engine/sampling/sampler.cpp step for
// step; see sampling.h for the contract. Outline of a row:
//  1. penalties on the row's history entries (IEEE ops in the CPU's order, written back);
//  2. greedy: one argmax pass, lowest id on ties (NaN as -inf), done;
//  3. otherwise one pass divides by the temperature (written back) and finds the maximum and
//     the number of candidates (logit > -inf); if the maximum is +inf, the candidates become
//     the +inf tokens with logit 0 (the CPU's uniform distribution over them);
//  4. top-k: radix selection (11 + 11 + 10 bits of an order-preserving key, shared-memory
//     histograms of counts) of the k-th largest logit; kept: logit >= it. For k <= 1024 it runs
//     over candidates (select_top): the k-th largest of the threads' maxima bounds it from
//     below, one pass gathers the logits at or above that bound (usually a few times k) into
//     shared memory, and the selection runs there; steps 5-8 then run over those candidates
//     sorted by id (bitonic), the same entries in the same order as over the row;
//  5. probabilities w = expf(logit - max) in [0, 1], as fixed-point integers m(w) = rn(w 2^40):
//     sums are exact and independent of the order of the atomics, so a row is deterministic;
//  6. top-p: the same radix selection over the bits of w (non-negative floats order as their
//     bits) weighted by m(w) finds the boundary probability tau: mass(w > tau) < target <=
//     mass(w >= tau), target = ceil(top_p * total); of the tokens tied at tau the ones with the
//     lowest ids are kept, as many as the CPU's (probability desc, id asc) order needs;
//  7. min-p: w >= min_p (the top token has w = 1);
//  8. draw: u from Philox (curand_init(seed, 0, offset), curand_uniform), r = ceil(u * kept mass);
//     the token is the first id whose inclusive prefix of kept mass reaches r (block scan over
//     per-thread contiguous chunks, then one warp rescans the chunk that holds r).
// The passes re-read the row (a 256K-token row is 1 MiB, L2 resident) and recompute w; nothing
// sorts, and no pass allocates: histograms, candidates and scan scratch live in 45 KB of shared
// memory.
// A row with log-probabilities first (step 0, on the raw logits) copies the row into its
// workspace slot if the steps above will rewrite it, takes the maximum, sums exp(l - max) in
// double (the CPU's logsumexp), and finds its top n with the same selection over order keys as
// top-k (count 1 per token; the tokens tied at the boundary are taken lowest id first); the n
// entries are sorted by one thread. The sampled token's log-probability is written with the token.
// Top-p without top-k stops its selection over the row after the first digit when the tokens at
// or above the boundary's digit fit in shared memory (a peaked distribution's nucleus), gathers
// them, and runs the rest among them like top-k's candidates.
// Cost per row of 128K logits on an H200 (bench_sampling, bench/RESULTS.md): greedy 8-9 us
// (twenty-fifth session), temperature 40-55 us, top-k 50 56 us, top-k 50 + top-p 0.95 72 us,
// top-p 0.9 alone 106 us (peaked logits) to 152 us (a flat nucleus of thousands of tokens),
// log-probabilities +40 us (the token's) or +77 us (top 5). Temperature rows cut into slices of
// a CTA each ran 14-25 us at 1-8 rows, but batch-1 decode lost 10-25 us a token end to end with
// them (bench/RESULTS.md, twenty-fifth session); not in this kernel.
#include <curand_kernel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/sampling/sampling.h"

namespace pmkv::kernels {

namespace {

using u64 = unsigned long long;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// Radix digits of the 32-bit keys, most significant first.
constexpr int kPasses = 3;
constexpr int kMaxBins = 2048;
// Fixed point of probabilities: w in [0, 1] -> rn(w * 2^40). A row's total is at most
// kMaxSamplingVocab * 2^40 = 2^62, so no sum overflows a u64.
constexpr float kFixedScale = 1099511627776.0f;  // 2^40
// Candidates of a top selection (select_top) kept in shared memory.
constexpr int kMaxCands = 2048;
static_assert(kThreads * 2 == kMaxBins, "the bin scan gives each thread two bins");

__device__ __forceinline__ float neg_inf() {
  return __int_as_float(0xff800000);
}
__device__ __forceinline__ float pos_inf() {
  return __int_as_float(0x7f800000);
}

struct Smem {
  // Per-digit mass of the selection pass as two 32-bit halves (hi:lo, the carries of lo counted
  // into hi): shared-memory atomics are native at 32 bits, a 64-bit add is a compare-and-swap
  // loop that contended bins make retry. Counting selections (kUnit) use lo alone.
  uint32_t mass_lo[kMaxBins];
  uint32_t mass_hi[kMaxBins];
  uint32_t cnt[kMaxBins];         // per-digit count (mass selections only)
  uint32_t thread_max[kThreads];  // select_top: each thread's largest key (0: none)
  uint32_t cand_key[kMaxCands];   // select_top: the candidates' keys and ids
  int32_t cand_id[kMaxCands];
  int32_t num_cands;
  u64 warp_u64[kWarps];
  double warp_f64[kWarps];
  float top_v[kMaxSamplingLogprobs];  // the top log-probability tokens (step 0)
  int32_t top_i[kMaxSamplingLogprobs];
  int32_t top_count;
  float warp_f[kWarps];
  int32_t warp_i[kWarps];
  // Broadcast slots, each written by one thread between two barriers.
  u64 sel_above;
  u64 sel_count_ge;
  u64 cross_base;
  uint32_t sel_bin;
  int32_t cross_owner;
  int32_t cross_found;
  int32_t last_in_hist;  // the row's unseen newest token has a history entry (penalties)
  float uniform;
};

static_assert(sizeof(Smem) <= 48 * 1024, "static shared memory of one CTA");

// ---- Block primitives. Each ends with a barrier so that its scratch can be reused at once. ----

__device__ __forceinline__ u64 warp_incl_scan(u64 x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const u64 y = __shfl_up_sync(kFull, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

// Exclusive prefix sum over the block in thread order; *total gets the block's sum.
__device__ u64 block_excl_scan(u64 x, u64* total, Smem& s) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const u64 incl = warp_incl_scan(x);
  if (lane == 31) s.warp_u64[warp] = incl;
  __syncthreads();
  if (warp == 0) s.warp_u64[lane] = warp_incl_scan(s.warp_u64[lane]);
  __syncthreads();
  const u64 before = warp == 0 ? 0ull : s.warp_u64[warp - 1];
  *total = s.warp_u64[kWarps - 1];
  __syncthreads();
  return before + incl - x;
}

__device__ u64 block_sum(u64 x, Smem& s) {
  u64 total;
  block_excl_scan(x, &total, s);
  return total;
}

__device__ double block_sum_f64(double x, Smem& s) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off > 0; off /= 2)
    x += __shfl_xor_sync(kFull, x, off);
  if (lane == 0) s.warp_f64[threadIdx.x >> 5] = x;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w)
    total += s.warp_f64[w];  // the same order in every thread
  __syncthreads();
  return total;
}

__device__ float block_max(float x, Smem& s) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off > 0; off /= 2)
    x = fmaxf(x, __shfl_xor_sync(kFull, x, off));
  if (lane == 0) s.warp_f[threadIdx.x >> 5] = x;
  __syncthreads();
  float m = s.warp_f[0];
  for (int w = 1; w < kWarps; ++w)
    m = fmaxf(m, s.warp_f[w]);
  __syncthreads();
  return m;
}

// (value, id) is better than (bv, bi) when larger, or equal with a lower id.
__device__ __forceinline__ bool better(float v, int32_t i, float bv, int32_t bi) {
  return v > bv || (v == bv && i < bi);
}

// The id of the block's best (value, id) pair.
__device__ int32_t block_argmax(float v, int32_t i, Smem& s) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(kFull, v, off);
    const int32_t oi = __shfl_xor_sync(kFull, i, off);
    if (better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
  if (lane == 0) {
    s.warp_f[threadIdx.x >> 5] = v;
    s.warp_i[threadIdx.x >> 5] = i;
  }
  __syncthreads();
  float bv = s.warp_f[0];
  int32_t bi = s.warp_i[0];
  for (int w = 1; w < kWarps; ++w) {
    if (better(s.warp_f[w], s.warp_i[w], bv, bi)) {
      bv = s.warp_f[w];
      bi = s.warp_i[w];
    }
  }
  __syncthreads();
  return bi;
}

// ---- Keys and probabilities. ----

// Order-preserving map of a float (not NaN) to uint32; -0 is first made +0 so that the two
// zeros, equal as floats (what the CPU compares), get one key.
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) != 0 ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ float sanitized(float v) {
  return v == v ? v : neg_inf();
}

__device__ __forceinline__ u64 fixed_mass(float w) {
  return __float2ull_rn(__fmul_rn(w, kFixedScale));  // exact scaling by a power of two
}

// ---- Selection. ----

struct Selection {
  uint32_t key;    // the boundary key
  u64 need;        // what was asked for
  u64 above;       // amount of the items with a larger key
  uint32_t count;  // items with exactly this key (when counted)
  // The caller's stop_after_top (select_desc) ended the selection after its first digit: `key`
  // holds that digit (the top 11 bits), `above` the amount of the digits above it.
  bool stopped = false;
};

// select_desc's default: never stop after the first digit (the check is compiled out).
struct NeverStop {};

// Descending radix selection over the items i in [0, vocab): item(i, &key) returns the item's
// amount (0: not an item) and sets its key. Finds the key K with
//   amount(key > K) < need <= amount(key >= K),
// need = need_of(total amount), which must lie in [1, total]. Each pass histograms one digit of
// the items that match the digits chosen so far; the invariant 1 <= need - above <= amount of
// the matching items holds after every pass, so exactly one bin is chosen. kCount also counts
// the items per bin (the count of the final key is returned).
// stop_after_top(digit, n) (kCount only) runs after the first pass with the chosen top digit and
// the number of items whose top digit is that one or larger; returning true ends the selection
// there (Selection::stopped), for a caller that finishes over those items itself.
// kUnit: every amount is 0 or 1 (counting tokens). The lanes of a warp that hit one bin then add
// once, their number (__match_any_sync): logits crowd into a few bins of the top digits, and
// a shared-memory atomic serializes the lanes of a warp that share its address (the first
// version, one atomic a lane, took 12.5 ms a row at 128K tokens on dummy weights).
template <bool kCount, bool kUnit = false, class Item, class NeedOf, class StopAfterTop = NeverStop>
__device__ Selection select_desc(int32_t vocab, const Item& item, const NeedOf& need_of, Smem& s,
                                 const StopAfterTop& stop_after_top = {}) {
  uint32_t prefix = 0;
  u64 above = 0;
  u64 need = 0;
  uint32_t count = 0;
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    // Digits of 11, 11 and 10 bits: [31:21], [20:10], [9:0].
    const int width = pass < 2 ? 11 : 10;
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const int nbins = 1 << width;
    for (int b = threadIdx.x; b < kMaxBins; b += kThreads) {
      s.mass_lo[b] = 0;
      s.mass_hi[b] = 0;
      if constexpr (kCount) s.cnt[b] = 0;
    }
    __syncthreads();
    if constexpr (kUnit) {
      // Warp-uniform trip count, so that every lane takes part in the match.
      const int lane = threadIdx.x & 31;
#pragma unroll 4
      for (int32_t b = 0; b < vocab; b += kThreads) {
        const int32_t i = b + static_cast<int32_t>(threadIdx.x);
        uint32_t key = 0;
        const bool in =
            i < vocab && item(i, &key) != 0 && (pass == 0 || (key >> (shift + width)) == prefix);
        const int d = in ? static_cast<int>((key >> shift) & static_cast<uint32_t>(nbins - 1)) : -1;
        const unsigned peers = __match_any_sync(kFull, d);
        if (in && lane == __ffs(peers) - 1) {
          const unsigned n = static_cast<unsigned>(__popc(peers));
          atomicAdd(&s.mass_lo[d], n);  // at most kMaxSamplingVocab in all: no carry
        }
      }
    } else {
#pragma unroll 4
      for (int32_t i = threadIdx.x; i < vocab; i += kThreads) {
        uint32_t key = 0;
        const u64 a = item(i, &key);
        if (a == 0) continue;
        if (pass > 0 && (key >> (shift + width)) != prefix) continue;
        const uint32_t d = (key >> shift) & static_cast<uint32_t>(nbins - 1);
        // Exact: every wrap of lo is seen by the add that made it, which carries one into hi.
        const auto lo = static_cast<uint32_t>(a);
        const uint32_t old = atomicAdd(&s.mass_lo[d], lo);
        const uint32_t hi = static_cast<uint32_t>(a >> 32) + (old + lo < old ? 1u : 0u);
        if (hi != 0) atomicAdd(&s.mass_hi[d], hi);
        if constexpr (kCount) atomicAdd(&s.cnt[d], 1u);
      }
    }
    __syncthreads();
    // Thread t looks at the bins of descending rank 2t and 2t + 1.
    const int r0 = 2 * static_cast<int>(threadIdx.x);
    const int b0 = nbins - 1 - r0;
    const int b1 = b0 - 1;
    auto mass = [&](int b) {
      return (static_cast<u64>(s.mass_hi[b]) << 32) | static_cast<u64>(s.mass_lo[b]);
    };
    const u64 a0 = r0 < nbins ? mass(b0) : 0;
    const u64 a1 = r0 + 1 < nbins ? mass(b1) : 0;
    u64 total;
    const u64 excl = block_excl_scan(a0 + a1, &total, s);
    if (pass == 0) need = need_of(total);
    const u64 rem = need - above;
    if (a0 != 0 && excl < rem && rem <= excl + a0) {
      s.sel_bin = static_cast<uint32_t>(b0);
      s.sel_above = excl;
    } else if (a1 != 0 && excl + a0 < rem && rem <= excl + a0 + a1) {
      s.sel_bin = static_cast<uint32_t>(b1);
      s.sel_above = excl + a0;
    }
    __syncthreads();
    const uint32_t bin = s.sel_bin;
    above += s.sel_above;
    if constexpr (kCount && !kUnit && !std::is_same_v<StopAfterTop, NeverStop>) {
      if (pass == 0) {
        // Items whose top digit is `bin` or larger: the counts scanned in the same order.
        const u64 c0 = r0 < nbins ? s.cnt[b0] : 0;
        const u64 c1 = r0 + 1 < nbins ? s.cnt[b1] : 0;
        u64 ctotal;
        const u64 cexcl = block_excl_scan(c0 + c1, &ctotal, s);
        if (static_cast<int>(bin) == b0 && r0 < nbins) s.sel_count_ge = cexcl + c0;
        if (static_cast<int>(bin) == b1 && r0 + 1 < nbins) s.sel_count_ge = cexcl + c0 + c1;
        __syncthreads();
        const u64 count_ge = s.sel_count_ge;
        __syncthreads();
        if (stop_after_top(bin, count_ge)) return {bin, need, above, 0, true};
      }
    }
    if constexpr (kCount) count = kUnit ? s.mass_lo[bin] : s.cnt[bin];
    prefix = (prefix << width) | bin;
    __syncthreads();  // the next pass clears the histograms and rewrites the slots
  }
  return {prefix, need, above, count};
}

// The `need` largest keys of a row (need >= 1 items must exist): select_desc<true, true>'s
// result, usually without its three passes over the row. A bound first: the need-th largest of
// the threads' largest keys (`my_max`, 0 when the thread saw no item; need <= kThreads) is at
// most the row's need-th largest key, since need threads each hold an item at least that large.
// One pass collects the items at or above it into shared memory (a few times need of them on a
// model's logits), and the selection runs there. When the bound does not apply, or more than
// kMaxCands items reach it (heavy ties), the selection runs over the row instead. *in_cands
// says which: then s.cand_key / s.cand_id hold every item with a key >= the result's.
template <class Item>
__device__ Selection select_top(int32_t vocab, const Item& item, uint32_t my_max, uint32_t need,
                                bool* in_cands, Smem& s) {
  const int lane = threadIdx.x & 31;
  auto need_fn = [need](u64) { return static_cast<u64>(need); };
  *in_cands = false;
  s.thread_max[threadIdx.x] = my_max;
  const u64 holders = block_sum(my_max != 0 ? 1ull : 0ull, s);  // its barriers publish thread_max
  if (need <= kThreads && holders >= need) {
    auto bound_item = [&](int32_t t, uint32_t* key) -> u64 {
      *key = s.thread_max[t];
      return *key != 0 ? 1 : 0;
    };
    const uint32_t bound = select_desc<false, true>(kThreads, bound_item, need_fn, s).key;
    if (threadIdx.x == 0) s.num_cands = 0;
    __syncthreads();
    // Warp-uniform trip count: one atomic a warp for its lanes' slots.
    for (int32_t b = 0; b < vocab; b += kThreads) {
      const int32_t i = b + static_cast<int32_t>(threadIdx.x);
      uint32_t key = 0;
      const bool take = i < vocab && item(i, &key) != 0 && key >= bound;
      const unsigned mask = __ballot_sync(kFull, take);
      if (mask == 0) continue;
      int32_t base = 0;
      if (lane == __ffs(mask) - 1) base = atomicAdd(&s.num_cands, __popc(mask));
      base = __shfl_sync(kFull, base, __ffs(mask) - 1);
      const int32_t at = base + __popc(mask & ((1u << lane) - 1u));
      if (take && at < kMaxCands) {
        s.cand_key[at] = key;
        s.cand_id[at] = i;
      }
    }
    __syncthreads();
    const int32_t n = s.num_cands;
    __syncthreads();
    if (n <= kMaxCands) {  // else: too many ties at the bound
      *in_cands = true;
      auto cand_item = [&](int32_t j, uint32_t* key) -> u64 {
        *key = s.cand_key[j];
        return 1;
      };
      return select_desc<true, true>(n, cand_item, need_fn, s);
    }
  }
  return select_desc<true, true>(vocab, item, need_fn, s);
}

// Sorts the n select_top candidates by id, ascending (bitonic over the next power of two, the
// padding after them; ids are distinct).
__device__ void sort_cands_by_id(int32_t n, Smem& s) {
  int32_t size = 1;
  while (size < n)
    size <<= 1;
  for (int32_t i = n + static_cast<int32_t>(threadIdx.x); i < size; i += kThreads) {
    s.cand_id[i] = INT_MAX;
    s.cand_key[i] = 0;
  }
  __syncthreads();
  for (int32_t k = 2; k <= size; k <<= 1) {
    for (int32_t j = k >> 1; j > 0; j >>= 1) {
      for (int32_t i = static_cast<int32_t>(threadIdx.x); i < size; i += kThreads) {
        const int32_t p = i ^ j;
        if (p <= i) continue;
        const bool ascending = (i & k) == 0;
        const int32_t a = s.cand_id[i], b = s.cand_id[p];
        if ((a > b) == ascending) {
          s.cand_id[i] = b;
          s.cand_id[p] = a;
          const uint32_t t = s.cand_key[i];
          s.cand_key[i] = s.cand_key[p];
          s.cand_key[p] = t;
        }
      }
      __syncthreads();
    }
  }
}

// The smallest id i with amount(0) + ... + amount(i) >= need_of(total amount), need in
// [1, total]. Thread t sums a contiguous chunk of ids, a block scan finds the chunk that
// holds the crossing, and warp 0 rescans that chunk 32 ids at a time. amount must give the same
// value on every call (it is a pure function of the row), so the rescan crosses where the scan
// said it would.
template <class Amount, class NeedOf>
__device__ int32_t find_crossing(int32_t vocab, const Amount& amount, const NeedOf& need_of,
                                 Smem& s) {
  const int32_t chunk = (vocab + kThreads - 1) / kThreads;
  const int32_t lo = min(static_cast<int32_t>(threadIdx.x) * chunk, vocab);
  const int32_t hi = min(lo + chunk, vocab);
  u64 sum = 0;
  for (int32_t i = lo; i < hi; ++i)
    sum += amount(i);
  if (threadIdx.x == 0) s.cross_owner = 0;  // ordered before the winner's write by the scan
  u64 total;
  const u64 excl = block_excl_scan(sum, &total, s);
  const u64 need = need_of(total);
  if (sum != 0 && excl < need && need <= excl + sum) {
    s.cross_owner = static_cast<int32_t>(threadIdx.x);
    s.cross_base = excl;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int32_t olo = s.cross_owner * chunk;
    const int32_t ohi = min(olo + chunk, vocab);
    u64 base = s.cross_base;
    int32_t found = -1;
    for (int32_t b = olo; b < ohi; b += 32) {  // warp-uniform trip count
      const int32_t i = b + lane;
      const u64 a = i < ohi ? amount(i) : 0;
      const u64 incl = warp_incl_scan(a);
      const unsigned hit = __ballot_sync(kFull, a != 0 && base + incl >= need);
      if (hit != 0) {
        found = b + __ffs(hit) - 1;
        break;
      }
      base += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) s.cross_found = found < 0 ? olo : found;  // found < 0 cannot happen
  }
  __syncthreads();
  const int32_t result = s.cross_found;
  __syncthreads();
  return result;
}

// ---- The kernel. ----

__global__ void __launch_bounds__(kThreads, 1) sampling_kernel(const SamplingLaunch p) {
  __shared__ Smem s;
  const int32_t row = static_cast<int32_t>(blockIdx.x);
  const int32_t vocab = p.vocab;
  const SamplingRow prm = p.params[row];
  float* const logits = p.logits + static_cast<int64_t>(row) * vocab;
  const int tid = static_cast<int>(threadIdx.x);

  // 0. Log-probabilities from the raw row. lse stays +inf when no finite distribution exists
  // (every logit -inf or NaN, or one +inf): the CPU's logprob_of gives -inf then.
  const bool want_lp = prm.logprobs >= 0 && p.out_logprob != nullptr;
  const float* raw = logits;  // the raw row, for the sampled token's log-probability
  double lse = 0.0;
  bool lse_finite = false;
  if (want_lp) {
    float* copy = nullptr;
    if (prm.logprob_slot >= 0 && prm.logprob_slot < p.logprob_copies) {
      copy = static_cast<float*>(p.workspace) + static_cast<int64_t>(prm.logprob_slot) * vocab;
      raw = copy;
    } else if (sampling_rewrites_row(prm, p.hist_starts != nullptr)) {
      raw = nullptr;  // the caller broke the contract: NaN, not a wrong number
    }
    float lmax = neg_inf();
#pragma unroll 4
    for (int32_t i = tid; i < vocab; i += kThreads) {
      const float l = logits[i];
      if (copy != nullptr) copy[i] = l;
      lmax = fmaxf(lmax, sanitized(l));
    }
    const uint32_t my_max = tid < vocab ? order_key(lmax) : 0u;
    const float vmax = block_max(lmax, s);
    lse_finite = vmax > neg_inf() && vmax < pos_inf();
    if (lse_finite) {
      double sum = 0.0;
      for (int32_t i = tid; i < vocab; i += kThreads)
        sum += exp(static_cast<double>(sanitized(logits[i])) - static_cast<double>(vmax));
      lse = static_cast<double>(vmax) + log(block_sum_f64(sum, s));
    }
    const int32_t n = min(prm.logprobs, min(kMaxSamplingLogprobs, vocab));
    if (n > 0) {
      auto item = [&](int32_t i, uint32_t* key) -> u64 {
        *key = order_key(sanitized(logits[i]));
        return 1;
      };
      bool in_cands;
      const Selection sel = select_top(vocab, item, my_max, static_cast<uint32_t>(n), &in_cands, s);
      // Of the tokens at the boundary key, the lowest ids fill what is left.
      const u64 m = sel.need - sel.above;
      int32_t tie_last = INT_MAX;
      if (m < sel.count && in_cands) {
        // The m-th largest ~id among the candidates at the boundary: the m-th lowest id.
        auto tied = [&](int32_t j, uint32_t* key) -> u64 {
          *key = ~static_cast<uint32_t>(s.cand_id[j]);
          return s.cand_key[j] == sel.key ? 1 : 0;
        };
        tie_last = static_cast<int32_t>(~select_desc<false, true>(
                                             s.num_cands, tied, [m](u64) { return m; }, s)
                                             .key);
      } else if (m < sel.count) {
        auto tied = [&](int32_t i) -> u64 {
          return order_key(sanitized(logits[i])) == sel.key ? 1ull : 0ull;
        };
        tie_last = find_crossing(
            vocab, tied, [m](u64) { return m; }, s);
      }
      if (tid == 0) s.top_count = 0;
      __syncthreads();
      auto offer = [&](uint32_t key, int32_t i) {
        if (key > sel.key || (key == sel.key && i <= tie_last)) {
          const int32_t at = atomicAdd(&s.top_count, 1);
          s.top_v[at] = key_value(key);  // sanitized(logit), -0 as +0: the same difference
          s.top_i[at] = i;
        }
      };
      if (in_cands) {
        for (int32_t j = tid; j < s.num_cands; j += kThreads)
          offer(s.cand_key[j], s.cand_id[j]);
      } else {
        for (int32_t i = tid; i < vocab; i += kThreads)
          offer(order_key(sanitized(logits[i])), i);
      }
      __syncthreads();
      if (tid == 0) {
        // Insertion sort of n <= 20 entries, most likely first.
        for (int32_t a = 1; a < n; ++a) {
          const float v = s.top_v[a];
          const int32_t id = s.top_i[a];
          int32_t b = a - 1;
          for (; b >= 0 && better(v, id, s.top_v[b], s.top_i[b]); --b) {
            s.top_v[b + 1] = s.top_v[b];
            s.top_i[b + 1] = s.top_i[b];
          }
          s.top_v[b + 1] = v;
          s.top_i[b + 1] = id;
        }
        const int64_t base = static_cast<int64_t>(row) * kMaxSamplingLogprobs;
        for (int32_t a = 0; a < n; ++a) {
          p.out_top_ids[base + a] = s.top_i[a];
          p.out_top_logprobs[base + a] =
              lse_finite ? static_cast<float>(static_cast<double>(s.top_v[a]) - lse) : neg_inf();
        }
      }
      __syncthreads();  // the steps below reuse the scratch; the raw copy is complete
    }
  }
  // Thread 0 writes the row's token (and its log-probability from the raw row).
  auto finish = [&](int32_t token) {
    if (tid != 0) return;
    p.out_tokens[row] = token;
    if (want_lp) {
      p.out_logprob[row] =
          raw == nullptr ? __int_as_float(0x7fc00000)
          : lse_finite   ? static_cast<float>(static_cast<double>(sanitized(raw[token])) - lse)
                         : neg_inf();
    }
  };

  // 1. Penalties, exactly Sampler::apply_penalties (history ids are distinct, so no two threads
  // touch one logit). Repetition over prompt-or-output tokens, then frequency and presence over
  // output tokens, as two roundings like the CPU's two `-=`.
  const float rep = prm.repetition_penalty;
  const float freq = prm.frequency_penalty;
  const float pres = prm.presence_penalty;
  const bool do_rep = rep != 1.0f;
  const bool do_freq_pres = freq != 0.0f || pres != 0.0f;
  if (p.hist_starts != nullptr && (do_rep || do_freq_pres)) {
    const int32_t begin = p.hist_starts[row];
    const int32_t end = p.hist_starts[row + 1];
    // The newest token when the host has not seen it (hist_last_row): its count is one more than
    // its entry's, or it is a new output token; the same expressions as a history holding it.
    const int32_t last = p.hist_last_row != nullptr && p.hist_last_row[row] >= 0
                             ? p.tokens[p.hist_last_row[row]]
                             : -1;
    auto penalize = [&](int32_t id, int32_t count, bool in_prompt) {
      float l = logits[id];
      if (do_rep && (in_prompt || count > 0)) l = l > 0.0f ? __fdiv_rn(l, rep) : __fmul_rn(l, rep);
      if (do_freq_pres && count > 0) {
        l = __fsub_rn(l, __fmul_rn(freq, static_cast<float>(count)));
        l = __fsub_rn(l, pres);
      }
      logits[id] = l;
    };
    if (tid == 0) s.last_in_hist = 0;
    __syncthreads();
    for (int32_t j = begin + tid; j < end; j += kThreads) {
      const int32_t id = p.hist_ids[j];
      if (id == last) s.last_in_hist = 1;
      penalize(id, p.hist_output_counts[j] + (id == last ? 1 : 0), p.hist_in_prompt[j] != 0);
    }
    __syncthreads();
    if (tid == 0 && last >= 0 && last < vocab && s.last_in_hist == 0) penalize(last, 1, false);
    __syncthreads();  // makes the writes visible to the threads that read those logits below
  }

  // 2. Greedy: argmax with NaN as -inf; (-inf, lowest id) when nothing is finite, i.e. token 0.
  // One CTA streams the row: with 4-byte loads (8 in flight a thread) a 128K-token row took
  // ~12 us, the latency of too few bytes in flight; 16-byte loads over the row's aligned body
  // carry 4x as many (bench/RESULTS.md, twenty-fourth session). The argmax does not depend on
  // which thread sees which token.
  if (prm.temperature < 1e-5f) {
    float bv = neg_inf();
    int32_t bi = INT_MAX;
    auto visit = [&](float l, int32_t i) {
      const float v = l == l ? l : neg_inf();
      if (better(v, i, bv, bi)) {
        bv = v;
        bi = i;
      }
    };
    const int32_t head =
        min(vocab, static_cast<int32_t>((16 - reinterpret_cast<uintptr_t>(logits) % 16) % 16 / 4));
    const int32_t n4 = (vocab - head) / 4;
    if (tid < head) visit(logits[tid], tid);
    const float4* body = reinterpret_cast<const float4*>(logits + head);
#pragma unroll 8
    for (int32_t j = tid; j < n4; j += kThreads) {
      const float4 q = body[j];
      const int32_t i = head + 4 * j;
      visit(q.x, i);
      visit(q.y, i + 1);
      visit(q.z, i + 2);
      visit(q.w, i + 3);
    }
    for (int32_t i = head + 4 * n4 + tid; i < vocab; i += kThreads)
      visit(logits[i], i);
    finish(block_argmax(bv, bi, s));
    return;
  }

  if (tid == 0) {
    curandStatePhilox4_32_10_t state;
    curand_init(prm.seed, 0ull, prm.offset, &state);
    s.uniform = curand_uniform(&state);  // in (0, 1]
  }

  // 3. Temperature (written back), maximum, candidates.
  const bool scale = prm.temperature != 1.0f;
  float lmax = neg_inf();
  u64 ncand = 0;
  u64 nposinf = 0;
#pragma unroll 4
  for (int32_t i = tid; i < vocab; i += kThreads) {
    float l = logits[i];
    if (scale) {
      l = __fdiv_rn(l, prm.temperature);
      logits[i] = l;
    }
    if (l > neg_inf()) {  // false for NaN
      ++ncand;
      nposinf += l == pos_inf() ? 1 : 0;
      lmax = fmaxf(lmax, l);
    }
  }
  float vmax = block_max(lmax, s);
  ncand = block_sum(ncand, s);
  nposinf = block_sum(nposinf, s);
  if (ncand == 0) {
    finish(0);
    return;
  }
  // The barriers above ordered every thread's logits writes before the reads below.
  const bool inf_mode = vmax == pos_inf();
  if (inf_mode) {
    ncand = nposinf;
    vmax = 0.0f;
  }
  // A token's logit as the filters see it: -inf for non-candidates.
  auto value = [&](int32_t i) -> float {
    const float l = logits[i];
    if (inf_mode) return l == pos_inf() ? 0.0f : neg_inf();
    return l == l ? l : neg_inf();
  };

  // 4. top-k on the logits: keep v >= the k-th largest (ties kept). In inf mode every
  // candidate is 0, so top-k keeps them all.
  float kth = neg_inf();
  const int32_t k = prm.top_k;
  bool in_cands = false;  // every top-k survivor is in s.cand_key / s.cand_id
  if (!inf_mode && k > 0 && static_cast<u64>(k) < ncand) {
    auto item = [&](int32_t i, uint32_t* key) -> u64 {
      const float v = value(i);
      if (!(v > neg_inf())) return 0;
      *key = order_key(v);
      return 1;
    };
    // lmax is this thread's largest candidate logit (-inf: none).
    const Selection sel = select_top(vocab, item, lmax > neg_inf() ? order_key(lmax) : 0u,
                                     static_cast<uint32_t>(k), &in_cands, s);
    kth = key_value(sel.key);
  }

  // 5-8 over a domain of n entries in id order: the row (entry = id), or the top-k candidates
  // sorted by id. val(j) is the entry's logit as the filters see it, id_of(j) its token.
  const bool use_p = prm.top_p < 1.0f;
  const float min_p = prm.min_p;
  const float u = s.uniform;  // written before the barriers of step 3
  // The CPU keeps the head while its mass is < top_p * total; in integers: mass >= ceil().
  auto top_p_need_of = [top_p = prm.top_p](u64 total) {
    const double t = ceil(static_cast<double>(top_p) * static_cast<double>(total));
    const u64 need = static_cast<u64>(t);
    return need < 1 ? 1ull : (need > total ? total : need);
  };
  // top_p_sel: the domain's top-p selection when the caller ran it already; top_p_need: the
  // top-p target when the domain holds only part of the row's mass (the row's need), else 0.
  auto filter_and_draw = [&](int32_t n, const auto& val, const auto& id_of,
                             const Selection* top_p_sel, u64 top_p_need) -> int32_t {
    // 5. Probabilities of the top-k survivors; 0 (and no key) for the others.
    auto weight = [&](int32_t j, float* w) -> bool {
      const float v = val(j);
      if (!(v > neg_inf()) || v < kth) return false;
      *w = expf(__fsub_rn(v, vmax));
      return true;
    };
    // 6. top-p: tau and, for the entries tied at tau, the last one kept.
    uint32_t tau = 0;
    int32_t tie_last = INT_MAX;
    if (use_p) {
      // Tokens whose mass rounds to 0 never reach the boundary (the total is carried by the
      // others and target < total), so they are no items and end up dropped.
      auto item = [&](int32_t j, uint32_t* key) -> u64 {
        float w;
        if (!weight(j, &w)) return 0;
        *key = __float_as_uint(w);
        return fixed_mass(w);
      };
      const Selection sel =
          top_p_sel != nullptr
              ? *top_p_sel
              : select_desc<true>(
                    n, item,
                    [&](u64 total) { return top_p_need != 0 ? top_p_need : top_p_need_of(total); },
                    s);
      tau = sel.key;
      const u64 unit = fixed_mass(__uint_as_float(tau));  // > 0: tau's bin had mass
      // Tied entries (id ascending) needed after the mass above tau: 1 <= m <= sel.count.
      const u64 m = (sel.need - sel.above + unit - 1) / unit;
      if (m < sel.count) {
        auto tied = [&](int32_t j) -> u64 {
          float w;
          return weight(j, &w) && __float_as_uint(w) == tau ? 1ull : 0ull;
        };
        tie_last = find_crossing(
            n, tied, [m](u64) { return m; }, s);
      }
    }
    // 7-8. min-p and the draw over what is kept, in id order.
    auto kept_mass = [&](int32_t j) -> u64 {
      float w;
      if (!weight(j, &w)) return 0;
      if (use_p) {
        const uint32_t key = __float_as_uint(w);
        if (key < tau || (key == tau && j > tie_last)) return 0;
      }
      if (min_p > 0.0f && w < min_p) return 0;
      return fixed_mass(w);
    };
    auto need_of_draw = [u](u64 total) {
      // total >= 2^40: the top token (w = 1) survives every filter.
      const u64 r = static_cast<u64>(ceil(static_cast<double>(u) * static_cast<double>(total)));
      return r < 1 ? 1ull : (r > total ? total : r);
    };
    return id_of(find_crossing(n, kept_mass, need_of_draw, s));
  };
  auto cand_val = [&](int32_t j) { return key_value(s.cand_key[j]); };
  auto cand_id = [&](int32_t j) { return s.cand_id[j]; };
  if (in_cands) {
    // Every survivor is a candidate (their keys reach the bound, which is <= kth): filter and
    // draw there, the same entries in the same order, without three more passes over the row.
    sort_cands_by_id(s.num_cands, s);
    finish(filter_and_draw(s.num_cands, cand_val, cand_id, nullptr, 0));
    return;
  }
  auto row_id = [](int32_t i) { return i; };
  if (!use_p) {
    finish(filter_and_draw(vocab, value, row_id, nullptr, 0));
    return;
  }
  // Top-p over the row: its selection's first pass finds the top digit of the boundary
  // probability. When the tokens at or above that digit fit (a model's nucleus usually does),
  // they are gathered and the rest runs among them (the row's need as the target: they hold at
  // least that much); otherwise the selection goes on over the row.
  auto row_item = [&](int32_t i, uint32_t* key) -> u64 {
    const float v = value(i);
    if (!(v > neg_inf()) || v < kth) return 0;
    const float w = expf(__fsub_rn(v, vmax));
    *key = __float_as_uint(w);
    return fixed_mass(w);
  };
  const Selection sel = select_desc<true>(vocab, row_item, top_p_need_of, s,
                                          [](uint32_t, u64 n) { return n <= kMaxCands; });
  if (!sel.stopped) {
    finish(filter_and_draw(vocab, value, row_id, &sel, 0));
    return;
  }
  if (tid == 0) s.num_cands = 0;
  __syncthreads();
  const int lane = tid & 31;
  for (int32_t b = 0; b < vocab; b += kThreads) {  // warp-uniform: one atomic a warp
    const int32_t i = b + tid;
    uint32_t key = 0;
    const bool take = i < vocab && row_item(i, &key) != 0 && (key >> 21) >= sel.key;
    const unsigned mask = __ballot_sync(kFull, take);
    if (mask == 0) continue;
    int32_t base = 0;
    if (lane == __ffs(mask) - 1) base = atomicAdd(&s.num_cands, __popc(mask));
    base = __shfl_sync(kFull, base, __ffs(mask) - 1);
    if (take) {
      const int32_t at = base + __popc(mask & ((1u << lane) - 1u));  // < kMaxCands: counted
      s.cand_key[at] = order_key(value(i));
      s.cand_id[at] = i;
    }
  }
  __syncthreads();
  sort_cands_by_id(s.num_cands, s);
  finish(filter_and_draw(s.num_cands, cand_val, cand_id, nullptr, sel.need));
}

}  // namespace

int64_t sampling_workspace_bytes(int32_t /*rows*/, int32_t vocab, int32_t logprob_copies) {
  return static_cast<int64_t>(std::max(logprob_copies, 0)) * std::max(vocab, 0) *
         static_cast<int64_t>(sizeof(float));
}

cudaError_t launch_sampling(const SamplingLaunch& launch, cudaStream_t stream) {
  if (launch.rows == 0) return cudaSuccess;
  if (launch.rows < 0 || launch.vocab < 1 || launch.vocab > kMaxSamplingVocab ||
      launch.logits == nullptr || launch.params == nullptr || launch.out_tokens == nullptr ||
      launch.logprob_copies < 0 ||
      launch.workspace_bytes <
          sampling_workspace_bytes(launch.rows, launch.vocab, launch.logprob_copies) ||
      (launch.workspace_bytes > 0 && launch.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int lp_outputs = (launch.out_logprob != nullptr) + (launch.out_top_ids != nullptr) +
                         (launch.out_top_logprobs != nullptr);
  if (lp_outputs != 0 && lp_outputs != 3) return cudaErrorInvalidValue;
  if (launch.hist_starts != nullptr &&
      (launch.hist_ids == nullptr || launch.hist_output_counts == nullptr ||
       launch.hist_in_prompt == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (launch.hist_last_row != nullptr && launch.tokens == nullptr) return cudaErrorInvalidValue;
  sampling_kernel<<<launch.rows, kThreads, 0, stream>>>(launch);
  return cudaGetLastError();
}

namespace {

__global__ void gather_sampled(int32_t* tokens, const int32_t* src, const int32_t* sampled,
                               int32_t n) {
  for (int32_t r = blockIdx.x * blockDim.x + threadIdx.x; r < n; r += gridDim.x * blockDim.x) {
    const int32_t j = src[r];
    if (j >= 0) tokens[r] = sampled[j];
  }
}

}  // namespace

cudaError_t launch_gather_sampled(int32_t* tokens, const int32_t* src, const int32_t* sampled,
                                  int32_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (tokens == nullptr || src == nullptr || sampled == nullptr) return cudaErrorInvalidValue;
  const int32_t blocks = std::min<int32_t>((n + 255) / 256, 64);
  gather_sampled<<<blocks, 256, 0, stream>>>(tokens, src, sampled, n);
  return cudaGetLastError();
}

}  // namespace pmkv::kernels
