// Skinny GEMM (kernels/gemm/skinny_gemm.h) against an fp64 host reference on random bf16 inputs.
//
// Error bound. The products a * w of two bf16 values are exact in fp32; the error is that of the
// fp32 sums. Each lane accumulates its k-slice through a chain of mma.sync (16 products each; the
// tensor core may truncate rather than round, so allow 2 ulp per step), and the KS partial sums
// are added in fp32 in shared memory. The chain is at most k / 16 + KS <= k / 8 + 8 steps long,
// each step adding at most 2^-23 of a partial sum bounded by S = sum_l |a[i, l]| |w[j, l]|, so
// |d - ref| <= (k / 8 + 8) 2^-23 S < max(k, 64) 2^-24 S (the bound checked, with >= 4x margin
// for k >= 64). A bf16 output is then rounded to nearest even: another 2^-8 |d| <= 2^-8 (|ref| +
// the fp32 bound). A small absolute 1e-30 covers S == 0.
//
// Every output is poisoned (0xFF bytes: NaN in fp32 and bf16) before the launch, so an element not
// written fails the comparison; a guard region after d[m, n] must keep its poison.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/gemm/skinny_gemm.h"
#include "kernels/model/fill.h"
#include "kernels/model/layer_ops.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/late_writer.h"

using namespace pmkv;
using gputest::DeviceBuffer;
using gputest::from_bf16;
using gputest::to_bf16;

namespace {

constexpr size_t kGuard = 64;  // poisoned elements after d[m, n]

struct Case {
  int64_t m, n, k;
  kernels::DType out;
  int32_t warp_rows = 0;  // tuning overrides (0 = automatic)
  int32_t k_split = 0;
  int32_t num_sms = 0;
  // On a stream of its own, right after another kernel: the programmatic dependent launch path
  // (the legacy default stream launches without it).
  bool pdl_stream = false;
  // The bulk kernel (sm_90+): a workspace is given and the case must take that path.
  bool bulk = false;
  bool compact = false;   // the bulk kernel's compact footprint (SkinnyGemmParams::compact)
  bool stream_k = false;  // the bulk kernel's split by units (SkinnyGemmParams::stream_k)
  bool claim = false;     // the bulk kernel's claimed tiles (SkinnyGemmParams::claim)
};

std::string describe(const Case& c) {
  return "m=" + std::to_string(c.m) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
         (c.out == kernels::DType::kF32 ? " f32" : " bf16") +
         " warp_rows=" + std::to_string(c.warp_rows) + " k_split=" + std::to_string(c.k_split) +
         " num_sms=" + std::to_string(c.num_sms) + (c.bulk ? " bulk" : "") +
         (c.compact ? " compact" : "") + (c.stream_k ? " stream_k" : "") +
         (c.claim ? " claim" : "");
}

std::vector<uint16_t> random_bf16(size_t count, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<uint16_t> v(count);
  for (uint16_t& x : v)
    x = to_bf16(dist(rng));
  return v;
}

// Runs one case on fresh inputs and checks every output and the guard region. Returns the raw
// output bytes (for the determinism check).
std::vector<uint8_t> run_case(const Case& c, std::mt19937& rng) {
  INFO(describe(c));
  const size_t mk = static_cast<size_t>(c.m * c.k), nk = static_cast<size_t>(c.n * c.k);
  const size_t mn = static_cast<size_t>(c.m * c.n);
  const std::vector<uint16_t> ha = random_bf16(mk, rng), hw = random_bf16(nk, rng);
  std::vector<float> fa(mk), fw(nk);
  for (size_t i = 0; i < mk; ++i)
    fa[i] = from_bf16(ha[i]);
  for (size_t i = 0; i < nk; ++i)
    fw[i] = from_bf16(hw[i]);

  DeviceBuffer<uint16_t> a, w;
  CUDA_REQUIRE(a.upload(ha));
  CUDA_REQUIRE(w.upload(hw));
  const size_t out_bytes = c.out == kernels::DType::kF32 ? 4 : 2;
  DeviceBuffer<uint8_t> d((mn + kGuard) * out_bytes);
  CUDA_REQUIRE(d.poison());
  CUDA_REQUIRE(cudaDeviceSynchronize());

  kernels::SkinnyGemmParams p;
  p.a = a.get();
  p.w = w.get();
  p.d = d.get();
  p.out = c.out;
  p.m = c.m;
  p.n = c.n;
  p.k = c.k;
  p.num_sms = c.num_sms;
  p.warp_rows = c.warp_rows;
  p.k_split = c.k_split;
  p.compact = c.compact;
  p.stream_k = c.stream_k;
  p.claim = c.claim;
  DeviceBuffer<uint8_t> ws;
  const int64_t counter_bytes = kernels::skinny_gemm_counter_bytes(c.n);
  if (c.bulk) {
    ws.resize(static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(c.n, c.num_sms)));
    CUDA_REQUIRE(ws.poison());  // partials: garbage until written
    CUDA_REQUIRE(cudaMemset(ws.get(), 0, static_cast<size_t>(counter_bytes)));
    CUDA_REQUIRE(cudaDeviceSynchronize());  // before a launch on a non-blocking stream
    p.bulk = true;
    p.workspace = ws.get();
    p.workspace_bytes = static_cast<int64_t>(ws.size());
    REQUIRE(kernels::skinny_gemm_uses_bulk(p));
    // One byte too few: the register kernel instead.
    kernels::SkinnyGemmParams small = p;
    --small.workspace_bytes;
    REQUIRE_FALSE(kernels::skinny_gemm_uses_bulk(small));
  }
  if (c.pdl_stream) {
    cudaStream_t s = nullptr;
    CUDA_REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    DeviceBuffer<float> scratch(1 << 16);
    CUDA_REQUIRE(kernels::launch_fill_f32(scratch.get(), 1 << 16, 1.0f, s));
    const cudaError_t e = kernels::launch_skinny_gemm(p, s);
    const cudaError_t sync = cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
    CUDA_REQUIRE(e);
    CUDA_REQUIRE(sync);
  } else {
    CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
  }
  std::vector<uint8_t> hd;
  CUDA_REQUIRE(d.download(hd));
  if (c.bulk) {  // every launch leaves the tile counters zero for the next one
    std::vector<uint8_t> hw_bytes;
    CUDA_REQUIRE(ws.download(hw_bytes));
    REQUIRE(std::all_of(hw_bytes.begin(), hw_bytes.begin() + counter_bytes,
                        [](uint8_t b) { return b == 0; }));
  }

