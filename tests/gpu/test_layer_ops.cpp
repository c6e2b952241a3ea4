// Per-layer kernels (kernels/model/layer_ops.h) against small host references on fresh random
// inputs: embedding and the residual add exactly, RMSNorm / SiLU / RoPE within stated bounds of an
// fp64 reference, and the KV pool written by launch_rope_kv_write byte for byte against the CPU
// codec (cpu::write_kv) run on the GPU's own rotated K and biased V.
//
// Error bounds (u = 2^-24, the fp32 unit roundoff; bf16 keeps 8 significant bits, so rounding to
// nearest moves a value v by at most 2^-8 |v|):
//  - RMSNorm: the GPU's sum of squares is an fp32 tree (per-thread chains of <= 64 terms, then 5
//    shuffle levels and 8 partials): relative error <= ~80 u = 4.8e-6; inv = 1/sqrt(ss/dim + eps)
//    halves it and adds ~4 u; the two products add 2 u. So before the bf16 rounding the value is
//    within 1e-5 relative of the fp64 result (2x margin), and |out - ref| <= (2^-8 + 2e-5) |ref|.
//  - SiLU * up: g and u are the same fp32 sums as on the host (exact), expf is within 2 ulp, the
//    add, division and product round once each: <= 6 u before bf16, |out - ref| <= (2^-8 + 1e-6)
//    |ref| + 1e-30 (the absolute term covers expf(-g) overflowing to inf for g < -88, where the
//    GPU returns 0 and the fp64 value is below 1e-36).
//  - RoPE: the fp32 angle is bit-identical to the host's; cosf/sinf are within 2 ulp (<= 2^-23
//    absolute since |c|, |s| <= 1); each product and the sum round once. For a pair (a, b):
//    |out - ref| <= 2^-23 (|a| + |b|) + 3 u (|a| + |b|) < 2^-22 (|a| + |b|); checked at 2^-21.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "engine/backend/cpu/paged_attention.h"
#include "kernels/model/layer_ops.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/late_writer.h"

using namespace pmkv;
using gputest::DeviceBuffer;

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::vector<float> normal_vector(size_t n, float mean, float sigma, std::mt19937& rng) {
  std::normal_distribution<float> dist(mean, sigma);
  std::vector<float> v(n);
  for (float& x : v)
    x = dist(rng);
  return v;
}

// Counts elements with |got - ref| > tol(i) (NaN counts: the comparison fails) and reports the
// first one.
template <class Got, class Ref, class Tol>
void require_close(const char* what, size_t n, Got got, Ref ref, Tol tol) {
  size_t bad = 0, first = 0;
  double worst = 0.0;  // largest err / tol
  for (size_t i = 0; i < n; ++i) {
    const double g = got(i), r = ref(i), t = tol(i);
    const double err = std::fabs(g - r);
    if (!(err <= t)) {
      if (bad++ == 0) first = i;
    } else if (t > 0.0) {
      worst = std::max(worst, err / t);
    }
  }
  INFO(what << ": " << bad << " of " << n << " outside the bound; first at " << first << ": got "
            << (n ? got(first) : 0.0) << " ref " << (n ? ref(first) : 0.0) << " tol "
            << (n ? tol(first) : 0.0) << "; worst err/tol inside " << worst);
  REQUIRE(bad == 0);
}

}  // namespace

// ---- embedding ------------------------------------------------------------------------------

