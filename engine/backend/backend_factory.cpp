#include "engine/backend/backend_factory.h"

#include <string>

#include "engine/backend/cpu/cpu_backend.h"
#include "engine/common/error.h"
#if defined(PMKV_HAVE_CUDA)
#include "engine/backend/cuda/cuda_backend.h"
#endif

namespace pmkv {

Device parse_device(std::string_view text, std::string_view key) {
  if (text == "auto") return Device::kAuto;
  if (text == "cpu") return Device::kCpu;
  if (text == "cuda") return Device::kCuda;
  throw InvalidArgument(std::string(key) + ": '" + std::string(text) +
                        "' is not one of auto, cpu, cuda");
}

const char* device_name(Device d) {
  switch (d) {
    case Device::kAuto:
      return "auto";
    case Device::kCpu:
      return "cpu";
    case Device::kCuda:
      return "cuda";
  }
  return "?";
}

bool cuda_available() {
#if defined(PMKV_HAVE_CUDA)
  return CudaBackend::device_count() > 0;
#else
  return false;
#endif
}

Device resolve_device(Device d) {
  if (d == Device::kAuto) return cuda_available() ? Device::kCuda : Device::kCpu;
  if (d == Device::kCuda && !cuda_available()) {
#if defined(PMKV_HAVE_CUDA)
    throw InvalidArgument(
        "device cuda: no usable CUDA GPU found (driver or device missing); "
        "use --device cpu");
#else
    throw InvalidArgument(
        "device cuda: this pmkv was built without CUDA (PMKV_CUDA=OFF); "
        "use --device cpu");
#endif
  }
  return d;
}

std::unique_ptr<Backend> make_backend(const BackendOptions& o, const ModelConfig& config,
                                      const WeightStore* weights, kv::PageGeometry geometry,
                                      int32_t num_pages,
                                      const std::vector<std::vector<float>>& key_scales) {
  const Device device = resolve_device(o.device);
  if (device == Device::kCuda) {
#if defined(PMKV_HAVE_CUDA)
    CudaBackendOptions co;
    co.max_step_tokens = o.max_step_tokens;
    co.dummy_weights = o.dummy_weights;
    co.key_scales = key_scales;
    return std::make_unique<CudaBackend>(config, weights, geometry, num_pages, std::move(co));
#endif
  }
  if (o.dummy_weights) {
    throw InvalidArgument("load format dummy: only the cuda device supports random weights");
  }
  if (weights == nullptr) throw InvalidArgument("make_backend: no weights");
  auto cpu = std::make_unique<CpuBackend>(config, *weights, geometry, num_pages,
                                          CpuBackendOptions{o.num_threads});
  if (!key_scales.empty()) cpu->fold_key_scales(key_scales);
  return cpu;
}

}  // namespace pmkv