  size_t bad = 0, first = 0;
  double first_got = 0, first_ref = 0, first_tol = 0, worst = 0;
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      const float* ar = fa.data() + i * c.k;
      const float* wr = fw.data() + j * c.k;
      double ref = 0.0, s = 0.0;
      for (int64_t l = 0; l < c.k; ++l) {
        const double prod = double(ar[l]) * double(wr[l]);
        ref += prod;
        s += std::fabs(prod);
      }
      const double tol32 = double(std::max<int64_t>(c.k, 64)) * std::ldexp(1.0, -24) * s + 1e-30;
      const size_t idx = static_cast<size_t>(i * c.n + j);
      double got, tol;
      if (c.out == kernels::DType::kF32) {
        float f;
        std::memcpy(&f, hd.data() + 4 * idx, 4);
        got = f;
        tol = tol32;
      } else {
        uint16_t b;
        std::memcpy(&b, hd.data() + 2 * idx, 2);
        got = from_bf16(b);
        tol = tol32 + std::ldexp(1.0, -8) * (std::fabs(ref) + tol32);
      }
      const double err = std::fabs(got - ref);
      if (!(err <= tol)) {
        if (bad++ == 0) {
          first = idx;
          first_got = got;
          first_ref = ref;
          first_tol = tol;
        }
      } else {
        worst = std::max(worst, err / tol);
      }
    }
  }
  INFO(bad << " of " << mn << " outside the bound; first at row " << first / c.n << " col "
           << first % c.n << ": got " << first_got << " ref " << first_ref << " tol " << first_tol
           << "; worst err/tol inside " << worst);
  REQUIRE(bad == 0);

  size_t guard_touched = 0;
  for (size_t b = mn * out_bytes; b < hd.size(); ++b)
    guard_touched += hd[b] != 0xFF ? 1 : 0;
  REQUIRE(guard_touched == 0);
  hd.resize(mn * out_bytes);
  return hd;
}

// The device runs the bulk kernel: sm_90+ with the shared memory it asks for per block. When it
// does not, says so (the calling test case then returns without running).
bool bulk_capable() {
  int dev = 0, optin = 0;
  const bool ok =
      gputest::device_is_sm90() && cudaGetDevice(&dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
      optin >= kernels::skinny_gemm_bulk_smem_bytes();
  if (!ok) WARN("the bulk kernel needs sm_90 and ~208 KB of shared memory per block: not run");
  return ok;
}

// Parameters of a bulk-kernel product d = a w^T over the zeroed workspace ws.
kernels::SkinnyGemmParams bulk_params(const uint16_t* a, const uint16_t* w, void* d,
                                      kernels::DType out, int64_t m, int64_t n, int64_t k,
                                      int32_t sms, DeviceBuffer<uint8_t>& ws) {
  kernels::SkinnyGemmParams p;
  p.a = a;
  p.w = w;
  p.d = d;
  p.out = out;
  p.m = m;
  p.n = n;
  p.k = k;
  p.num_sms = sms;
  p.bulk = true;
  p.workspace = ws.get();
  p.workspace_bytes = static_cast<int64_t>(ws.bytes());
  return p;
}

bool zero_bytes(const DeviceBuffer<uint8_t>& b, size_t count) {
  std::vector<uint8_t> v;
  if (b.download(v) != cudaSuccess) return false;
  return std::all_of(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(count),
                     [](uint8_t c) { return c == 0; });
}

// A bulk product's device buffers: random bf16 a [m, k] and w [n, k], an output of m x n x 4
// bytes (room for fp32) and a zeroed workspace for n columns on `sms` SMs.
struct BulkOperands {
  DeviceBuffer<uint16_t> a, w;
  DeviceBuffer<uint8_t> d, ws;
  BulkOperands(int64_t m, int64_t n, int64_t k, int32_t sms, std::mt19937& rng)
      : d(static_cast<size_t>(m * n * 4)),
        ws(static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(n, sms))) {
    CUDA_REQUIRE(a.upload(random_bf16(static_cast<size_t>(m * k), rng)));
    CUDA_REQUIRE(w.upload(random_bf16(static_cast<size_t>(n * k), rng)));
    CUDA_REQUIRE(cudaMemset(ws.get(), 0, ws.bytes()));
  }
};

}  // namespace

TEST_CASE("skinny gemm: fp32 and bf16 outputs match an fp64 reference over m, n, k",
          "[skinny_gemm]") {
  std::mt19937 rng(gputest::test_seed("skinny_gemm shapes"));
  const int64_t ms[] = {1, 2, 3, 7, 8, 9, 16};
  // n: 1, a single partial warp tile, not multiples of 16 / 32 / a CTA; k: the minimum, a
  // partial 32-block only, several batches with a partial block, exact batches.
  const int64_t ns[] = {1, 37, 300, 1000};
  const int64_t ks[] = {8, 40, 1000, 4104};
  for (const kernels::DType out : {kernels::DType::kF32, kernels::DType::kBF16})
    for (const int64_t m : ms)
      for (const int64_t n : ns)
        for (const int64_t k : ks)
          run_case({m, n, k, out}, rng);
}