TEST_CASE("gpu embedding: rows gathered exactly, out-of-range ids give zero rows",
          "[gpu][layer_ops]") {
  std::mt19937 rng(gputest::test_seed("embedding"));
  struct Shape {
    int32_t vocab, hidden, rows;
    int32_t table_offset;  // elements: 1 misaligns the table (scalar path)
  };
  // 4096 and 72: 16-byte path; 100 (not a multiple of 8) and the offset table: scalar path.
  const Shape shapes[] = {{1000, 4096, 7, 0}, {37, 72, 1, 0}, {50, 100, 33, 0}, {64, 256, 5, 1}};
  for (const Shape& s : shapes) {
    // Every 16-bit pattern (NaN, inf, subnormals included): the widening is a pure bit shift.
    std::vector<uint16_t> table(static_cast<size_t>(s.vocab) * s.hidden + s.table_offset);
    for (uint16_t& b : table)
      b = static_cast<uint16_t>(rng());
    std::vector<int32_t> ids(s.rows);
    for (int32_t& id : ids)
      id = static_cast<int32_t>(rng() % s.vocab);
    if (s.rows > 2) {
      ids[1] = -1;
      ids[2] = s.vocab;
      ids[s.rows - 1] = std::numeric_limits<int32_t>::max();
    }
    DeviceBuffer<uint16_t> dtable;
    DeviceBuffer<int32_t> dids;
    DeviceBuffer<float> dx(static_cast<size_t>(s.rows) * s.hidden);
    CUDA_REQUIRE(dtable.upload(table));
    CUDA_REQUIRE(dids.upload(ids));
    CUDA_REQUIRE(dx.poison());
    CUDA_REQUIRE_LAUNCH(kernels::launch_embedding(dtable.get() + s.table_offset, s.vocab,
                                                  dids.get(), s.rows, s.hidden, dx.get(), nullptr));
    std::vector<float> x;
    CUDA_REQUIRE(dx.download(x));
    INFO("vocab " << s.vocab << " hidden " << s.hidden << " rows " << s.rows << " offset "
                  << s.table_offset);
    size_t bad = 0;
    for (int32_t r = 0; r < s.rows; ++r) {
      const bool ok = ids[r] >= 0 && ids[r] < s.vocab;
      for (int32_t i = 0; i < s.hidden; ++i) {
        const uint32_t want =
            ok ? uint32_t{table[s.table_offset + static_cast<size_t>(ids[r]) * s.hidden + i]} << 16
               : 0u;
        bad += float_bits(x[static_cast<size_t>(r) * s.hidden + i]) != want;
      }
    }
    REQUIRE(bad == 0);
  }
}

// ---- residual add + RMSNorm -----------------------------------------------------------------

namespace {

enum class NormMode {
  kResidual,     // delta (+ bias) added into x, then normed
  kPlain,        // no delta: norm of x, x untouched
  kGather,       // row_index, no delta: the final norm of selected rows
  kGatherDelta,  // row_index with delta: y formed but x untouched
};

void run_rmsnorm_case(int32_t rows, int32_t dim, NormMode mode, bool with_bias, bool misalign,
                      std::mt19937& rng) {
  const bool gather = mode == NormMode::kGather || mode == NormMode::kGatherDelta;
  const bool with_delta = mode == NormMode::kResidual || mode == NormMode::kGatherDelta;
  with_bias = with_bias && with_delta;
  const int32_t x_rows = gather ? 2 * rows + 3 : rows + 2;  // extra rows must stay untouched
  const float sigma = std::array<float, 3>{1e-2f, 1.0f, 30.0f}[rng() % 3];
  const std::vector<float> x = normal_vector(static_cast<size_t>(x_rows) * dim, 0.0f, sigma, rng);
  const std::vector<float> delta =
      normal_vector(static_cast<size_t>(x_rows) * dim, 0.0f, sigma, rng);
  const std::vector<float> bias = normal_vector(dim, 0.0f, 0.5f * sigma, rng);
  // One spare element in front: weight_off = 1 misaligns weight and forces the scalar path.
  std::vector<float> weight = normal_vector(dim + 1, 1.0f, 0.3f, rng);
  const float eps = rng() % 2 ? 1e-6f : 1e-5f;
  std::vector<int32_t> row_index(rows);
  for (int32_t r = 0; r < rows; ++r)
    row_index[r] = gather ? static_cast<int32_t>(rng() % x_rows) : r;  // repeats allowed

  DeviceBuffer<float> dx, ddelta, dbias, dweight;
  DeviceBuffer<int32_t> dindex;
  DeviceBuffer<uint16_t> dout(static_cast<size_t>(rows) * dim);
  CUDA_REQUIRE(dx.upload(x));
  CUDA_REQUIRE(ddelta.upload(delta));
  CUDA_REQUIRE(dbias.upload(bias));
  CUDA_REQUIRE(dweight.upload(weight));
  CUDA_REQUIRE(dindex.upload(row_index));
  CUDA_REQUIRE(dout.poison());
  kernels::AddRmsNormParams p;
  p.x = dx.get();
  p.delta = with_delta ? ddelta.get() : nullptr;
  p.bias = with_bias ? dbias.get() : nullptr;
  p.weight = dweight.get() + (misalign ? 1 : 0);
  p.eps = eps;
  p.rows = rows;
  p.dim = dim;
  p.row_index = gather ? dindex.get() : nullptr;
  p.out = dout.get();
  CUDA_REQUIRE_LAUNCH(kernels::launch_add_rmsnorm(p, nullptr));
  std::vector<float> x_after;
  std::vector<uint16_t> out;
  CUDA_REQUIRE(dx.download(x_after));
  CUDA_REQUIRE(dout.download(out));

  const float* w = weight.data() + (misalign ? 1 : 0);
  // y in fp32 exactly as the CPU forms it (x + (delta + bias)): the GPU must store these bits.
  std::vector<float> y(static_cast<size_t>(rows) * dim);
  std::vector<double> ref(y.size());
  for (int32_t r = 0; r < rows; ++r) {
    const size_t s = static_cast<size_t>(row_index[r]) * dim;
    double ss = 0.0;
    for (int32_t i = 0; i < dim; ++i) {
      float v = x[s + i];
      if (with_delta) v = v + (with_bias ? delta[s + i] + bias[i] : delta[s + i]);
      y[static_cast<size_t>(r) * dim + i] = v;
      ss += double{v} * v;
    }
    const double inv = 1.0 / std::sqrt(ss / dim + double{eps});
    for (int32_t i = 0; i < dim; ++i) {
      const size_t k = static_cast<size_t>(r) * dim + i;
      ref[k] = double{w[i]} * (double{y[k]} * inv);
    }
  }
  require_close(
      "rmsnorm out", out.size(), [&](size_t i) { return double{gputest::from_bf16(out[i])}; },
      [&](size_t i) { return ref[i]; },
      [&](size_t i) { return (std::ldexp(1.0, -8) + 2e-5) * std::fabs(ref[i]) + 1e-30; });

  // The residual stream: y stored bit for bit in the residual mode, x untouched otherwise.
  size_t bad = 0;
  for (int32_t r = 0; r < x_rows; ++r) {
    for (int32_t i = 0; i < dim; ++i) {
      const size_t k = static_cast<size_t>(r) * dim + i;
      const bool written = mode == NormMode::kResidual && r < rows;
      const float want = written ? y[k] : x[k];
      bad += float_bits(x_after[k]) != float_bits(want);
    }
  }
  INFO("residual stream: " << bad << " elements differ");
  REQUIRE(bad == 0);
}

}  // namespace

