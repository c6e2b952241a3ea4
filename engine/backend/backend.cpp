#include "engine/backend/backend.h"

#include <stdexcept>

namespace pmkv {

void Backend::forward_sample(const StepBatch&, std::span<const DeviceSampling>,
                             std::span<int32_t>) {
  throw std::logic_error("backend " + name() + " does not sample on the device");
}

}  // namespace pmkv