TEST_CASE("skinny gemm: every warp tile and k split, with a machine size forcing each regime",
          "[skinny_gemm]") {
  std::mt19937 rng(gputest::test_seed("skinny_gemm configs"));
  for (const kernels::DType out : {kernels::DType::kF32, kernels::DType::kBF16})
    for (const int64_t m : {1, 5, 8, 12, 16})
      for (const int32_t rows : {16, 32})
        for (const int32_t split : {1, 2, 4, 8})
          run_case({m, 517, 2056, out, rows, split}, rng);
  // Automatic choices: a large machine (one wave at KS = 8), a tiny one (many waves, split by
  // batch count), and Llama-like shapes that pick 32-row tiles and mid splits.
  for (const int64_t m : {1, 3, 16}) {
    run_case({m, 6144, 4096, kernels::DType::kF32, 0, 0, 132, true}, rng);
    run_case({m, 1000, 4104, kernels::DType::kBF16, 0, 0, 0, true}, rng);
  }
  for (const int64_t m : {1, 16}) {
    run_case({m, 4096, 4096, kernels::DType::kF32, 0, 0, 132}, rng);
    run_case({m, 3000, 4096, kernels::DType::kBF16, 0, 0, 2}, rng);
    run_case({m, 9000, 1024, kernels::DType::kF32, 0, 0, 132}, rng);
    run_case({m, 1000, 14336, kernels::DType::kF32, 0, 0, 8}, rng);
  }
}

TEST_CASE("skinny gemm: the result is bit-identical run to run", "[skinny_gemm]") {
  const uint32_t seed = gputest::test_seed("skinny_gemm determinism");
  for (const int32_t split : {1, 8}) {
    const Case c{16, 777, 4104, kernels::DType::kF32, 16, split};
    std::mt19937 r1(seed), r2(seed);
    const std::vector<uint8_t> first = run_case(c, r1);
    const std::vector<uint8_t> second = run_case(c, r2);
    REQUIRE(first == second);
  }
}

TEST_CASE("skinny gemm: the bulk kernel over m, n, k and machine sizes that split tiles",
          "[skinny_gemm][bulk]") {
  if (!bulk_capable()) return;
  std::mt19937 rng(gputest::test_seed("skinny_gemm bulk"));
  // k: one 1024-unit, one 2048-unit, 3 x 1024, 7 x 2048 per tile; n: 1, partial tiles, many tiles;
  // num_sms: one CTA per unit or so (132), a few CTAs whose ranges end inside tiles (5), a tile
  // shared by 3 CTAs (40 over 19 tiles x 7 units). Each split by whole tiles where a launch has at
  // least as many tiles as CTAs (5 CTAs; n = 1000 at 40; n <= 37, one unit a tile) and by units
  // (stream_k, and every other launch); claimed tiles where the split is by tiles (else ignored).
  for (const kernels::DType out : {kernels::DType::kF32, kernels::DType::kBF16})
    for (const int64_t m : {1, 2, 5, 8})
      for (const auto& [n, k] : {std::pair<int64_t, int64_t>{1, 1024},
                                 {37, 2048},
                                 {300, 3072},
                                 {300, 14336},
                                 {1000, 4096}})
        for (const int32_t sms : {132, 5, 40})
          for (const bool compact : {false, true})
            for (const int split : {0, 1, 2})  // fixed ranges, stream_k, claimed
              run_case({m, n, k, out, 0, 0, sms, (m + n) % 2 == 0, true, compact, split == 1,
                        split == 2},
                       rng);
  // m > 8 takes the register kernel even with a workspace.
  {
    DeviceBuffer<uint16_t> a(9 * 1024), w(64 * 1024);
    DeviceBuffer<float> d(9 * 64);
    DeviceBuffer<uint8_t> ws(static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(64, 132)));
    kernels::SkinnyGemmParams p;
    p.a = a.get();
    p.w = w.get();
    p.d = d.get();
    p.m = 9;
    p.n = 64;
    p.k = 1024;
    p.bulk = true;
    p.workspace = ws.get();
    p.workspace_bytes = static_cast<int64_t>(ws.bytes());
    CHECK_FALSE(kernels::skinny_gemm_uses_bulk(p));
    p.m = 8;
    CHECK(kernels::skinny_gemm_uses_bulk(p));
  }
  // Llama-3-8B's decode shapes at m = 1 after another kernel on a stream (PDL).
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{6144, 4096}, {4096, 14336}})
    for (const bool compact : {false, true})
      for (const bool stream_k : {false, true})
        run_case({1, n, k, kernels::DType::kF32, 0, 0, 132, true, true, compact, stream_k}, rng);
}

// Under programmatic dependent launch the bulk kernel streams weights before the kernel before it
// has finished, but its consumers must read `a` (that kernel's output) only after it. The writer
// here stores the real `a` 100 us after letting the GEMM start; the result must equal a plain
// launch's.
TEST_CASE("skinny gemm: the bulk kernel reads a only after the kernel before it (PDL)",
          "[skinny_gemm][bulk]") {
  if (!bulk_capable()) return;
  std::mt19937 rng(gputest::test_seed("skinny_gemm bulk pdl"));
  for (const int64_t m : {1, 8})
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{6144, 4096}, {300, 14336}})
      for (const bool compact : {false, true}) {
        INFO("m=" << m << " n=" << n << " k=" << k << " compact=" << compact);
        const std::vector<uint16_t> ha = random_bf16(static_cast<size_t>(m * k), rng);
        const std::vector<uint16_t> hw = random_bf16(static_cast<size_t>(n * k), rng);
        DeviceBuffer<uint16_t> a_src, a_live(static_cast<size_t>(m * k)), w;
        CUDA_REQUIRE(a_src.upload(ha));
        CUDA_REQUIRE(w.upload(hw));
        DeviceBuffer<float> d(static_cast<size_t>(m * n));
        DeviceBuffer<uint8_t> ws(static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(n, 132)));
        CUDA_REQUIRE(cudaMemset(ws.get(), 0, ws.bytes()));
        kernels::SkinnyGemmParams p =
            bulk_params(a_src.get(), w.get(), d.get(), kernels::DType::kF32, m, n, k, 132, ws);
        p.compact = compact;
        REQUIRE(kernels::skinny_gemm_uses_bulk(p));
        CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
        std::vector<float> want, got;
        CUDA_REQUIRE(d.download(want));
        CUDA_REQUIRE(a_live.poison());
        CUDA_REQUIRE(d.poison());
        p.a = a_live.get();
        p.pdl = true;
        CUDA_REQUIRE(gputest::run_after_late_copies(
            {a_src.get(), a_live.get(), static_cast<int64_t>(a_src.bytes())}, {}, 100,
            [&](cudaStream_t st) { return kernels::launch_skinny_gemm(p, st); }));
        CUDA_REQUIRE(d.download(got));
        REQUIRE(std::memcmp(got.data(), want.data(), want.size() * 4) == 0);
      }
}

