// KV write, window flush (requant) and demotion kernels against the CPU backend, byte for byte,
// on the whole pool (written and untouched bytes alike).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <random>
#include <vector>

#include "engine/backend/cpu/kv_page_ops.h"
#include "engine/backend/cpu/paged_attention.h"
#include "kernels/kv/kv_ops.h"
#include "tests/gpu/gpu_test_util.h"

using namespace pmkv;
using gputest::DeviceBuffer;

// The kernels' op structs mirror the engine's field for field (the backend copies them as is).
static_assert(sizeof(kernels::KvRequantOp) == sizeof(kv::RequantOp));
static_assert(offsetof(kernels::KvRequantOp, count) == offsetof(kv::RequantOp, count));
static_assert(offsetof(kernels::KvRequantOp, dst_bits) == offsetof(kv::RequantOp, dst_bits));
static_assert(sizeof(kernels::KvDemoteOp) == sizeof(kv::DemoteOp));
static_assert(offsetof(kernels::KvDemoteOp, tokens) == offsetof(kv::DemoteOp, tokens));
static_assert(offsetof(kernels::KvDemoteOp, num_src) == offsetof(kv::DemoteOp, num_src));
static_assert(offsetof(kernels::KvDemoteOp, to_bits) == offsetof(kv::DemoteOp, to_bits));

namespace {

constexpr int kBits[4] = {16, 8, 4, 2};

struct TestPool {
  kv::PageGeometry g;
  int64_t page_bytes;
  int32_t num_pages;
  std::vector<std::byte> host;
  DeviceBuffer<std::byte> dev;

  TestPool(kv::PageGeometry geo, int32_t pages, std::mt19937& rng)
      : g(geo), page_bytes(kv::page_bytes(geo)), num_pages(pages) {
    host.resize(static_cast<size_t>(page_bytes) * pages);
    for (auto& b : host)
      b = static_cast<std::byte>(rng() & 0xFF);  // garbage, never zeros
  }
  cpu::KvPoolView view() { return {host.data(), page_bytes, g}; }
  kernels::KvPoolRef ref() { return {dev.get(), page_bytes, g}; }
};

// Index of the first differing byte, or -1.
int64_t first_diff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  if (a.size() != b.size()) return 0;
  const auto m = std::mismatch(a.begin(), a.end(), b.begin());
  return m.first == a.end() ? -1 : m.first - a.begin();
}

void require_same_pool(TestPool& pool) {
  std::vector<std::byte> got;
  CUDA_REQUIRE(pool.dev.download(got));
  const int64_t d = first_diff(pool.host, got);
  INFO("first differing byte " << d << " (page " << (d < 0 ? -1 : d / pool.page_bytes)
                               << ", offset " << (d < 0 ? -1 : d % pool.page_bytes) << ")");
  REQUIRE(d == -1);
}

// K/V values of `n` tokens: normal, with per-row offsets and the cases the codec special-cases
// (constant rows: scale clamps to 1e-5; huge ranges: 1e5; ties; signed zeros).
std::vector<float> kv_values(int n, int width, int head_dim, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::uniform_real_distribution<float> off(-3.0f, 3.0f);
  std::vector<float> x(static_cast<size_t>(n) * width);
  for (int r = 0; r < n * width / head_dim; ++r) {
    float* row = x.data() + static_cast<size_t>(r) * head_dim;
    const int kind = static_cast<int>(rng() % 16);
    const float o = off(rng);
    for (int i = 0; i < head_dim; ++i)
      row[i] = o + dist(rng);
    if (kind == 0) std::fill(row, row + head_dim, o);  // constant
    if (kind == 1)
      for (int i = 0; i < head_dim; ++i)
        row[i] *= 3e6f;  // scale clamp 1e5
    if (kind == 2)
      for (int i = 0; i < head_dim; ++i)
        row[i] = std::round(row[i] * 2) / 2;
    if (kind == 3) {  // signed zeros at the extremes
      for (int i = 0; i < head_dim; ++i)
        row[i] = std::fabs(row[i]);
      row[rng() % head_dim] = -0.0f;
      row[rng() % head_dim] = 0.0f;
    }
  }
  return x;
}

const kv::PageGeometry kGeometries[] = {{8, 128, 16}, {2, 64, 4}, {2, 16, 4}, {3, 32, 2}};

}  // namespace