TEST_CASE("gpu add_rmsnorm: residual add exact, bf16 norm within 2^-8 relative",
          "[gpu][layer_ops]") {
  std::mt19937 rng(gputest::test_seed("add_rmsnorm"));
  // <= 1024: a warp per row; above: a CTA per row. dim % 4 != 0 (and the misaligned weight):
  // scalar loads.
  const int32_t dims[] = {64, 1000, 1022, 4096, 4097, 5000, 16384};
  const int32_t row_counts[] = {1, 3, 17};
  const NormMode modes[] = {NormMode::kResidual, NormMode::kPlain, NormMode::kGather,
                            NormMode::kGatherDelta};
  for (const int32_t dim : dims) {
    for (const int32_t rows : row_counts) {
      for (const NormMode mode : modes) {
        const bool with_bias = rng() % 2 != 0;
        const bool misalign = rng() % 4 == 0;
        INFO("dim " << dim << " rows " << rows << " mode " << static_cast<int>(mode) << " bias "
                    << with_bias << " misaligned weight " << misalign);
        run_rmsnorm_case(rows, dim, mode, with_bias, misalign, rng);
      }
    }
  }
}

// ---- bias + RoPE + KV write -----------------------------------------------------------------

namespace {

constexpr int kBits[4] = {16, 8, 4, 2};

struct RopeShape {
  int32_t num_heads, num_kv_heads, head_dim, tokens16;
};

int64_t first_diff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  if (a.size() != b.size()) return 0;
  const auto m = std::mismatch(a.begin(), a.end(), b.begin());
  return m.first == a.end() ? -1 : m.first - a.begin();
}

