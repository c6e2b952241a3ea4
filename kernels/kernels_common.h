#pragma once
// Small things every kernel family's launcher header shares. Host-only declarations; no CUDA
// headers needed to include it.
#include <cstdint>

namespace pmkv::kernels {

// Element type of an activation tensor (q, out, new K/V rows).
enum class DType : int32_t { kF32 = 0, kBF16 = 1 };

inline constexpr int dtype_bytes(DType t) {
  return t == DType::kF32 ? 4 : 2;
}

}  // namespace pmkv::kernels
