// Prefill attention (cached tokens through mixed-bit pages + the step's own fp32 K/V) against fp64
// host references. The pages are made by the CPU codec (cpu::write_kv) and read back through
// cpu::read_kv, as test_decode.cpp does.
//
// Two references per output element, both fp64:
//  - exact: over the dequantized cached K/V and the fp32 step K/V and q, as the CPU backend means;
//  - emulated: the same over the bf16-rounded q, K and V the kernel feeds its tensor cores.
// Bounds (bf16 output; u = 2^-8 bounds the relative error of rounding to bf16, half an ulp of an
// 8-bit significand):
//  - vs emulated, rigorous: |err| <= (u + 2^-14) |ref| + (2^-7 + 2^-10) R, R = half the range of
//  the
//    visible V values of that (row, head, dim). The kernel rounds each softmax weight to bf16
//    (relative u) and normalizes by the sum of the rounded weights, so its output is a convex
//    combination whose weights are within a factor 1 +- 2u / (1 - u) of the exact ones: the error
//    is at most 2u / (1 - u) max |v_j - c| for any c, i.e. about 2^-7 R; 2^-10 R covers fp32 score
//    accumulation, ex2.approx and the rescaling products, 2^-14 |ref| the output rounding of a
//    slightly perturbed value. With q = 0 (uniform attention) every weight is exactly 1, so the
//    bound drops to (u + 2^-14) |ref| + 1e-5 R: the output is the mean of the visible values,
//    which catches a single key too many or too few (a shift of |v_j - mean| / count) even at
//    thousands of keys (the values have mean 0, so |ref| and its rounding are small).
//  - vs exact: |err| <= (u + 2^-14) |ref| + 8e-2 max |v| (over the visible keys of that row and KV
//    head). On top of the above, bf16 q and K perturb score j by scale * sum_d q_d k_d (e_q + e_k)
//    with |e| <= u, random signs over head_dim terms: a standard deviation of about
//    2^-9 scale ||q * k||_2, ~0.01 for the sharpest test queries (|q_d| ~ 3.3, logits of standard
//    deviation ~3.5), i.e. weights off by ~1 % relative; bf16 V adds <= u max |v|. This is the
//    operand precision of bf16 tensor cores, not a property of the kernel (which the emulated
//    bound pins down): typical worst 1.3e-2 max |v| over ~10^8 elements, but the tail of that
//    random-sign sum is long: one element in 4e7 exceeded 4e-2 in a run on the H200 (the emulated
//    bound held), hence 8e-2. Gross errors (a wrong page, bits or mask) are the emulated check's.
// The poisoned (NaN) output and workspace must be fully overwritten.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "engine/backend/cpu/paged_attention.h"
#include "kernels/attention/prefill.h"
#include "tests/gpu/gpu_test_util.h"

using namespace pmkv;
using gputest::DeviceBuffer;

namespace {

struct Shape {
  int heads_kv, group, head_dim, tokens16;
};

struct SeqSpec {
  int cached, rows;
};

// One layer of a step on the host, in the CPU backend's layout.
struct Batch {
  Shape s{};
  kv::PageGeometry g{};
  int64_t page_bytes = 0;
  int q_width = 0, kv_width = 0, qkv_width = 0;
  std::vector<int32_t> seq_starts{0}, seq_cached, cached_starts{0};
  std::vector<int32_t> page_starts{0}, page_ids, page_bits, page_tokens;
  std::vector<std::byte> pool;
  std::vector<std::vector<float>> kc, vc;  // per sequence: cached K/V as read_kv returns them
  std::vector<float> qkv;                  // [rows, qkv_width]: q | k | v of the step's rows

