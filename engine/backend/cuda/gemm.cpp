#include "engine/backend/cuda/gemm.h"

#include <cublasLt.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/gemm/skinny_gemm.h"

namespace pmkv::cuda {

namespace {

void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw CudaError(std::string(what) + ": cuBLASLt status " + std::to_string(static_cast<int>(s)));
  }
}
#define PMKV_LT_CHECK(expr) check_lt((expr), #expr)

int32_t env_int(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? static_cast<int32_t>(std::strtol(v, nullptr, 10)) : 0;
}

}  // namespace

// Row-major d[m, n] = a[m, k] w[n, k]^T is, in cuBLAS's column-major terms, the n x m matrix
// D = op(W) * A with W read as a k x n column-major matrix (transposed) and A as k x m.
struct GemmRunner::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t w = nullptr, a = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (d != nullptr) cublasLtMatrixLayoutDestroy(d);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (w != nullptr) cublasLtMatrixLayoutDestroy(w);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

GemmRunner::GemmRunner(cudaStream_t stream, size_t workspace_bytes)
    : stream_(stream), workspace_(workspace_bytes) {
  cublasLtHandle_t h = nullptr;
  PMKV_LT_CHECK(cublasLtCreate(&h));
  handle_ = h;
  const char* mode = std::getenv("PMKV_GEMM");
  skinny_enabled_ = mode == nullptr || std::strcmp(mode, "cublaslt") != 0;
  int dev = 0;
  PMKV_CUDA_CHECK(cudaGetDevice(&dev));
  int sms = 0;
  PMKV_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  num_sms_ = sms;
  skinny_warp_rows_ = env_int("PMKV_SKINNY_WARP_ROWS");
  skinny_k_split_ = env_int("PMKV_SKINNY_K_SPLIT");
  // PMKV_PDL=0: skinny GEMMs wait for the previous kernel like any launch (A/B measurements).
  const char* pdl = std::getenv("PMKV_PDL");
  skinny_pdl_ = pdl == nullptr || std::strcmp(pdl, "0") != 0;
  // PMKV_SKINNY_WIDE=1: the skinny GEMM also takes m > 8 with a wide output (A/B measurements).
  const char* wide = std::getenv("PMKV_SKINNY_WIDE");
  skinny_wide_ = wide != nullptr && std::strcmp(wide, "0") != 0;
  // PMKV_FUSED_NORM=0: run_add_norm launches the GEMM and the norm separately (A/B measurements).
  const char* fused = std::getenv("PMKV_FUSED_NORM");
  fuse_norm_ = fused == nullptr || std::strcmp(fused, "0") != 0;
  // PMKV_SPLIT_NORM=0: split_norm() says no; the fused tail stays (A/B measurements).
  const char* split = std::getenv("PMKV_SPLIT_NORM");
  split_norm_ = split == nullptr || std::strcmp(split, "0") != 0;
  // PMKV_COMPACT_GEMM=0|1: see layer_footprint (A/B).
  if (const char* compact = std::getenv("PMKV_COMPACT_GEMM"); compact != nullptr) {
    compact_override_ = std::strcmp(compact, "0") != 0 ? 1 : 0;
  }
  // PMKV_BULK_STREAM_K=1: the bulk kernel splits by units (stream-K) instead of whole tiles (A/B).
  const char* stream_k = std::getenv("PMKV_BULK_STREAM_K");
  bulk_stream_k_ = stream_k != nullptr && std::strcmp(stream_k, "0") != 0;
  const char* claim = std::getenv("PMKV_BULK_CLAIM");
  bulk_claim_ = claim == nullptr || std::strcmp(claim, "0") != 0;
  // The skinny GEMM's bulk kernel (sm_90+ with ~208 KB of shared memory per block): its workspace
  // covers outputs of up to kBulkMaxN columns (larger ones take the register kernel).
  // PMKV_SKINNY_BULK=0 turns it off (A/B).
  int major = 0, smem_optin = 0;
  PMKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  PMKV_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const char* bulk = std::getenv("PMKV_SKINNY_BULK");
  if (major >= 9 && smem_optin >= kernels::skinny_gemm_bulk_smem_bytes() &&
      (bulk == nullptr || std::strcmp(bulk, "0") != 0)) {
    skinny_ws_.allocate(static_cast<size_t>(kernels::skinny_gemm_workspace_bytes(kBulkMaxN, sms)));
    PMKV_CUDA_CHECK(cudaMemsetAsync(
        skinny_ws_.as(), 0, static_cast<size_t>(kernels::skinny_gemm_counter_bytes(kBulkMaxN)),
        stream_));
  }
}