// Fills one head's values: normal with an offset, or one of the codec's special cases (constant
// rows: scale clamps to 1e-5; huge ranges: 1e5; signed zeros at the extremes, which the
// pair-wise lane layout of the RoPE kernel must break ties on like the CPU's scan).
void fill_head(float* h, int32_t d, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const float o = std::uniform_real_distribution<float>(-3.0f, 3.0f)(rng);
  const int kind = static_cast<int>(rng() % 12);
  for (int32_t i = 0; i < d; ++i)
    h[i] = o + dist(rng);
  if (kind == 0) std::fill(h, h + d, o);
  if (kind == 1)
    for (int32_t i = 0; i < d; ++i)
      h[i] *= 3e6f;
  if (kind == 2) {
    for (int32_t i = 0; i < d; ++i)
      h[i] = std::fabs(h[i]);
    h[rng() % d] = -0.0f;
    h[rng() % d] = 0.0f;
  }
  if (kind == 3) {
    for (int32_t i = 0; i < d; ++i)
      h[i] = -std::fabs(h[i]);
    h[rng() % d] = 0.0f;
    h[rng() % d] = -0.0f;
  }
}

void run_rope_case(const RopeShape& sh, int32_t want_rows, bool with_bias, int32_t stride_pad,
                   std::mt19937& rng) {
  const kv::PageGeometry g{sh.num_kv_heads, sh.head_dim, sh.tokens16};
  const int32_t d = sh.head_dim, half = d / 2;
  const int64_t q_width = int64_t{sh.num_heads} * d, kv_width = int64_t{sh.num_kv_heads} * d;
  const int64_t width = q_width + 2 * kv_width, stride = width + stride_pad;

  // The pool: garbage everywhere; each page one bit-width; each row a distinct (page, slot).
  const int32_t num_pages = 24;
  const int64_t page_bytes = kv::page_bytes(g);
  std::vector<std::byte> pool(static_cast<size_t>(page_bytes) * num_pages);
  for (std::byte& b : pool)
    b = static_cast<std::byte>(rng() & 0xFF);
  std::vector<int32_t> page_bits(num_pages);
  std::vector<std::pair<int32_t, int32_t>> free_slots;
  for (int32_t pg = 0; pg < num_pages; ++pg) {
    page_bits[pg] = kBits[rng() % 4];
    for (int32_t s = 0; s < kv::tokens_per_page(g, page_bits[pg]); ++s)
      free_slots.push_back({pg, s});
  }
  std::shuffle(free_slots.begin(), free_slots.end(), rng);
  const int32_t rows = std::min<int32_t>(want_rows, static_cast<int32_t>(free_slots.size()));
  std::vector<int32_t> ids(rows), bits(rows), slots(rows), positions(rows);
  for (int32_t r = 0; r < rows; ++r) {
    ids[r] = free_slots[r].first;
    bits[r] = page_bits[ids[r]];
    slots[r] = free_slots[r].second;
    // Small positions and long-context ones (large angles: cosf/sinf's slow range reduction).
    positions[r] = static_cast<int32_t>(rng() % 2 ? rng() % 64 : rng() % 300000);
  }
  positions[0] = 0;

  // inv_freq as the host computes it (default RoPE), sometimes with a linear scaling factor.
  const double theta = rng() % 2 ? 10000.0 : 1000000.0;
  const double factor = rng() % 3 == 0 ? 8.0 : 1.0;
  std::vector<float> inv_freq(half);
  for (int32_t i = 0; i < half; ++i)
    inv_freq[i] = static_cast<float>(1.0 / std::pow(theta, 2.0 * i / d) / factor);

  std::vector<float> qkv(static_cast<size_t>(rows) * stride);
  for (int32_t r = 0; r < rows; ++r) {
    float* row = qkv.data() + static_cast<size_t>(r) * stride;
    for (int64_t c = 0; c < width; c += d)
      fill_head(row + c, d, rng);
    for (int64_t c = width; c < stride; ++c)
      row[c] = -7.25f;  // padding columns: must stay as they are
  }
  std::vector<float> bias = normal_vector(width, 0.0f, 0.5f, rng);

  DeviceBuffer<float> dqkv, dbias, dinv, dq(static_cast<size_t>(rows) * q_width);
  DeviceBuffer<int32_t> dpos, dids, dbits, dslots;
  DeviceBuffer<std::byte> dpool;
  CUDA_REQUIRE(dqkv.upload(qkv));
  CUDA_REQUIRE(dbias.upload(bias));
  CUDA_REQUIRE(dinv.upload(inv_freq));
  CUDA_REQUIRE(dpos.upload(positions));
  CUDA_REQUIRE(dids.upload(ids));
  CUDA_REQUIRE(dbits.upload(bits));
  CUDA_REQUIRE(dslots.upload(slots));
  CUDA_REQUIRE(dpool.upload(pool));
  CUDA_REQUIRE(dq.poison());
  kernels::RopeKvWriteParams p;
  p.qkv = dqkv.get();
  p.qkv_stride = stride;
  p.bias = with_bias ? dbias.get() : nullptr;
  p.rows = rows;
  p.num_heads = sh.num_heads;
  p.num_kv_heads = sh.num_kv_heads;
  p.head_dim = d;
  p.positions = dpos.get();
  p.inv_freq = dinv.get();
  p.q_out = dq.get();
  p.pool = {dpool.get(), page_bytes, g};
  p.page_ids = dids.get();
  p.bits = dbits.get();
  p.slots = dslots.get();
  CUDA_REQUIRE_LAUNCH(kernels::launch_rope_kv_write(p, nullptr));
  std::vector<float> qkv_gpu, q_gpu;
  std::vector<std::byte> pool_gpu;
  CUDA_REQUIRE(dqkv.download(qkv_gpu));
  CUDA_REQUIRE(dq.download(q_gpu));
  CUDA_REQUIRE(dpool.download(pool_gpu));
  {
    // Programmatic dependent launch after a kernel that lets it start at once and writes qkv
    // only 100 us later (poisoned until then): the same bytes come out, so no CTA read qkv or
    // wrote anything before its wait.
    DeviceBuffer<float> qkv_src;
    CUDA_REQUIRE(qkv_src.upload(qkv));
    CUDA_REQUIRE(dqkv.poison());
    CUDA_REQUIRE(dq.poison());
    CUDA_REQUIRE(dpool.upload(pool));
    kernels::RopeKvWriteParams pp = p;
    pp.pdl = true;
    CUDA_REQUIRE(gputest::run_after_late_copies(
        {qkv_src.get(), dqkv.get(), static_cast<int64_t>(dqkv.bytes())}, {}, 100,
        [&](cudaStream_t st) { return kernels::launch_rope_kv_write(pp, st); }));
    std::vector<float> qkv_pdl, q_pdl;
    std::vector<std::byte> pool_pdl;
    CUDA_REQUIRE(dqkv.download(qkv_pdl));
    CUDA_REQUIRE(dq.download(q_pdl));
    CUDA_REQUIRE(dpool.download(pool_pdl));
    INFO("a dependent launch differs from a plain one");
    REQUIRE(std::memcmp(qkv_pdl.data(), qkv_gpu.data(), dqkv.bytes()) == 0);
    REQUIRE(std::memcmp(q_pdl.data(), q_gpu.data(), dq.bytes()) == 0);
    REQUIRE(pool_pdl == pool_gpu);
  }

  // fp64 reference of the rotation: the biased inputs and the angle in fp32 as the CPU forms
  // them (bit-identical on the GPU), cos, sin and the rotation in fp64. For element k of a
  // head: ref value, and |a| + |b| of its pair for the bound.
  std::vector<double> q_ref(static_cast<size_t>(rows) * q_width), q_mag(q_ref.size());
  std::vector<double> k_ref(static_cast<size_t>(rows) * kv_width), k_mag(k_ref.size());
  std::vector<float> v_want(static_cast<size_t>(rows) * kv_width);  // biased v, exact
  for (int32_t r = 0; r < rows; ++r) {
    const float* row = qkv.data() + static_cast<size_t>(r) * stride;
    std::vector<double> c(half), s(half);
    for (int32_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[r]) * inv_freq[i];
      c[i] = std::cos(double{angle});
      s[i] = std::sin(double{angle});
    }
    auto rotate = [&](int64_t col, double* out, double* mag) {  // one head at column col
      for (int32_t i = 0; i < half; ++i) {
        float a = row[col + i], b = row[col + i + half];
        if (with_bias) {
          a = a + bias[col + i];
          b = b + bias[col + i + half];
        }
        out[i] = double{a} * c[i] - double{b} * s[i];
        out[i + half] = double{b} * c[i] + double{a} * s[i];
        mag[i] = mag[i + half] = std::fabs(double{a}) + std::fabs(double{b});
      }
    };
    for (int32_t h = 0; h < sh.num_heads; ++h) {
      const size_t o = static_cast<size_t>(r) * q_width + static_cast<size_t>(h) * d;
      rotate(int64_t{h} * d, &q_ref[o], &q_mag[o]);
    }
    for (int32_t h = 0; h < sh.num_kv_heads; ++h) {
      const size_t o = static_cast<size_t>(r) * kv_width + static_cast<size_t>(h) * d;
      rotate(q_width + int64_t{h} * d, &k_ref[o], &k_mag[o]);
    }
    for (int64_t i = 0; i < kv_width; ++i) {
      const int64_t col = q_width + kv_width + i;
      v_want[static_cast<size_t>(r) * kv_width + i] = with_bias ? row[col] + bias[col] : row[col];
    }
  }
  const double rel = std::ldexp(1.0, -21);
  require_close(
      "rotated q (q_out)", q_ref.size(), [&](size_t i) { return double{q_gpu[i]}; },
      [&](size_t i) { return q_ref[i]; }, [&](size_t i) { return rel * q_mag[i] + 1e-30; });
  auto k_at = [&](size_t i) {  // i over [rows, kv_width]
    const size_t r = i / kv_width, c = i % kv_width;
    return double{qkv_gpu[r * stride + q_width + c]};
  };
  require_close(
      "rotated k (stored in qkv)", k_ref.size(), k_at, [&](size_t i) { return k_ref[i]; },
      [&](size_t i) { return rel * k_mag[i] + 1e-30; });
  // q columns and padding untouched, v columns the biased v bit for bit.
  size_t bad_q = 0, bad_v = 0, bad_pad = 0;
  for (int32_t r = 0; r < rows; ++r) {
    const size_t o = static_cast<size_t>(r) * stride;
    for (int64_t c = 0; c < q_width; ++c)
      bad_q += float_bits(qkv_gpu[o + c]) != float_bits(qkv[o + c]);
    for (int64_t c = 0; c < kv_width; ++c) {
      bad_v += float_bits(qkv_gpu[o + q_width + kv_width + c]) !=
               float_bits(v_want[static_cast<size_t>(r) * kv_width + c]);
    }
    for (int64_t c = width; c < stride; ++c)
      bad_pad += float_bits(qkv_gpu[o + c]) != float_bits(qkv[o + c]);
  }
  INFO("q columns changed " << bad_q << ", v columns wrong " << bad_v << ", padding changed "
                            << bad_pad);
  REQUIRE(bad_q == 0);
  REQUIRE(bad_v == 0);
  REQUIRE(bad_pad == 0);

  // The pool: the CPU codec on the GPU's own k (rotated) and v rows, into the same slots.
  const cpu::KvPoolView view{pool.data(), page_bytes, g};
  for (int32_t r = 0; r < rows; ++r) {
    const float* row = qkv_gpu.data() + static_cast<size_t>(r) * stride;
    const std::vector<kv::PageRef> table = {{ids[r], bits[r], slots[r] + 1}};
    cpu::write_kv(view, table, slots[r], 1, row + q_width, kv_width, row + q_width + kv_width,
                  kv_width);
  }
  const int64_t diff = first_diff(pool, pool_gpu);
  INFO("pool: first differing byte " << diff << " (page " << (diff < 0 ? -1 : diff / page_bytes)
                                     << ", offset " << (diff < 0 ? -1 : diff % page_bytes) << ")");
  REQUIRE(diff == -1);
}

}  // namespace