TEST_CASE("gpu kv write: quantized rows byte-equal to write_kv", "[gpu][kv]") {
  std::mt19937 rng(gputest::test_seed("kv_write"));
  for (const kv::PageGeometry& g : kGeometries) {
    for (const bool bf16 : {false, true}) {
      TestPool pool(g, 24, rng);
      CUDA_REQUIRE(pool.dev.upload(pool.host));
      // Each page gets one bit-width; rows go to distinct slots.
      std::vector<int> page_bits(pool.num_pages);
      std::vector<std::pair<int, int>> slots;
      for (int p = 0; p < pool.num_pages; ++p) {
        page_bits[p] = kBits[rng() % 4];
        for (int s = 0; s < kv::tokens_per_page(g, page_bits[p]); ++s)
          slots.push_back({p, s});
      }
      std::shuffle(slots.begin(), slots.end(), rng);
      const int n = std::min<int>(static_cast<int>(slots.size()), 300);
      const int width = g.num_kv_heads * g.head_dim;
      std::vector<float> k = kv_values(n, width, g.head_dim, rng);
      std::vector<float> v = kv_values(n, width, g.head_dim, rng);
      std::vector<uint16_t> kb(k.size()), vb(v.size());
      if (bf16) {
        for (size_t i = 0; i < k.size(); ++i) {
          kb[i] = gputest::to_bf16(k[i]);
          k[i] = gputest::from_bf16(kb[i]);
          vb[i] = gputest::to_bf16(v[i]);
          v[i] = gputest::from_bf16(vb[i]);
        }
      }
      std::vector<int32_t> ids(n), bits(n), slot(n);
      for (int r = 0; r < n; ++r) {
        ids[r] = slots[r].first;
        bits[r] = page_bits[ids[r]];
        slot[r] = slots[r].second;
        const std::vector<kv::PageRef> table = {{ids[r], bits[r], slot[r] + 1}};
        cpu::write_kv(pool.view(), table, slot[r], 1, k.data() + r * width, width,
                      v.data() + r * width, width);
      }
      DeviceBuffer<float> dk, dv;
      DeviceBuffer<uint16_t> dkb, dvb;
      DeviceBuffer<int32_t> dids, dbits, dslot;
      CUDA_REQUIRE(dids.upload(ids));
      CUDA_REQUIRE(dbits.upload(bits));
      CUDA_REQUIRE(dslot.upload(slot));
      kernels::KvWriteParams p;
      p.pool = pool.ref();
      p.num_rows = n;
      if (bf16) {
        CUDA_REQUIRE(dkb.upload(kb));
        CUDA_REQUIRE(dvb.upload(vb));
        p.k = dkb.get();
        p.v = dvb.get();
        p.dtype = kernels::DType::kBF16;
      } else {
        CUDA_REQUIRE(dk.upload(k));
        CUDA_REQUIRE(dv.upload(v));
        p.k = dk.get();
        p.v = dv.get();
        p.dtype = kernels::DType::kF32;
      }
      p.k_stride = p.v_stride = width;
      p.page_ids = dids.get();
      p.bits = dbits.get();
      p.slots = dslot.get();
      CUDA_REQUIRE_LAUNCH(kernels::launch_kv_write(p, nullptr));
      INFO("geometry H=" << g.num_kv_heads << " D=" << g.head_dim << " tokens16=" << g.tokens16
                         << " bf16=" << bf16 << " rows=" << n);
      require_same_pool(pool);
    }
  }
}

namespace {

// Fills the first `count` slots of page p at `bits` with quantized random K/V (CPU codec).
void fill_page(TestPool& pool, int page, int bits, int count, std::mt19937& rng) {
  if (count == 0) return;
  const int width = pool.g.num_kv_heads * pool.g.head_dim;
  const std::vector<float> k = kv_values(count, width, pool.g.head_dim, rng);
  const std::vector<float> v = kv_values(count, width, pool.g.head_dim, rng);
  const std::vector<kv::PageRef> table = {{page, bits, count}};
  cpu::write_kv(pool.view(), table, 0, count, k.data(), width, v.data(), width);
}

}  // namespace

