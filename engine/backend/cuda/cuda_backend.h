#pragma once
// CudaBackend: the whole decoder on one GPU. bf16 weights (q/k/v and gate/up fused into one
// matrix each), cuBLASLt GEMMs with fp32 accumulation, an fp32 residual stream, and the kernels of
// kernels/: embedding, RMSNorm fused with the residual add, RoPE fused with the KV write into the
// 16-bit window slots, the step's window flushes and demotions, prefill attention (chunk plus
// cached mixed-bit pages) or split-KV decode attention, SiLU-mul, and the logits. One stream; the
// only host synchronization of a step is the copy of its results back. Decode steps replay CUDA
// graphs captured per batch-size bucket (CudaBackendOptions::cuda_graphs).
//
// Memory is planned at construction and logged: weights, the KV pool (one cudaMalloc), and
// activations for `max_step_tokens` rows. A step with more rows grows the activations (logged).
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/weight_store.h"
#include "kernels/kv_page_layout.h"

namespace pmkv {

struct CudaBackendOptions {
  int device = 0;
  int32_t max_step_tokens = 2048;  // rows of one step the activations are planned for
  int32_t max_logit_rows = 256;    // rows of logits one step returns (grows on demand)
  // Random weights instead of a checkpoint (benchmarks of a real shape without its file).
  bool dummy_weights = false;
  uint64_t dummy_seed = 0;
  std::vector<std::vector<float>> key_scales;  // [layers][kv_width]; empty: none
  // Decode steps of up to graph_max_batch sequences run as CUDA graphs, one per batch-size
  // bucket (1, 2, 4, 8, then multiples of 8) and set of launches (bit-widths present,
  // flushes, demotion waves). Off: every step is launched kernel by kernel.
  bool cuda_graphs = true;
  int32_t graph_max_batch = 256;
};

// How decode steps ran (for tests and the benchmarks).
struct CudaGraphCounters {
  int64_t captures = 0;       // graphs captured and instantiated
  int64_t replays = 0;        // steps launched as a graph
  int64_t eager_warmups = 0;  // graph-shaped steps run eagerly (a shape's first use)
  int64_t drops = 0;          // times every graph was dropped (a baked-in buffer grew)
};

// What a GPU has and what the backend took, for the start-up log and the benchmarks.
struct CudaMemoryPlan {
  std::string device_name;
  int64_t device_total_bytes = 0;
  int64_t weight_bytes = 0;
  int64_t kv_pool_bytes = 0;
  int64_t activation_bytes = 0;
  int64_t workspace_bytes = 0;
};

class CudaBackend final : public Backend {
 public:
  // Throws InvalidArgument when no usable GPU is present or the model's shape is one the kernels
  // do not support (head_dim not 64/128, more than 8 query heads per KV head), LoadError naming
  // the tensor when a weight is missing or misshaped. `weights` may be null only with
  // options.dummy_weights.
  CudaBackend(const ModelConfig& config, const WeightStore* weights, kv::PageGeometry geometry,
              int32_t num_pages, CudaBackendOptions options = {});
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  const ModelConfig& config() const override { return cfg_; }
  void forward(const StepBatch& batch, std::span<float> logits) override;
  bool samples_on_device() const override { return true; }
  using Backend::forward_sample;
  using Backend::wait_sampled;
  void forward_sample(const StepBatch& batch, std::span<const DeviceSampling> rows,
                      std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs) override;
  // Steps in flight (Backend's contract): the sampled tokens stay on the device for the next
  // step's token_src rows and come back through a pinned buffer per in-flight step, with the
  // log-probabilities the sampling kernel computed (kernels/sampling/sampling.h). A decode step's
  // inputs (graph steps: page tables, decode plan, token_src, sampling rows) go to the device on a
  // copy stream while the step in flight runs, into a buffer set of their own per in-flight step,
  // and the tokens come back on another: between two steps the GPU runs only the token gather.
  void launch_sample(const StepBatch& batch, std::span<const DeviceSampling> rows) override;
  void wait_sampled(std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs) override;
  void drop_in_flight() noexcept override;
  int64_t weight_bytes() const override;
  int64_t kv_pool_bytes() const override;
  double device_wait_seconds() const override;

  const CudaMemoryPlan& memory_plan() const;
  const CudaGraphCounters& graph_counters() const;
  // Host time of the last step from its batch to its launches (page arrays, decode plan, upload
  // staging), for the benchmarks.
  double last_prepare_seconds() const;
  // Waits for the device (benchmarks time whole steps).
  void synchronize();

  // Number of CUDA devices usable by this process (0 when the driver or a GPU is missing).
  static int device_count();

 private:
  // Enqueues the whole step (inputs upload, token_src gather, layers, logits into the device
  // buffer); no sync, except, for an eager step, waiting for the previous eager step's uploads to
  // leave the staging buffers.
  void run_step(const StepBatch& batch);

  struct Impl;
  std::unique_ptr<Impl> impl_;
  ModelConfig cfg_;
};

}  // namespace pmkv