  int num_seqs() const { return static_cast<int>(seq_cached.size()); }
  int num_rows() const { return seq_starts.back(); }
};

// Page tables covering cached + rows tokens per sequence (as the engine's attention tables do;
// theirs hold the step's tokens in 16-bit window pages, these at any bits): a 16-bit sink page,
// then runs of random bit-widths with mostly full pages, some partial and the odd empty page. All
// tokens are written to the pages, but the step's tokens with decoy values: the kernel must take
// those from the fp32 rows, never from the pages.
Batch build_batch(const Shape& s, const std::vector<SeqSpec>& specs, std::mt19937& rng,
                  bool fast_random) {
  static constexpr int kBits[4] = {16, 8, 4, 2};
  Batch b;
  b.s = s;
  b.g = kv::PageGeometry{s.heads_kv, s.head_dim, s.tokens16};
  b.page_bytes = kv::page_bytes(b.g);
  b.kv_width = s.heads_kv * s.head_dim;
  b.q_width = b.kv_width * s.group;
  b.qkv_width = b.q_width + 2 * b.kv_width;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(-1.7f, 1.7f);  // unit variance, cheaper
  auto noise = [&] { return fast_random ? uni(rng) : normal(rng); };

  std::vector<std::vector<kv::PageRef>> tables;
  int next_page = 0;
  for (const SeqSpec& sp : specs) {
    std::vector<kv::PageRef> table;
    int left = sp.cached + sp.rows;
    auto add = [&](int bits, int want) {
      const int n = std::min(left, want);
      table.push_back({next_page++, bits, n});
      left -= n;
    };
    if (left > 0) add(16, 1 + static_cast<int>(rng() % kv::tokens_per_page(b.g, 16)));
    while (left > 0) {
      const int bits = kBits[rng() % 4];
      const int cap = kv::tokens_per_page(b.g, bits);
      for (int p = 1 + static_cast<int>(rng() % 4); p > 0 && left > 0; --p) {
        const int r = static_cast<int>(rng() % 10);
        add(bits, r == 0 ? 0 : r < 3 ? 1 + static_cast<int>(rng() % cap) : cap);
      }
    }
    tables.push_back(std::move(table));
    b.seq_cached.push_back(sp.cached);
    b.seq_starts.push_back(b.seq_starts.back() + sp.rows);
    b.cached_starts.push_back(b.cached_starts.back() + sp.cached);
  }
  // Scatter the pages over a larger pool in random order.
  const int num_pages = next_page + next_page / 4 + 1;
  std::vector<int> perm(num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  b.pool.resize(static_cast<size_t>(b.page_bytes) * num_pages);
  for (auto& x : b.pool)
    x = static_cast<std::byte>(rng() & 0xFF);
  const cpu::KvPoolView view{b.pool.data(), b.page_bytes, b.g};
  const int W = b.kv_width;
  for (size_t i = 0; i < specs.size(); ++i) {
    for (auto& p : tables[i])
      p.page = perm[p.page];
    const int len = specs[i].cached + specs[i].rows;
    std::vector<float> k(static_cast<size_t>(len) * W), v(k.size());
    for (size_t e = 0; e < k.size(); ++e) {
      k[e] = noise() + 0.5f * std::sin(0.1f * static_cast<float>(e % 97));
      v[e] = noise();  // mean 0: the uniform check compares small means
    }
    if (len > 0) cpu::write_kv(view, tables[i], 0, len, k.data(), W, v.data(), W);
    const int c = specs[i].cached;
    std::vector<float> kd(static_cast<size_t>(c) * W), vd(kd.size());
    if (c > 0) cpu::read_kv(view, tables[i], c, kd.data(), vd.data());
    b.kc.push_back(std::move(kd));
    b.vc.push_back(std::move(vd));
    for (const auto& p : tables[i]) {
      b.page_ids.push_back(p.page);
      b.page_bits.push_back(p.bits);
      b.page_tokens.push_back(p.num_tokens);
    }
    b.page_starts.push_back(static_cast<int32_t>(b.page_ids.size()));
  }
  // The step's rows: q with a random sharpness per (row, head) (peaky and flat softmaxes), fresh
  // K/V (not what the pages hold for these tokens).
  const int rows = b.num_rows(), D = s.head_dim;
  b.qkv.resize(static_cast<size_t>(rows) * b.qkv_width);
  for (int r = 0; r < rows; ++r) {
    float* row = b.qkv.data() + static_cast<size_t>(r) * b.qkv_width;
    for (int h = 0; h < s.heads_kv * s.group; ++h) {
      const float sharp = 0.3f + 3.0f * static_cast<float>(rng() % 1000) / 1000.0f;
      for (int d = 0; d < D; ++d)
        row[h * D + d] = sharp * noise();
    }
    for (int e = 0; e < W; ++e) {
      row[b.q_width + e] = noise() + 0.5f * std::sin(0.1f * static_cast<float>(e % 97));
      row[b.q_width + W + e] = noise();
    }
  }
  return b;
}

// Device copies of a batch's tables, pool and rows.
struct DeviceBatch {
  DeviceBuffer<int32_t> seq_starts, seq_cached, cached_starts, page_starts, page_ids, page_bits,
      page_tokens;
  DeviceBuffer<std::byte> pool;
  DeviceBuffer<float> qkv;
};

void upload(const Batch& b, DeviceBatch& d) {
  CUDA_REQUIRE(d.seq_starts.upload(b.seq_starts));
  CUDA_REQUIRE(d.seq_cached.upload(b.seq_cached));
  CUDA_REQUIRE(d.cached_starts.upload(b.cached_starts));
  CUDA_REQUIRE(d.page_starts.upload(b.page_starts));
  CUDA_REQUIRE(d.page_ids.upload(b.page_ids));
  CUDA_REQUIRE(d.page_bits.upload(b.page_bits));
  CUDA_REQUIRE(d.page_tokens.upload(b.page_tokens));
  CUDA_REQUIRE(d.pool.upload(b.pool));
  CUDA_REQUIRE(d.qkv.upload(b.qkv));
}

kernels::PrefillParams make_params(const Batch& b, const DeviceBatch& d, int window,
                                   DeviceBuffer<uint16_t>& out, DeviceBuffer<std::byte>& ws) {
  kernels::PrefillParams p;
  p.pool = d.pool.get();
  p.page_bytes = b.page_bytes;
  p.tokens16 = b.s.tokens16;
  p.num_heads = b.s.heads_kv * b.s.group;
  p.num_kv_heads = b.s.heads_kv;
  p.head_dim = b.s.head_dim;
  p.sliding_window = window;
  p.scale = 1.0f / std::sqrt(static_cast<float>(b.s.head_dim));
  p.num_seqs = b.num_seqs();
  p.num_rows = b.num_rows();
  p.max_rows_per_seq = 0;
  for (int i = 0; i < b.num_seqs(); ++i)
    p.max_rows_per_seq = std::max(p.max_rows_per_seq, b.seq_starts[i + 1] - b.seq_starts[i]);
  p.total_cached = b.cached_starts.back();
  p.seq_starts = d.seq_starts.get();
  p.seq_cached = d.seq_cached.get();
  p.cached_starts = d.cached_starts.get();
  p.page_starts = d.page_starts.get();
  p.page_ids = d.page_ids.get();
  p.page_bits = d.page_bits.get();
  p.page_tokens = d.page_tokens.get();
  p.q = d.qkv.get();
  p.q_stride = b.qkv_width;
  p.k = d.qkv.get() + b.q_width;
  p.v = d.qkv.get() + b.q_width + b.kv_width;
  p.kv_stride = b.qkv_width;
  out.resize(static_cast<size_t>(b.num_rows()) * b.q_width);
  p.out = out.get();
  p.workspace_bytes =
      kernels::prefill_workspace_bytes(p.total_cached, p.num_rows, p.num_kv_heads, p.head_dim);
  ws.resize(static_cast<size_t>(p.workspace_bytes));
  p.workspace = ws.get();
  return p;
}

// Reference of one row (all query heads): the exact and the emulated (bf16 q, K, V) outputs, the
// half range of the visible emulated V per (head, dim), max |v| over the visible keys per head.
struct RowRef {
  std::vector<double> exact, emul, half_range, vmax;
};

RowRef reference_row(const Batch& b, int seq, int i, int window, bool q_zero) {
  const int D = b.s.head_dim, G = b.s.group, H = b.s.heads_kv * G;
  const int cached = b.seq_cached[seq], row0 = b.seq_starts[seq];
  const int t = cached + i;
  const int lo = window > 0 ? std::max(0, t - window + 1) : 0;
  const double scale = 1.0f / std::sqrt(static_cast<float>(D));  // the float the kernel gets
  auto key = [&](int j, int kvh, bool is_v) -> const float* {
    if (j < cached)
      return (is_v ? b.vc : b.kc)[seq].data() + static_cast<size_t>(j) * b.kv_width + kvh * D;
    return b.qkv.data() + static_cast<size_t>(row0 + j - cached) * b.qkv_width + b.q_width +
           (is_v ? b.kv_width : 0) + kvh * D;
  };
  RowRef r;
  r.exact.assign(static_cast<size_t>(H) * D, 0.0);
  r.emul = r.exact;
  r.half_range = r.exact;
  r.vmax.assign(H, 0.0);
  const int n = t - lo + 1;
  std::vector<double> se(n), sr(n), qe(D), qr(D);
  for (int h = 0; h < H; ++h) {
    const int kvh = h / G;
    const float* q = b.qkv.data() + static_cast<size_t>(row0 + i) * b.qkv_width + h * D;
    for (int d = 0; d < D; ++d) {
      qe[d] = q_zero ? 0.0 : q[d];
      qr[d] = q_zero ? 0.0 : gputest::round_bf16(q[d]);
    }
    double me = -INFINITY, mr = -INFINITY;
    for (int j = lo; j <= t; ++j) {
      double de = 0, dr = 0;
      if (!q_zero) {
        const float* k = key(j, kvh, false);
        for (int d = 0; d < D; ++d) {
          de += qe[d] * k[d];
          dr += qr[d] * gputest::round_bf16(k[d]);
        }
      }
      se[j - lo] = de * scale;
      sr[j - lo] = dr * scale;
      me = std::max(me, se[j - lo]);
      mr = std::max(mr, sr[j - lo]);
    }
    double sum_e = 0, sum_r = 0;
    for (int x = 0; x < n; ++x) {
      sum_e += (se[x] = std::exp(se[x] - me));
      sum_r += (sr[x] = std::exp(sr[x] - mr));
    }
    double* oe = r.exact.data() + h * D;
    double* orr = r.emul.data() + h * D;
    std::vector<double> vmin(D, INFINITY), vmx(D, -INFINITY);
    for (int j = lo; j <= t; ++j) {
      const float* v = key(j, kvh, true);
      const double we = se[j - lo] / sum_e, wr = sr[j - lo] / sum_r;
      for (int d = 0; d < D; ++d) {
        const double vr = gputest::round_bf16(v[d]);
        oe[d] += we * v[d];
        orr[d] += wr * vr;
        vmin[d] = std::min(vmin[d], vr);
        vmx[d] = std::max(vmx[d], vr);
        r.vmax[h] = std::max(r.vmax[h], std::fabs(static_cast<double>(v[d])));
      }
    }
    for (int d = 0; d < D; ++d)
      r.half_range[h * D + d] = 0.5 * (vmx[d] - vmin[d]);
  }
  return r;
}

struct Worst {
  double tight = 0;   // max err / bound vs the emulated reference
  double loose = 0;   // max (err - u |ref|) / max|v| vs the exact reference
  double rel_l2 = 0;  // max per (row, head) relative L2 error vs the exact reference
};

// Checks rows `rows` (global row indices) of a kernel output against the references.
void check_rows(const Batch& b, const std::vector<uint16_t>& out, const std::vector<int>& rows,
                int window, bool q_zero, Worst& w) {
  const int D = b.s.head_dim, H = b.s.heads_kv * b.s.group;
  const double u = std::ldexp(1.0, -8) + std::ldexp(1.0, -14);
  const double c_p = q_zero ? 1e-5 : std::ldexp(1.0, -7) + std::ldexp(1.0, -10);
  for (const int row : rows) {
    const int seq = static_cast<int>(
        std::upper_bound(b.seq_starts.begin(), b.seq_starts.end(), row) - b.seq_starts.begin() - 1);
    const int i = row - b.seq_starts[seq];
    const RowRef ref = reference_row(b, seq, i, window, q_zero);
    for (int h = 0; h < H; ++h) {
      double num = 0, den = 0;
      for (int d = 0; d < D; ++d) {
        const int e = h * D + d;
        const double x = gputest::from_bf16(out[static_cast<size_t>(row) * b.q_width + e]);
        INFO("seq " << seq << " (cached " << b.seq_cached[seq] << ", rows "
                    << b.seq_starts[seq + 1] - b.seq_starts[seq] << ") row " << i << " head " << h
                    << " dim " << d << ": gpu " << x << " emulated " << ref.emul[e] << " exact "
                    << ref.exact[e] << " window " << window << (q_zero ? " q = 0" : ""));
        REQUIRE(std::isfinite(x));
        const double tight_bound = u * std::fabs(ref.emul[e]) + c_p * ref.half_range[e] + 1e-6;
        const double tight_err = std::fabs(x - ref.emul[e]);
        w.tight = std::max(w.tight, tight_err / tight_bound);
        REQUIRE(tight_err <= tight_bound);
        const double loose_err = std::fabs(x - ref.exact[e]);
        w.loose = std::max(w.loose, (loose_err - u * std::fabs(ref.exact[e])) / ref.vmax[h]);
        REQUIRE(loose_err <= u * std::fabs(ref.exact[e]) + 8e-2 * ref.vmax[h]);
        num += (x - ref.exact[e]) * (x - ref.exact[e]);
        den += ref.exact[e] * ref.exact[e];
      }
      if (den > 0) w.rel_l2 = std::max(w.rel_l2, std::sqrt(num / den));
    }
  }
}

// Runs the kernel on a poisoned output and workspace; returns the output.
std::vector<uint16_t> run(const Batch& b, const DeviceBatch& d, int window) {
  DeviceBuffer<uint16_t> out;
  DeviceBuffer<std::byte> ws;
  const kernels::PrefillParams p = make_params(b, d, window, out, ws);
  if (out.size() > 0) CUDA_REQUIRE(out.poison());
  if (ws.size() > 0) CUDA_REQUIRE(ws.poison());
  CUDA_REQUIRE_LAUNCH(kernels::launch_prefill(p, nullptr));
  std::vector<uint16_t> h;
  CUDA_REQUIRE(out.download(h));
  return h;
}

}  // namespace

TEST_CASE("gpu prefill attention: mixed-bit cache + step rows vs fp64 references",
          "[gpu][attention][prefill]") {
  std::mt19937 rng(gputest::test_seed("prefill"));
  const Shape shapes[] = {{2, 4, 128, 16}, {2, 1, 64, 4}, {1, 8, 128, 8},
                          {2, 8, 64, 16},  {3, 3, 64, 4}, {4, 1, 128, 4}};
  Worst worst, worst_uniform;
  for (const Shape& s : shapes) {
    auto r = [&](int lo, int span) { return lo + static_cast<int>(rng() % span); };
    // Cached 0 and 1 row included; a cache long enough for > 256 pages (several scan rounds of the
    // dequantization) at tokens16 = 4; a sequence without rows; chunked prefill.
    std::vector<SeqSpec> specs = {{0, 1},
                                  {0, r(200, 300)},
                                  {r(2500, 2500), 1},
                                  {17, r(1, 64)},
                                  {r(500, 1500), r(50, 100)},
                                  {r(40, 60), 0},
                                  {r(100, 300), r(100, 200)},
                                  {1, 2}};
    std::shuffle(specs.begin(), specs.end(), rng);
    const Batch b = build_batch(s, specs, rng, false);
    DeviceBatch d;
    upload(b, d);
    {  // the workspace holds every key, the step's rows included: one row short is rejected
      DeviceBuffer<uint16_t> out;
      DeviceBuffer<std::byte> ws;
      kernels::PrefillParams p = make_params(b, d, 0, out, ws);
      p.workspace_bytes = kernels::prefill_workspace_bytes(p.total_cached, p.num_rows - 1,
                                                           p.num_kv_heads, p.head_dim);
      REQUIRE(kernels::launch_prefill(p, nullptr) == cudaErrorInvalidValue);
    }
    Batch bz = b;  // q = 0: uniform attention over the visible keys
    for (int row = 0; row < bz.num_rows(); ++row)
      std::fill_n(bz.qkv.begin() + static_cast<size_t>(row) * bz.qkv_width, bz.q_width, 0.0f);
    DeviceBatch dz;
    upload(bz, dz);
    std::vector<int> all_rows(b.num_rows());
    std::iota(all_rows.begin(), all_rows.end(), 0);
    for (const int window : {0, r(1, 64), r(200, 400)}) {
      Worst w, wz;
      check_rows(b, run(b, d, window), all_rows, window, false, w);
      check_rows(bz, run(bz, dz, window), all_rows, window, true, wz);
      std::printf(
          "prefill H=%d G=%d D=%d tokens16=%d window %d: tight %.3f (uniform %.3f) of the bound, "
          "exact max err %.2e * max|v|, max rel L2 %.2e\n",
          s.heads_kv, s.group, s.head_dim, s.tokens16, window, w.tight, wz.tight, w.loose,
          w.rel_l2);
      worst.tight = std::max(worst.tight, w.tight);
      worst.loose = std::max(worst.loose, w.loose);
      worst.rel_l2 = std::max(worst.rel_l2, w.rel_l2);
      worst_uniform.tight = std::max(worst_uniform.tight, wz.tight);
    }
  }
  std::printf(
      "prefill: worst tight %.3f (uniform %.3f) of the bound, exact max err %.2e * max|v|, max "
      "rel L2 %.2e\n",
      worst.tight, worst_uniform.tight, worst.loose, worst.rel_l2);
}

TEST_CASE("gpu prefill attention: long prompts (timing, sampled rows)",
          "[gpu][attention][prefill]") {
  std::mt19937 rng(gputest::test_seed("prefill_long"));
  const Shape s{8, 4, 128, 16};  // 32 query heads, 8 KV heads
  struct Long {
    SeqSpec spec;
    int window;
  };
  for (const Long& L :
       {Long{{0, 4096}, 0}, Long{{0, 16384}, 0}, Long{{8192, 2048}, 0}, Long{{6000, 3000}, 1024}}) {
    const Batch b = build_batch(s, {L.spec}, rng, true);
    DeviceBatch d;
    upload(b, d);
    DeviceBuffer<uint16_t> out;
    DeviceBuffer<std::byte> ws;
    const kernels::PrefillParams p = make_params(b, d, L.window, out, ws);
    CUDA_REQUIRE(out.poison());
    CUDA_REQUIRE_LAUNCH(kernels::launch_prefill(p, nullptr));
    cudaEvent_t e0, e1;
    CUDA_REQUIRE(cudaEventCreate(&e0));
    CUDA_REQUIRE(cudaEventCreate(&e1));
    constexpr int kIters = 10;
    CUDA_REQUIRE(cudaEventRecord(e0, nullptr));
    for (int it = 0; it < kIters; ++it)
      CUDA_REQUIRE(kernels::launch_prefill(p, nullptr));
    CUDA_REQUIRE(cudaEventRecord(e1, nullptr));
    CUDA_REQUIRE(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_REQUIRE(cudaEventElapsedTime(&ms, e0, e1));
    ms /= kIters;
    CUDA_REQUIRE(cudaEventDestroy(e0));
    CUDA_REQUIRE(cudaEventDestroy(e1));
    // Visible (query, key) pairs times 4 flops per head dim (QK^T and PV).
    double pairs = 0;
    for (int i = 0; i < L.spec.rows; ++i) {
      const int t = L.spec.cached + i;
      pairs += L.window > 0 ? std::min(t + 1, L.window) : t + 1;
    }
    const double tflops = pairs * s.heads_kv * s.group * s.head_dim * 4 / (ms * 1e-3) / 1e12;
    std::vector<uint16_t> h;
    CUDA_REQUIRE(out.download(h));
    for (const uint16_t x : h)
      REQUIRE(std::isfinite(gputest::from_bf16(x)));
    std::vector<int> rows = {0, 1, 63, 64, L.spec.rows - 1};
    for (int k = 0; k < 3; ++k)
      rows.push_back(static_cast<int>(rng() % L.spec.rows));
    Worst w;
    check_rows(b, h, rows, L.window, false, w);
    std::printf(
        "prefill long: cached %d + %d rows, window %d, H=%d G=%d D=%d: %.3f ms (%.0f TFLOP/s), "
        "sampled tight %.3f of the bound, exact max err %.2e * max|v|, rel L2 %.2e\n",
        L.spec.cached, L.spec.rows, L.window, s.heads_kv, s.group, s.head_dim, ms, tflops, w.tight,
        w.loose, w.rel_l2);
  }
}