TEST_CASE("gpu requant: window flushes byte-equal to apply_requant", "[gpu][kv]") {
  std::mt19937 rng(gputest::test_seed("requant"));
  int geometry_index = 0;
  for (const kv::PageGeometry& g : kGeometries) {
    const bool ranged = geometry_index++ % 2 == 1;
    const int num_ops = 40;
    TestPool pool(g, 2 * num_ops, rng);
    std::vector<int> perm(pool.num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<kernels::KvRequantOp> ops;
    for (int i = 0; i < num_ops; ++i) {
      kernels::KvRequantOp op{};
      op.src = perm[2 * i];
      op.dst = perm[2 * i + 1];
      op.src_bits = kBits[rng() % 4];
      op.dst_bits = op.src_bits;
      while (op.dst_bits > 2 && rng() % 2 != 0)
        op.dst_bits /= 2;
      const int ts = kv::tokens_per_page(g, op.src_bits), td = kv::tokens_per_page(g, op.dst_bits);
      fill_page(pool, op.src, op.src_bits, ts, rng);
      op.count = static_cast<int>(rng() % (std::min(ts, td) + 1));
      op.src_slot = static_cast<int>(rng() % (ts - op.count + 1));
      op.dst_slot = static_cast<int>(rng() % (td - op.count + 1));
      ops.push_back(op);
    }
    CUDA_REQUIRE(pool.dev.upload(pool.host));
    for (const auto& op : ops) {
      cpu::apply_requant(pool.view(), {op.src, op.src_bits, op.src_slot, op.dst, op.dst_bits,
                                       op.dst_slot, op.count});
    }
    DeviceBuffer<kernels::KvRequantOp> dops;
    if (ranged) {
      // A CUDA graph's launch: {first, count} read from the device, a few CTAs looping; the ops
      // before `first` are no-ops that a launch ignoring `first` would run in place of real ones.
      std::vector<kernels::KvRequantOp> padded(3, kernels::KvRequantOp{0, 16, 0, 1, 16, 0, 0});
      padded.insert(padded.end(), ops.begin(), ops.end());
      CUDA_REQUIRE(dops.upload(padded));
      DeviceBuffer<int32_t> range;
      CUDA_REQUIRE(range.upload(std::vector<int32_t>{3, num_ops}));
      CUDA_REQUIRE_LAUNCH(kernels::launch_requant_ranged(pool.ref(), dops.get(), range.get(),
                                                         1 + static_cast<int>(rng() % 7), nullptr));
    } else {
      CUDA_REQUIRE(dops.upload(ops));
      CUDA_REQUIRE_LAUNCH(kernels::launch_requant(pool.ref(), dops.get(), num_ops, nullptr));
    }
    INFO("geometry H=" << g.num_kv_heads << " D=" << g.head_dim << " tokens16=" << g.tokens16
                       << " ranged " << ranged);
    require_same_pool(pool);
  }
}

TEST_CASE("gpu demote: in-place folding byte-equal to apply_demote", "[gpu][kv]") {
  std::mt19937 rng(gputest::test_seed("demote"));
  int geometry_index = 0;
  for (const kv::PageGeometry& g : kGeometries) {
    const bool ranged = geometry_index++ % 2 == 1;
    const int num_ops = 30;
    TestPool pool(g, 8 * num_ops, rng);
    std::vector<int> perm(pool.num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<kernels::KvDemoteOp> ops;
    for (int i = 0; i < num_ops; ++i) {
      kernels::KvDemoteOp op{};
      op.from_bits = kBits[rng() % 4];
      int to = op.from_bits;
      while (to > 2 && rng() % 3 != 0)
        to /= 2;
      op.to_bits = to;
      const int max_src = std::min(8, op.from_bits / op.to_bits);
      op.num_src = 1 + static_cast<int>(rng() % max_src);
      const int tf = kv::tokens_per_page(g, op.from_bits);
      for (int s = 0; s < op.num_src; ++s) {
        op.src[s] = perm[8 * i + s];
        // Mostly full pages, sometimes partial or empty ones.
        const int r = static_cast<int>(rng() % 8);
        op.tokens[s] = r < 5 ? tf : static_cast<int>(rng() % (tf + 1));
        fill_page(pool, op.src[s], op.from_bits, op.tokens[s], rng);
      }
      ops.push_back(op);
    }
    CUDA_REQUIRE(pool.dev.upload(pool.host));
    for (const auto& op : ops) {
      kv::DemoteOp d;
      std::copy(op.src, op.src + 8, d.src.begin());
      std::copy(op.tokens, op.tokens + 8, d.tokens.begin());
      d.num_src = op.num_src;
      d.from_bits = op.from_bits;
      d.to_bits = op.to_bits;
      cpu::apply_demote(pool.view(), d);
    }
    DeviceBuffer<kernels::KvDemoteOp> dops;
    if (ranged) {  // as in the requant case; num_src 0 makes an op a no-op
      std::vector<kernels::KvDemoteOp> padded(3, kernels::KvDemoteOp{});
      padded.insert(padded.end(), ops.begin(), ops.end());
      CUDA_REQUIRE(dops.upload(padded));
      DeviceBuffer<int32_t> range;
      CUDA_REQUIRE(range.upload(std::vector<int32_t>{3, num_ops}));
      CUDA_REQUIRE_LAUNCH(kernels::launch_demote_ranged(pool.ref(), dops.get(), range.get(),
                                                        1 + static_cast<int>(rng() % 7), nullptr));
    } else {
      CUDA_REQUIRE(dops.upload(ops));
      CUDA_REQUIRE_LAUNCH(kernels::launch_demote(pool.ref(), dops.get(), num_ops, nullptr));
    }
    INFO("geometry H=" << g.num_kv_heads << " D=" << g.head_dim << " tokens16=" << g.tokens16
                       << " ranged " << ranged);
    require_same_pool(pool);
  }
}
