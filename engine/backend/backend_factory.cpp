#include "engine/backend/backend_factory.h"

#include <spdlog/spdlog.h>

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

bool cuda_supports(const ModelConfig& c, std::string* why) {
  std::string w;
  if (c.head_dim != 64 && c.head_dim != 128) {
    w = "head_dim " + std::to_string(c.head_dim) + " (the CUDA kernels take 64 or 128)";
  } else if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0 || c.group_size() > 8) {
    w = std::to_string(c.num_heads) + " query heads over " + std::to_string(c.num_kv_heads) +
        " KV heads (the CUDA kernels take at most 8 per KV head)";
  }
  if (why != nullptr) *why = w;
  return w.empty();
}

Device choose_device(Device requested, const ModelConfig& config) {
  std::string why;
  if (requested == Device::kCuda) {
    resolve_device(Device::kCuda);  // throws without a GPU
    if (!cuda_supports(config, &why)) {
      throw InvalidArgument("device cuda: this model has " + why + "; use --device cpu");
    }
    return Device::kCuda;
  }
  if (requested == Device::kAuto && cuda_available()) {
    if (cuda_supports(config, &why)) return Device::kCuda;
    spdlog::info("device auto: running on the cpu, the CUDA kernels do not take this model's {}",
                 why);
  }
  return Device::kCpu;
}

std::unique_ptr<Backend> make_backend(const BackendOptions& o, const ModelConfig& config,
                                      const WeightStore* weights, kv::PageGeometry geometry,
                                      int32_t num_pages,
                                      const std::vector<std::vector<float>>& key_scales) {
  const Device device = choose_device(o.device, config);
  if (device == Device::kCuda) {
#if defined(PMKV_HAVE_CUDA)
    CudaBackendOptions co;
    co.max_step_tokens = o.max_step_tokens;
    co.dummy_weights = o.dummy_weights;
    co.cuda_graphs = o.cuda_graphs;
    co.graph_max_batch = o.graph_max_batch;
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
