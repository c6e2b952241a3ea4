#pragma once
// Programmatic dependent launch (Hopper, sm_90+). A kernel launched with the
// cudaLaunchAttributeProgrammaticStreamSerialization attribute may start while the kernel before
// it in the stream still runs; it must call pdl_wait() before it reads or writes anything the
// earlier kernels touch (pdl_wait() returns once they have completed and their writes are
// visible). Work that depends on none of that (prefetching weights) can come before the wait.
// pdl_trigger() lets such a dependent kernel start before this one ends (once every CTA of this
// kernel has called it or exited). Both are no-ops on older GPUs and in kernels launched normally.
#include <cuda_runtime.h>

namespace pmkv::kernels {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

// Host side: when `on`, asks for programmatic dependent launch in `cfg` (its stream already set),
// never on the legacy default stream, whose implicit synchronization it would bypass. `attr` holds
// the attribute and must live until the launch.
inline void request_pdl(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, bool on) {
  if (!on || cfg.stream == nullptr) return;
  attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
}

}  // namespace pmkv::kernels