TEST_CASE("gpu rope_kv_write: rotation within bounds, pool byte-equal to write_kv",
          "[gpu][layer_ops]") {
  std::mt19937 rng(gputest::test_seed("rope_kv_write"));
  // Llama-3-8B, Qwen2-7B (7 query heads per KV head), MHA, head_dim 256 with one KV head, and
  // head dims that are not multiples of 64 (80: d/2 = 40 spans two lane passes; 32: lanes idle).
  const RopeShape shapes[] = {{32, 8, 128, 16}, {28, 4, 128, 16}, {4, 4, 64, 4},
                              {8, 1, 256, 2},   {6, 2, 80, 4},    {3, 1, 32, 2}};
  const int32_t row_counts[] = {1, 7, 40};
  for (const RopeShape& sh : shapes) {
    for (const int32_t rows : row_counts) {
      const bool with_bias = rng() % 2 != 0;
      const int32_t stride_pad = rng() % 2 ? 0 : 5;
      INFO("heads " << sh.num_heads << "/" << sh.num_kv_heads << " head_dim " << sh.head_dim
                    << " tokens16 " << sh.tokens16 << " rows " << rows << " bias " << with_bias
                    << " stride pad " << stride_pad);
      run_rope_case(sh, rows, with_bias, stride_pad, rng);
    }
  }
}