// Claimed tiles (SkinnyGemmParams::claim): each tile is still reduced by one CTA alike, so the
// output equals the fixed ranges' byte for byte, launch after launch (the last CTA resets the
// claim counter for the next one; a counter left behind would leave the poisoned output); gated
// and not, an odd number of tiles (a last claim of one tile), machine sizes of 132 and 40 CTAs.
TEST_CASE("skinny gemm: claimed tiles equal the fixed ranges, launch after launch",
          "[skinny_gemm][bulk]") {
  if (!bulk_capable()) return;
  std::mt19937 rng(gputest::test_seed("skinny_gemm claim"));
  for (const int64_t m : {1, 8})
    for (const auto& [n, k] :
         {std::pair<int64_t, int64_t>{1008, 4096}, {20000, 2048}, {4112, 14336}})
      for (const int32_t sms : {132, 40})
        for (const bool compact : {false, true})
          for (const bool gated : {false, true}) {
            INFO("m=" << m << " n=" << n << " k=" << k << " sms=" << sms << " compact=" << compact
                      << " gated=" << gated);
            BulkOperands op(m, n, k, sms, rng);
            DeviceBuffer<uint8_t>& d = op.d;
            kernels::SkinnyGemmParams p = bulk_params(
                op.a.get(), op.w.get(), d.get(),
                gated ? kernels::DType::kBF16 : kernels::DType::kF32, m, n, k, sms, op.ws);
            p.gated = gated;
            p.compact = compact;
            CUDA_REQUIRE(d.poison());
            CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
            std::vector<uint8_t> want, got;
            CUDA_REQUIRE(d.download(want));
            p.claim = true;
            int differing = 0;
            for (int r = 0; r < 8; ++r) {
              CUDA_REQUIRE(d.poison());
              CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
              CUDA_REQUIRE(d.download(got));
              if (got != want) ++differing;
            }
            CHECK(differing == 0);
            CHECK(zero_bytes(op.ws, static_cast<size_t>(kernels::skinny_gemm_counter_bytes(n))));
          }
}

TEST_CASE("skinny gemm: the bulk kernel is bit-identical run to run", "[skinny_gemm][bulk]") {
  if (!bulk_capable()) return;
  const uint32_t seed = gputest::test_seed("skinny_gemm bulk determinism");
  for (const int32_t sms : {132, 40, 19}) {
    const Case c{8, 300, 14336, kernels::DType::kF32, 0, 0, sms, false, true, sms == 40, sms != 19};
    std::mt19937 r1(seed), r2(seed);
    const std::vector<uint8_t> first = run_case(c, r1);
    const std::vector<uint8_t> second = run_case(c, r2);
    REQUIRE(first == second);
  }
  // Many launches on the same inputs, at m = 8 (the consumers read a from L2 and fall behind the
  // copies, so the ring runs full and every stage is refilled as soon as it is released) and with
  // several tile segments per CTA: a missing proxy fence between the consumers' reads and the
  // next copy into the stage showed up here as 5-100% of launches differing from the first.
  std::mt19937 rng(seed);
  for (const int variant : {0, 1, 2, 3, 4, 5, 6, 7}) {  // plain / gated x full / compact x split
    const bool gated = (variant & 1) != 0, compact = (variant & 2) != 0;
    const bool stream_k = (variant & 4) != 0;
    const int64_t m = 8, n = 4096, k = 4096;
    BulkOperands op(m, n, k, 132, rng);
    DeviceBuffer<uint8_t>& d = op.d;
    kernels::SkinnyGemmParams p =
        bulk_params(op.a.get(), op.w.get(), d.get(),
                    gated ? kernels::DType::kBF16 : kernels::DType::kF32, m, n, k, 132, op.ws);
    p.gated = gated;
    p.compact = compact;
    p.stream_k = stream_k;
    std::vector<uint8_t> first, cur;
    int differing = 0;
    for (int r = 0; r < 60; ++r) {
      CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
      CUDA_REQUIRE(d.download(r == 0 ? first : cur));
      if (r > 0 && cur != first) ++differing;
    }
    INFO("gated " << gated << " compact " << compact << " stream_k " << stream_k);
    CHECK(differing == 0);
  }
}