GemmRunner::~GemmRunner() {
  plans_.clear();
  if (handle_ != nullptr) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

GemmRunner::Plan& GemmRunner::plan(int64_t m, int64_t n, int64_t k, GemmOut out) {
  const auto key = std::make_tuple(m, n, k, static_cast<int>(out));
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  auto p = std::make_unique<Plan>();
  PMKV_LT_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_w = CUBLAS_OP_T, trans_a = CUBLAS_OP_N;
  PMKV_LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_w,
                                               sizeof(trans_w)));
  PMKV_LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_a,
                                               sizeof(trans_a)));
  const cudaDataType_t d_type = out == GemmOut::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  PMKV_LT_CHECK(cublasLtMatrixLayoutCreate(&p->w, CUDA_R_16BF, k, n, k));
  PMKV_LT_CHECK(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, k, m, k));
  PMKV_LT_CHECK(cublasLtMatrixLayoutCreate(&p->d, d_type, n, m, n));

  cublasLtMatmulPreference_t pref = nullptr;
  PMKV_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = workspace_.bytes();
  PMKV_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                     &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t s =
      cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p->op, p->w, p->a,
                                     p->d, p->d, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  check_lt(s, "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0) {
    throw CudaError("cuBLASLt has no algorithm for a bf16 GEMM of m=" + std::to_string(m) +
                    " n=" + std::to_string(n) + " k=" + std::to_string(k));
  }
  p->algo = result.algo;
  return *plans_.emplace(key, std::move(p)).first->second;
}

kernels::SkinnyGemmParams GemmRunner::skinny_params(const void* a, const void* w, void* d,
                                                    GemmOut out, int64_t m, int64_t n, int64_t k,
                                                    GemmFootprint fp) const {
  kernels::SkinnyGemmParams sp;
  sp.a = static_cast<const uint16_t*>(a);
  sp.w = static_cast<const uint16_t*>(w);
  sp.d = d;
  sp.out = out == GemmOut::kF32 ? kernels::DType::kF32 : kernels::DType::kBF16;
  sp.m = m;
  sp.n = n;
  sp.k = k;
  sp.num_sms = num_sms_;
  sp.warp_rows = skinny_warp_rows_;
  sp.k_split = skinny_k_split_;
  sp.pdl = skinny_pdl_;
  sp.bulk = skinny_ws_.bytes() > 0 && n <= kBulkMaxN;
  sp.workspace = skinny_ws_.as();
  sp.workspace_bytes = static_cast<int64_t>(skinny_ws_.bytes());
  sp.compact = fp == GemmFootprint::kCompact;
  sp.stream_k = bulk_stream_k_;
  sp.claim = bulk_claim_ && n >= kBulkClaimMinN;
  return sp;
}

bool GemmRunner::run_gated(const void* a, const void* w, void* act, const float* bias, int64_t m,
                           int64_t n, int64_t k, GemmFootprint fp,
                           const kernels::AddRmsNormParams* norm_in) {
  if (m == 0) return true;
  if (!skinny_enabled_ || n % 16 != 0) return false;
  kernels::SkinnyGemmParams sp = skinny_params(a, w, act, GemmOut::kBF16, m, n, k, fp);
  if (!kernels::skinny_gemm_uses_bulk(sp)) return false;
  sp.gated = true;
  sp.gate_bias = bias;
  if (norm_in != nullptr) {
    sp.norm_input = true;
    sp.add_norm = *norm_in;
  }
  PMKV_CUDA_CHECK(kernels::launch_skinny_gemm(sp, stream_));
  return true;
}

