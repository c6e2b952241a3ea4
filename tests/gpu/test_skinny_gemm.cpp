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
#include <vector>

#include "kernels/gemm/skinny_gemm.h"
#include "kernels/model/fill.h"
#include "tests/gpu/gpu_test_util.h"

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
};

std::string describe(const Case& c) {
  return "m=" + std::to_string(c.m) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
         (c.out == kernels::DType::kF32 ? " f32" : " bf16") +
         " warp_rows=" + std::to_string(c.warp_rows) + " k_split=" + std::to_string(c.k_split) +
         " num_sms=" + std::to_string(c.num_sms);
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
  CUDA_REQUIRE(cudaGetLastError());

  // m == 0 is a no-op: the output keeps its poison.
  q = p;
  q.m = 0;
  CUDA_REQUIRE_LAUNCH(kernels::launch_skinny_gemm(q, nullptr));
  std::vector<float> hd;
  CUDA_REQUIRE(d.download(hd));
  REQUIRE(std::all_of(hd.begin(), hd.end(), [](float f) { return std::isnan(f); }));
}