// ---- SiLU-gated activation ------------------------------------------------------------------

TEST_CASE("gpu silu_mul: bf16 output within 2^-8 relative of fp64", "[gpu][layer_ops]") {
  std::mt19937 rng(gputest::test_seed("silu_mul"));
  struct Shape {
    int32_t rows, n;
    int32_t out_offset;  // elements: 1 misaligns out (scalar path)
  };
  // n % 8 == 0: 16-byte path; 13 and 4100: scalar; 14336: Llama-3-8B's intermediate size.
  const Shape shapes[] = {{1, 8, 0},    {5, 1000, 0},  {64, 13, 0},
                          {3, 4100, 0}, {2, 14336, 0}, {7, 512, 1}};
  for (const Shape& s : shapes) {
    for (const bool with_bias : {false, true})
      for (const kernels::GateUpLayout layout :
           {kernels::GateUpLayout::kStacked, kernels::GateUpLayout::kInterleaved8}) {
        const bool inter = layout == kernels::GateUpLayout::kInterleaved8;
        if (inter && s.n % 8 != 0) {  // rejected without a launch
          DeviceBuffer<uint16_t> some(16);
          CHECK(kernels::launch_silu_mul(some.get(), nullptr, s.rows, s.n, some.get(), nullptr,
                                         layout) == cudaErrorInvalidValue);
          continue;
        }
        const size_t total = static_cast<size_t>(s.rows) * 2 * s.n;
        std::vector<uint16_t> gate_up(total);
        std::normal_distribution<float> dist(0.0f, 3.0f);
        for (size_t i = 0; i < total; ++i) {
          float f = dist(rng);
          if (rng() % 64 == 0) f *= 40.0f;  // far tails: expf(-g) over- and underflows
          gate_up[i] = gputest::to_bf16(f);
        }
        const std::vector<float> bias =
            normal_vector(2 * static_cast<size_t>(s.n), 0.0f, 0.5f, rng);
        DeviceBuffer<uint16_t> dgu, dout(static_cast<size_t>(s.rows) * s.n + s.out_offset);
        DeviceBuffer<float> dbias;
        CUDA_REQUIRE(dgu.upload(gate_up));
        CUDA_REQUIRE(dbias.upload(bias));
        CUDA_REQUIRE(dout.poison());
        CUDA_REQUIRE_LAUNCH(kernels::launch_silu_mul(dgu.get(), with_bias ? dbias.get() : nullptr,
                                                     s.rows, s.n, dout.get() + s.out_offset,
                                                     nullptr, layout));
        std::vector<uint16_t> out;
        CUDA_REQUIRE(dout.download(out));
        std::vector<double> ref(static_cast<size_t>(s.rows) * s.n);
        for (int32_t r = 0; r < s.rows; ++r) {
          for (int32_t i = 0; i < s.n; ++i) {
            const size_t o = static_cast<size_t>(r) * 2 * s.n;
            const size_t gi = inter ? 16 * (i / 8) + i % 8 : i;
            const size_t ui = inter ? gi + 8 : s.n + i;
            float g = gputest::from_bf16(gate_up[o + gi]), u = gputest::from_bf16(gate_up[o + ui]);
            if (with_bias) {  // the same fp32 sums as the GPU's
              g = g + bias[i];
              u = u + bias[s.n + i];
            }
            ref[static_cast<size_t>(r) * s.n + i] = double{g} / (1.0 + std::exp(-double{g})) * u;
          }
        }
        INFO("rows " << s.rows << " n " << s.n << " out offset " << s.out_offset << " bias "
                     << with_bias << " interleaved " << inter);
        require_close(
            "silu_mul out", ref.size(),
            [&](size_t i) { return double{gputest::from_bf16(out[s.out_offset + i])}; },
            [&](size_t i) { return ref[i]; },
            [&](size_t i) { return (std::ldexp(1.0, -8) + 1e-6) * std::fabs(ref[i]) + 1e-30; });
        if (s.out_offset > 0) REQUIRE(out[0] == 0xFFFF);  // the element before out: untouched
      }
  }
}