void GemmRunner::run_add_norm(const void* a, const void* w, float* d, int64_t m, int64_t n,
                              int64_t k, const kernels::AddRmsNormParams& norm, GemmFootprint fp) {
  if (m == 0) return;
  kernels::AddRmsNormParams q = norm;
  q.delta = d;
  q.rows = static_cast<int32_t>(m);
  q.dim = static_cast<int32_t>(n);
  // m == 1 only: the tail runs the rows one after another on one SM; at m = 4 and 8 that was
  // slower than the norm kernel's CTA a row (bench/RESULTS.md).
  if (fuse_norm_ && m == 1 && uses_bulk(a, w, d, GemmOut::kF32, m, n, k)) {
    kernels::SkinnyGemmParams sp = skinny_params(a, w, d, GemmOut::kF32, m, n, k, fp);
    sp.fuse_add_norm = true;
    sp.add_norm = q;
    PMKV_CUDA_CHECK(kernels::launch_skinny_gemm(sp, stream_));
    return;
  }
  run(a, w, d, GemmOut::kF32, m, n, k, fp);
  PMKV_CUDA_CHECK(kernels::launch_add_rmsnorm(q, stream_));
}

bool GemmRunner::split_norm(int64_t m, int64_t k, GemmFootprint fp) const {
  return split_norm_ && fuse_norm_ && m == 1 && skinny_enabled_ && skinny_ws_.bytes() > 0 &&
         k > 1024 && kernels::skinny_gemm_norm_input_fits(k, fp == GemmFootprint::kCompact);
}

void GemmRunner::run_add(const void* a, const void* w, float* d, int64_t m, int64_t n, int64_t k,
                         float* x, const float* bias, GemmFootprint fp) {
  if (m == 0) return;
  kernels::SkinnyGemmParams sp = skinny_params(a, w, d, GemmOut::kF32, m, n, k, fp);
  sp.add_residual = true;
  sp.add_norm.x = x;
  sp.add_norm.bias = bias;
  PMKV_CUDA_CHECK(kernels::launch_skinny_gemm(sp, stream_));
}

void GemmRunner::run(const void* a, const void* w, void* d, GemmOut out, int64_t m, int64_t n,
                     int64_t k, GemmFootprint fp, const kernels::AddRmsNormParams* norm_in) {
  if (m == 0) return;
  if (norm_in != nullptr) {
    kernels::SkinnyGemmParams sp = skinny_params(a, w, d, out, m, n, k, fp);
    sp.norm_input = true;
    sp.add_norm = *norm_in;
    PMKV_CUDA_CHECK(kernels::launch_skinny_gemm(sp, stream_));
    return;
  }
  if (uses_skinny(a, w, d, out, m, n, k)) {
    PMKV_CUDA_CHECK(kernels::launch_skinny_gemm(skinny_params(a, w, d, out, m, n, k, fp), stream_));
    return;
  }
  Plan& p = plan(m, n, k, out);
  const float alpha = 1.0f, beta = 0.0f;
  PMKV_LT_CHECK(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p.op, &alpha, w, p.w, a, p.a,
                               &beta, d, p.d, d, p.d, &p.algo, workspace_.as(), workspace_.bytes(),
                               stream_));
}

bool GemmRunner::uses_bulk(const void* a, const void* w, const void* d, GemmOut out, int64_t m,
                           int64_t n, int64_t k) const {
  return uses_skinny(a, w, d, out, m, n, k) &&
         kernels::skinny_gemm_uses_bulk(skinny_params(a, w, const_cast<void*>(d), out, m, n, k));
}

bool GemmRunner::uses_skinny(const void* a, const void* w, const void* d, GemmOut out, int64_t m,
                             int64_t n, int64_t k) const {
  // Two 8-column tiles of a (m > 8) and a wide output: cuBLASLt streams the weights faster than
  // the register kernel there (see kSkinnyWideMinN).
  if (m > 8 && n >= kSkinnyWideMinN && !skinny_wide_) return false;
  return skinny_enabled_ &&
         kernels::skinny_gemm_supported(
             a, w, d, out == GemmOut::kF32 ? kernels::DType::kF32 : kernels::DType::kBF16, m, n, k);
}

}  // namespace pmkv::cuda