TEST_CASE("skinny gemm: the SwiGLU epilogue equals the GEMM followed by launch_silu_mul",
          "[skinny_gemm][bulk]") {
  if (!bulk_capable()) return;
  std::mt19937 rng(gputest::test_seed("skinny_gemm gated"));
  for (const int64_t m : {1, 3, 8})
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{16, 1024}, {4096, 4096}, {1040, 2048}})
      for (const int32_t sms : {132, 5})
        for (const bool with_bias : {false, true}) {
          const bool compact = with_bias == (sms == 5);  // half the cases, both footprints each
          INFO("m=" << m << " n=" << n << " k=" << k << " sms=" << sms << " bias=" << with_bias
                    << " compact=" << compact);
          const std::vector<uint16_t> ha = random_bf16(static_cast<size_t>(m * k), rng);
          const std::vector<uint16_t> hw = random_bf16(static_cast<size_t>(n * k), rng);
          std::vector<float> hb(static_cast<size_t>(n));
          std::normal_distribution<float> dist(0.0f, 2.0f);
          for (float& b : hb)
            b = dist(rng);
          DeviceBuffer<uint16_t> a, w, gu(static_cast<size_t>(m * n));
          DeviceBuffer<uint16_t> act(static_cast<size_t>(m * n / 2)),
              ref(static_cast<size_t>(m * n / 2));
          DeviceBuffer<float> bias;
          CUDA_REQUIRE(a.upload(ha));
          CUDA_REQUIRE(w.upload(hw));
          CUDA_REQUIRE(bias.upload(hb));
          CUDA_REQUIRE(act.poison());
          DeviceBuffer<uint8_t> ws(
              static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(n, sms)));
          CUDA_REQUIRE(cudaMemset(ws.get(), 0, ws.bytes()));
          kernels::SkinnyGemmParams p =
              bulk_params(a.get(), w.get(), gu.get(), kernels::DType::kBF16, m, n, k, sms, ws);
          p.compact = compact;
          REQUIRE(kernels::skinny_gemm_uses_bulk(p));
          CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
          const float* bp = with_bias ? bias.get() : nullptr;
          CUDA_REQUIRE_LAUNCH(kernels::launch_silu_mul(
              gu.get(), bp, static_cast<int32_t>(m), static_cast<int32_t>(n / 2), ref.get(),
              nullptr, kernels::GateUpLayout::kInterleaved8));
          p.d = act.get();
          p.gated = true;
          p.gate_bias = bp;
          CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
          std::vector<uint16_t> got, want;
          CUDA_REQUIRE(act.download(got));
          CUDA_REQUIRE(ref.download(want));
          size_t mismatches = 0;
          std::string first;
          if (got != want) {
            std::vector<uint16_t> hgu;
            CUDA_REQUIRE(gu.download(hgu));
            for (size_t i = 0; i < got.size(); ++i) {
              if (got[i] == want[i]) continue;
              if (mismatches++ < 6) {
                const size_t r = i / (n / 2), j = i % (n / 2);
                const size_t gi = r * n + 16 * (j / 8) + j % 8;
                first += " [row " + std::to_string(r) + " col " + std::to_string(j) + ": got " +
                         std::to_string(got[i]) + " want " + std::to_string(want[i]) + " gate " +
                         std::to_string(hgu[gi]) + " up " + std::to_string(hgu[gi + 8]) + "]";
              }
            }
          }
          INFO(mismatches << " mismatches:" << first);
          REQUIRE(mismatches == 0);
          // Not the bulk kernel, an fp32 output or a partial 16-row group: rejected.
          kernels::SkinnyGemmParams q = p;
          q.m = 9;
          CHECK(kernels::launch_skinny_gemm(q, nullptr) == cudaErrorInvalidValue);
          q = p;
          q.out = kernels::DType::kF32;
          CHECK(kernels::launch_skinny_gemm(q, nullptr) == cudaErrorInvalidValue);
          q = p;
          q.n = n - 8;
          CHECK(kernels::launch_skinny_gemm(q, nullptr) == cudaErrorInvalidValue);
          q = p;
          q.bulk = false;
          CHECK(kernels::launch_skinny_gemm(q, nullptr) == cudaErrorInvalidValue);
        }
}

TEST_CASE("skinny gemm: the fused add + RMSNorm tail equals the GEMM then launch_add_rmsnorm",
          "[skinny_gemm][bulk]") {
  if (!bulk_capable()) return;
  std::mt19937 rng(gputest::test_seed("skinny_gemm fused norm"));
  cudaStream_t stream = nullptr;
  CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<float> scratch(1 << 16);
  // n (= the norm's dim): 4096 and 2000 take the norm's CTA-per-row variant with float4 loads,
  // 1030 with scalar loads (n % 4 != 0), 1024 a warp per row; 2000 and 1030 end in a partial
  // 16-row tile. Machine sizes 132 and 5 split tiles between CTAs differently.
  for (const int64_t m : {1, 3, 8})
    for (const auto& [n, k] :
         {std::pair<int64_t, int64_t>{4096, 4096}, {1024, 2048}, {2000, 1024}, {1030, 3072}})
      for (const int32_t sms : {132, 5})
        for (const bool with_bias : {false, true}) {
          const bool compact = with_bias == (sms == 5);  // half the cases, both footprints each
          INFO("m=" << m << " n=" << n << " k=" << k << " sms=" << sms << " bias=" << with_bias
                    << " compact=" << compact);
          const size_t mn = static_cast<size_t>(m * n);
          const std::vector<uint16_t> ha = random_bf16(static_cast<size_t>(m * k), rng);
          const std::vector<uint16_t> hw = random_bf16(static_cast<size_t>(n * k), rng);
          std::normal_distribution<float> dist(0.0f, 3.0f);
          std::vector<float> hx(mn), hb(static_cast<size_t>(n)), hg(static_cast<size_t>(n));
          for (float& v : hx)
            v = dist(rng);
          for (float& v : hb)
            v = dist(rng);
          for (float& v : hg)
            v = 1.0f + 0.1f * dist(rng);
          DeviceBuffer<uint16_t> a, w, h(mn), h_ref(mn);
          DeviceBuffer<float> x(mn), x_ref, bias, gamma, d(mn), d_ref(mn);
          CUDA_REQUIRE(a.upload(ha));
          CUDA_REQUIRE(w.upload(hw));
          CUDA_REQUIRE(bias.upload(hb));
          CUDA_REQUIRE(gamma.upload(hg));
          CUDA_REQUIRE(x_ref.upload(hx));
          CUDA_REQUIRE(h_ref.poison());
          DeviceBuffer<uint8_t> ws(
              static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(n, sms)));
          CUDA_REQUIRE(cudaMemset(ws.get(), 0, ws.bytes()));
          kernels::SkinnyGemmParams p =
              bulk_params(a.get(), w.get(), d_ref.get(), kernels::DType::kF32, m, n, k, sms, ws);
          p.compact = compact;
          REQUIRE(kernels::skinny_gemm_uses_bulk(p));
          const float* bp = with_bias ? bias.get() : nullptr;
          // Reference: the plain bulk GEMM (same footprint), then the norm kernel.
          CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
          const kernels::AddRmsNormParams ref_norm{x_ref.get(),
                                                   d_ref.get(),
                                                   bp,
                                                   gamma.get(),
                                                   1e-5f,
                                                   static_cast<int32_t>(m),
                                                   static_cast<int32_t>(n),
                                                   nullptr,
                                                   h_ref.get()};
          CUDA_REQUIRE_LAUNCH(kernels::launch_add_rmsnorm(ref_norm, nullptr));
          std::vector<float> want_d, want_x;
          std::vector<uint16_t> want_h;
          CUDA_REQUIRE(d_ref.download(want_d));
          CUDA_REQUIRE(x_ref.download(want_x));
          CUDA_REQUIRE(h_ref.download(want_h));
          // Fused, three times from the same x: on a stream, after another kernel (programmatic
          // dependent launch), so the tail's counter must be back at zero after each launch.
          p.d = d.get();
          p.fuse_add_norm = true;
          p.add_norm = ref_norm;
          p.add_norm.x = x.get();
          p.add_norm.delta = d.get();
          p.add_norm.out = h.get();
          for (int rep = 0; rep < 3; ++rep) {
            INFO("launch " << rep);
            CUDA_REQUIRE(x.upload(hx));
            CUDA_REQUIRE(d.poison());
            CUDA_REQUIRE(h.poison());
            CUDA_REQUIRE(cudaDeviceSynchronize());
            CUDA_REQUIRE(kernels::launch_fill_f32(scratch.get(), 1 << 16, 1.0f, stream));
            CUDA_REQUIRE(kernels::launch_skinny_gemm(p, stream));
            CUDA_REQUIRE(cudaStreamSynchronize(stream));
            CUDA_REQUIRE(cudaGetLastError());
            std::vector<float> got_d, got_x;
            std::vector<uint16_t> got_h;
            CUDA_REQUIRE(d.download(got_d));
            CUDA_REQUIRE(x.download(got_x));
            CUDA_REQUIRE(h.download(got_h));
            REQUIRE(std::memcmp(got_d.data(), want_d.data(), mn * 4) == 0);
            REQUIRE(std::memcmp(got_x.data(), want_x.data(), mn * 4) == 0);
            REQUIRE(got_h == want_h);
            std::vector<uint8_t> hws;
            CUDA_REQUIRE(ws.download(hws));
            const auto counters = static_cast<size_t>(kernels::skinny_gemm_counter_bytes(n));
            REQUIRE(
                std::all_of(hws.begin(), hws.begin() + counters, [](uint8_t b) { return b == 0; }));
          }
          // Rejected without a launch: delta is not d, rows or dim do not match the product, a
          // row index, a gated or bf16 product, m past the bulk kernel.
          const auto rejected = [&](const kernels::SkinnyGemmParams& q) {
            return kernels::launch_skinny_gemm(q, stream) == cudaErrorInvalidValue;
          };
          kernels::SkinnyGemmParams q = p;
          q.add_norm.delta = d_ref.get();
          CHECK(rejected(q));
          q = p;
          q.add_norm.rows = static_cast<int32_t>(m) + 1;
          CHECK(rejected(q));
          q = p;
          q.add_norm.dim = static_cast<int32_t>(n) - 4;
          CHECK(rejected(q));
          q = p;
          q.add_norm.row_index = reinterpret_cast<const int32_t*>(scratch.get());
          CHECK(rejected(q));
          q = p;
          q.out = kernels::DType::kBF16;
          CHECK(rejected(q));
          q = p;
          q.gated = true;
          CHECK(rejected(q));
          q = p;
          q.m = 9;
          q.add_norm.rows = 9;
          CHECK(rejected(q));
        }
  CUDA_REQUIRE(cudaStreamDestroy(stream));
}

TEST_CASE("skinny gemm: unsupported parameters are rejected without a launch", "[skinny_gemm]") {
  DeviceBuffer<uint16_t> a(16 * 64 + 8), w(64 * 64 + 8);
  DeviceBuffer<float> d(16 * 64);
  CUDA_REQUIRE(d.poison());
  kernels::SkinnyGemmParams p;
  p.a = a.get();
  p.w = w.get();
  p.d = d.get();
  p.m = 4;
  p.n = 64;
  p.k = 64;
  const auto rejected = [&](const kernels::SkinnyGemmParams& q) {
    return kernels::launch_skinny_gemm(q, nullptr) == cudaErrorInvalidValue;
  };
  kernels::SkinnyGemmParams q = p;
  q.k = 60;  // k % 8 != 0
  CHECK(rejected(q));
  q = p;
  q.k = 0;
  CHECK(rejected(q));
  q = p;
  q.m = 17;
  CHECK(rejected(q));
  q = p;
  q.n = 0;
  CHECK(rejected(q));
  q = p;
  q.a = a.get() + 4;  // 8-byte aligned only
  CHECK(rejected(q));
  q = p;
  q.w = w.get() + 1;
  CHECK(rejected(q));
  q = p;
  q.d = reinterpret_cast<uint8_t*>(d.get()) + 2;  // fp32 output not 4-byte aligned
  CHECK(rejected(q));
  q = p;
  q.w = nullptr;
  CHECK(rejected(q));
  q = p;
  q.k_split = 3;
  CHECK(rejected(q));
  q = p;
  q.warp_rows = 48;
  CHECK(rejected(q));
  // The split norm needs the bulk kernel (this product does not take it) and its operands.
  DeviceBuffer<float> x(64 * 4096), g(4096);
  q = p;
  q.add_residual = true;
  q.add_norm.x = x.get();
  CHECK(rejected(q));
  q = p;
  q.norm_input = true;
  q.add_norm.x = x.get();
  q.add_norm.weight = g.get();
  CHECK(rejected(q));
  CUDA_REQUIRE(cudaGetLastError());

  // m == 0 is a no-op: the output keeps its poison.
  q = p;
  q.m = 0;
  CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(q, nullptr));
  std::vector<float> hd;
  CUDA_REQUIRE(d.download(hd));
  REQUIRE(std::all_of(hd.begin(), hd.end(), [](float f) { return std::isnan(f); }));
}

namespace {

// The products of one Llama-3-8B decoder layer at m rows, on device-filled random operands:
// the o projection with its residual add + norm, the gate/up projection with its SwiGLU, the
// down projection with its residual add + norm, the next layer's qkv projection. Every product
// reads what the one before it stored (as the CUDA backend runs them).
struct DecoderGemms {
  static constexpr int64_t H = 4096, I = 14336, QKV = 6144;
  int64_t m;
  DeviceBuffer<uint16_t> wo{size_t{H * H}}, wgu{size_t{2 * I * H}}, wd{size_t{H * I}},
      wqkv{size_t{QKV * H}};
  DeviceBuffer<uint16_t> attn, h, act;
  DeviceBuffer<float> x, delta, qkv, bias, gamma1, gamma2;
  std::vector<float> x0;

  explicit DecoderGemms(int64_t rows, std::mt19937& rng)
      : m(rows),
        attn(static_cast<size_t>(rows * H)),
        h(static_cast<size_t>(rows * H)),
        act(static_cast<size_t>(rows * I)),
        delta(static_cast<size_t>(rows * H)),
        qkv(static_cast<size_t>(rows * QKV)) {
    // Weights of a trained layer's scale (|w| < 0.02) keep the norms' inputs in range.
    CUDA_REQUIRE(kernels::launch_fill_uniform_bf16(wo.get(), H * H, rng(), 0.02f, nullptr));
    CUDA_REQUIRE(kernels::launch_fill_uniform_bf16(wgu.get(), 2 * I * H, rng(), 0.02f, nullptr));
    CUDA_REQUIRE(kernels::launch_fill_uniform_bf16(wd.get(), H * I, rng(), 0.02f, nullptr));
    CUDA_REQUIRE(kernels::launch_fill_uniform_bf16(wqkv.get(), QKV * H, rng(), 0.02f, nullptr));
    CUDA_REQUIRE(attn.upload(random_bf16(static_cast<size_t>(rows * H), rng)));
    std::normal_distribution<float> dist(0.0f, 1.0f);
    x0.resize(static_cast<size_t>(rows * H));
    for (float& v : x0)
      v = dist(rng);
    std::vector<float> hb(H), hg1(H), hg2(H);
    for (size_t i = 0; i < hb.size(); ++i) {
      hb[i] = 0.1f * dist(rng);
      hg1[i] = 1.0f + 0.1f * dist(rng);
      hg2[i] = 1.0f + 0.1f * dist(rng);
    }
    CUDA_REQUIRE(bias.upload(hb));
    CUDA_REQUIRE(gamma1.upload(hg1));
    CUDA_REQUIRE(gamma2.upload(hg2));
    reset();
  }

  // The starting state: x = x0; h, act, delta, qkv poisoned.
  void reset() {
    CUDA_REQUIRE(x.upload(x0));
    CUDA_REQUIRE(h.poison());
    CUDA_REQUIRE(act.poison());
    CUDA_REQUIRE(delta.poison());
    CUDA_REQUIRE(qkv.poison());
    CUDA_REQUIRE(cudaDeviceSynchronize());
  }

  std::vector<kernels::SkinnyGemmParams> products(int32_t sms, bool compact,
                                                  DeviceBuffer<uint8_t>& ws,
                                                  bool stream_k = false) {
    const auto norm = [&](const float* b, const float* g) {
      return kernels::AddRmsNormParams{
          x.get(), delta.get(), b, g, 1e-5f, static_cast<int32_t>(m), static_cast<int32_t>(H),
          nullptr, h.get()};
    };
    std::vector<kernels::SkinnyGemmParams> ps;
    auto o = bulk_params(attn.get(), wo.get(), delta.get(), kernels::DType::kF32, m, H, H, sms, ws);
    o.fuse_add_norm = true;
    o.add_norm = norm(bias.get(), gamma1.get());
    ps.push_back(o);
    auto gu =
        bulk_params(h.get(), wgu.get(), act.get(), kernels::DType::kBF16, m, 2 * I, H, sms, ws);
    gu.gated = true;
    ps.push_back(gu);
    auto down =
        bulk_params(act.get(), wd.get(), delta.get(), kernels::DType::kF32, m, H, I, sms, ws);
    down.fuse_add_norm = true;
    down.add_norm = norm(nullptr, gamma2.get());
    ps.push_back(down);
    ps.push_back(
        bulk_params(h.get(), wqkv.get(), qkv.get(), kernels::DType::kF32, m, QKV, H, sms, ws));
    for (kernels::SkinnyGemmParams& p : ps) {
      p.compact = compact;
      p.stream_k = stream_k;
    }
    return ps;
  }

  // Every buffer the products write, as bytes.
  std::vector<uint8_t> state() const {
    std::vector<uint8_t> out;
    const auto add = [&](const auto& buf) {
      std::vector<std::remove_cvref_t<decltype(*buf.get())>> v;
      CUDA_REQUIRE(buf.download(v));
      const auto* p = reinterpret_cast<const uint8_t*>(v.data());
      out.insert(out.end(), p, p + v.size() * sizeof(v[0]));
    };
    add(x);
    add(h);
    add(act);
    add(delta);
    add(qkv);
    return out;
  }
};

}  // namespace

TEST_CASE("skinny gemm: bulk products of different widths share one workspace",
          "[skinny_gemm][bulk]") {
  // The CUDA backend runs a layer's products over one workspace sized for its widest output.
  // Regression: each launch put its split tiles' partials right after its own tile counters, so
  // the o projection's partials overwrote gate/up counters, and those split gate/up tiles were
  // never stored. (Split by units, the products split tiles; by whole tiles, the default at these
  // shapes, they do not: both are run.)
  if (!bulk_capable()) return;
  std::mt19937 rng(gputest::test_seed("skinny_gemm shared workspace"));
  for (const int64_t m : {1, 4})
    for (const bool compact : {false, true})
      for (const bool stream_k : {true, false}) {
        INFO("m=" << m << " compact=" << compact << " stream_k=" << stream_k);
        DecoderGemms L(m, rng);
        // Reference: each product on a workspace of its own, in order.
        std::vector<std::vector<uint8_t>> want;
        {
          DeviceBuffer<uint8_t> unused(16);
          for (kernels::SkinnyGemmParams p : L.products(132, compact, unused, stream_k)) {
            DeviceBuffer<uint8_t> own(
                static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(p.n, 132)));
            CUDA_REQUIRE(own.poison());
            CUDA_REQUIRE(cudaMemset(own.get(), 0,
                                    static_cast<size_t>(kernels::skinny_gemm_counter_bytes(p.n))));
            p.workspace = own.get();
            p.workspace_bytes = static_cast<int64_t>(own.size());
            CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, nullptr));
            want.push_back(L.state());
          }
        }
        // One workspace for every width up to 2^22 (as GemmRunner's), twice around the layer.
        const int64_t max_n = int64_t{1} << 22;
        DeviceBuffer<uint8_t> ws(
            static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(max_n, 132)));
        CUDA_REQUIRE(ws.poison());
        const auto counters = static_cast<size_t>(kernels::skinny_gemm_counter_bytes(max_n));
        CUDA_REQUIRE(cudaMemset(ws.get(), 0, counters));
        for (int round = 0; round < 2; ++round) {
          L.reset();
          const std::vector<kernels::SkinnyGemmParams> ps = L.products(132, compact, ws, stream_k);
          for (size_t i = 0; i < ps.size(); ++i) {
            INFO("round " << round << ", product " << i);
            CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(ps[i], nullptr));
            REQUIRE(L.state() == want[i]);
          }
          REQUIRE(zero_bytes(ws, counters));
        }
      }
}

TEST_CASE("skinny gemm: the split residual add + norm equals the fused tail, byte for byte",
          "[skinny_gemm][bulk]") {
  // SkinnyGemmParams::add_residual / norm_input: the o and down projections add to x column by
  // column, gate/up and the next qkv normalize x in their prologues (CTA 0 stores the row to h).
  // Against the fused tails (themselves bit-identical to launch_add_rmsnorm): x, h, act, delta
  // and qkv after gate/up and after qkv, over one shared workspace on a PDL stream, twice.
  if (!bulk_capable()) return;
  std::mt19937 rng(gputest::test_seed("skinny_gemm split norm"));
  cudaStream_t stream = nullptr;
  CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const bool compact : {false, true})
    for (const int32_t sms : {132, 57})
      for (const bool stream_k : {false, true}) {
        INFO("compact=" << compact << " sms=" << sms << " stream_k=" << stream_k);
        DecoderGemms L(1, rng);
        const int64_t max_n = int64_t{1} << 22;
        DeviceBuffer<uint8_t> ws(
            static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(max_n, sms)));
        CUDA_REQUIRE(cudaMemset(ws.get(), 0,
                                static_cast<size_t>(kernels::skinny_gemm_counter_bytes(max_n))));
        std::vector<std::vector<uint8_t>> want, got;
        for (kernels::SkinnyGemmParams p : L.products(sms, compact, ws, stream_k)) {
          CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, stream));
          CUDA_REQUIRE(cudaStreamSynchronize(stream));
          want.push_back(L.state());
        }
        for (int round = 0; round < 2; ++round) {
          L.reset();
          std::vector<kernels::SkinnyGemmParams> ps = L.products(sms, compact, ws, stream_k);
          // o and down: add only; gate/up and qkv: the norm of the product before (its weight).
          for (const size_t i : {size_t{0}, size_t{2}}) {
            kernels::SkinnyGemmParams& add = ps[i];
            kernels::SkinnyGemmParams& nin = ps[i + 1];
            nin.norm_input = true;
            nin.add_norm = add.add_norm;
            nin.add_norm.delta = nullptr;
            nin.add_norm.bias = nullptr;
            nin.add_norm.dim = static_cast<int32_t>(nin.k);
            nin.a = L.act.get();  // not read: a wrong row would show in act / qkv
            add.fuse_add_norm = false;
            add.add_residual = true;
          }
          got.clear();
          for (const kernels::SkinnyGemmParams& p : ps) {
            CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(p, stream));
            CUDA_REQUIRE(cudaStreamSynchronize(stream));
            got.push_back(L.state());
          }
          INFO("round " << round);
          CHECK(got[1] == want[1]);
          CHECK(got[3] == want[3]);
          if (round == 1) {  // bulk products with split parameters the kernel cannot honour
            const auto rejected = [](kernels::SkinnyGemmParams q) {
              return kernels::launch_skinny_gemm(q, nullptr) == cudaErrorInvalidValue;
            };
            kernels::SkinnyGemmParams q = ps[1];
            q.m = 2;  // the prologue normalizes one row
            CHECK(rejected(q));
            q = ps[1];
            q.add_norm.x = nullptr;
            CHECK(rejected(q));
            q = ps[1];
            q.add_norm.weight = q.add_norm.weight + 1;  // 4-byte aligned only
            CHECK(rejected(q));
            q = ps[1];
            q.fuse_add_norm = true;
            CHECK(rejected(q));
            q = ps[0];
            q.gated = true;  // the residual add takes plain fp32 products
            q.out = kernels::DType::kBF16;
            CHECK(rejected(q));
            q = ps[0];
            q.norm_input = true;  // not both in one launch
            CHECK(rejected(q));
            CUDA_REQUIRE(cudaGetLastError());
          }
        }
      }
  CUDA_REQUIRE(cudaStreamDestroy(stream));
}
