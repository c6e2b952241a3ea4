#include "engine/backend/cuda/cuda_backend.h"

#include <cuda_runtime.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>

#include "engine/backend/backend_factory.h"
#include "engine/backend/cuda/cuda_util.h"
#include "engine/backend/cuda/gemm.h"
#include "engine/backend/key_scale_fold.h"
#include "engine/backend/penalty_history.h"
#include "engine/common/error.h"
#include "kernels/attention/decode.h"
#include "kernels/attention/prefill.h"
#include "kernels/kv/kv_ops.h"
#include "kernels/model/fill.h"
#include "kernels/model/layer_ops.h"
#include "kernels/sampling/sampling.h"

namespace pmkv {

using cuda::DeviceMemory;
using cuda::GemmOut;

// The backend hands the engine's op structs to the kernels byte for byte.
static_assert(sizeof(kernels::KvRequantOp) == sizeof(kv::RequantOp));
static_assert(sizeof(kernels::KvDemoteOp) == sizeof(kv::DemoteOp));

namespace {

uint16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

std::string layer_name(int64_t l, const char* rest) {
  return "model.layers." + std::to_string(l) + "." + rest;
}

std::string mib(int64_t bytes) {
  return std::to_string((bytes + (1 << 19)) >> 20) + " MiB";
}

uint64_t mix_seed(uint64_t seed, uint64_t i) {
  uint64_t x = seed ^ (i * 0x9E3779B97F4A7C15ull);
  x = (x ^ (x >> 31)) * 0xBF58476D1CE4E5B9ull;
  return x ^ (x >> 29);
}

// Step inputs are packed into one host buffer (each array 256-byte aligned) and copied with one
// cudaMemcpyAsync; offsets say where each array lands in the device copy.
class Packer {
 public:
  template <class T>
  size_t add(const T* data, size_t n) {
    const size_t off = (bytes_.size() + 255) / 256 * 256;
    bytes_.resize(off + n * sizeof(T));
    if (n > 0) std::memcpy(bytes_.data() + off, data, n * sizeof(T));
    return off;
  }
  template <class T>
  size_t add(const std::vector<T>& v) {
    return add(v.data(), v.size());
  }
  const std::vector<std::byte>& bytes() const { return bytes_; }
  void clear() { bytes_.clear(); }

 private:
  std::vector<std::byte> bytes_;
};

// A contiguous run of a step's op array: one (layer, op list).
struct OpRun {
  int32_t first, count;
};

struct GraphExecDeleter {
  void operator()(cudaGraphExec_t e) const { cudaGraphExecDestroy(e); }
};
using GraphExecPtr = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter>;

// Everything the launches of one step read: device pointers and sizes. An eager step points into
// `inputs` (packed per step) and the exact decode plan; a graph step into the fixed-layout graph
// buffers, so that a captured graph replays with the next step's contents.
struct StepArgs {
  int64_t rows = 0;        // rows the launches cover (graph: the batch bucket)
  int64_t logit_rows = 0;  // rows of the final norm and lm_head
  bool decode = false;
  int64_t num_seqs = 0;
  int32_t max_rows = 0;
  int32_t total_cached = 0;
  const int32_t *tok = nullptr, *pos = nullptr, *seq_starts = nullptr, *seq_cached = nullptr;
  const int32_t *cached_starts = nullptr, *page_starts = nullptr, *page_ids = nullptr;
  const int32_t *page_bits = nullptr, *page_tokens = nullptr;
  const int32_t *w_page = nullptr, *w_bits = nullptr, *w_slot = nullptr;  // [layers][rows]
  const int32_t* logit_row_ids = nullptr;
  const kernels::KvRequantOp* requants = nullptr;
  const kernels::KvDemoteOp* demotes = nullptr;
  // Eager: the host's runs per layer. Graph: op_ranges (device, [layers][1 + waves cap][2]) and
  // which launches the graph has.
  const std::vector<OpRun>* requant_runs = nullptr;
  const std::vector<std::vector<OpRun>>* demote_runs = nullptr;
  const int32_t* op_ranges = nullptr;
  bool has_requant = false;
  int32_t waves = 0;
  // Decode: the exact plan's workspace, or the fixed layout with fixed launch sizes.
  void* decode_ws = nullptr;
  bool fixed_layout = false;
  kernels::DecodeWorkspaceLayout layout;
  int32_t split_ctas[4] = {};
  uint32_t dense_mask = 0;  // kernels::DecodePlan::dense_mask: which launches take the dense kernel
};

}  // namespace

struct CudaBackend::Impl {
  struct Layer {
    DeviceMemory attn_norm, mlp_norm;          // f32 [hidden]
    DeviceMemory wqkv, wo, w_gate_up, w_down;  // bf16, [out, in]; w_gate_up's rows: see below
    DeviceMemory bqkv, bo, b_gate_up, b_down;  // f32, empty when the model has none
  };

  ModelConfig cfg;
  kv::PageGeometry geometry;
  int64_t page_bytes = 0;
  int32_t num_pages = 0;
  CudaBackendOptions options;
  int num_sms = 0;
  // RoPE + KV write and decode attention launched with programmatic dependent launch
  // (RopeKvWriteParams::pdl, DecodeParams::pdl): each starts while the kernel before it runs and
  // waits only for its inputs (RoPE: its cos/sin table first; attention: its plan). PMKV_PDL=0 or
  // PMKV_ATTN_PDL=0: plain launches (A/B).
  bool attn_pdl = true;
  // Decode attention over mixed bits: one launch per bit-width present, and they meet only in the
  // merge, so each runs on its own branch: forked after the KV ops, joined before the o projection
  // (in a graph: parallel branches). The lowest bit-width present (under a budget, the body's
  // largest share) stays on the main stream with PDL; the others are plain launches on side
  // streams. Under a 4-bit budget a layer has 16-, 8-, 4- and 2-bit pages, and with only the
  // 16-bit launch branched off (the fifteenth session's form) the body's three launches ran one
  // after another, each paying its fixed cost: every branch took batch 1 x 4K from 5.47 to 5.10-
  // 5.21 ms a step, 1 x 64K from 6.29-6.46 to 5.97-6.11, 16 x 16K from 9.2-9.4 to 8.7-8.9; at
  // 16 and 64 x 4K it is 1-3% slower (launches that each fill the GPU then share it;
  // bench/RESULTS.md, eighteenth session). PMKV_ATTN_FORK=0: one stream; =16: the 16-bit launch
  // alone on a side stream. A/B knobs.
  enum class AttnFork { kNone, kSixteen, kEach };
  AttnFork attn_fork = AttnFork::kEach;
  // PMKV_DECODE_MIN_ITEM_KB: the decode plan's smallest item (DecodePlanConfig::min_item_bytes), an
  // A/B knob; 0 keeps the plan's default.
  int64_t decode_min_item_bytes = 0;
  // PMKV_DECODE_DENSE=never|always: the decode plan's dense 2/4-bit variant
  // (DecodePlanConfig::dense), an A/B and test knob; unset or auto: the plan decides.
  kernels::DecodePlanConfig::Dense decode_dense = kernels::DecodePlanConfig::Dense::kAuto;
  std::unique_ptr<cuda::Stream> stream;
  std::array<std::unique_ptr<cuda::Stream>, 3> side_streams;  // a branch per extra bit-width
  std::unique_ptr<cuda::Event> fork_event;
  std::array<std::unique_ptr<cuda::Event>, 3> join_events;
  std::unique_ptr<cuda::GemmRunner> gemm;

  DeviceMemory embed, lm_head, final_norm, inv_freq;
  const void* head_weights() const { return lm_head.bytes() > 0 ? lm_head.as() : embed.as(); }
  std::vector<Layer> layers;
  // Row order of every layer's w_gate_up: interleaved by 8 when the intermediate size allows
  // (the SwiGLU can then run in the skinny GEMM's epilogue), stacked otherwise.
  kernels::GateUpLayout gate_up_layout = kernels::GateUpLayout::kStacked;
  int64_t weight_bytes = 0;
  DeviceMemory pool;

  // Activations, [rows_capacity] rows each.
  int64_t rows_capacity = 0;
  DeviceMemory x, h, qkv, q, attn, delta, gu, act;
  int64_t logit_capacity = 0;
  DeviceMemory hf, logits;
  cuda::PinnedMemory logits_host;

  // Step inputs and workspaces.
  Packer packer;
  cuda::PinnedMemory staging;
  DeviceMemory inputs;
  cuda::PinnedMemory plan_staging;  // the decode plan's tables
  // Steps in flight (launch_sample). The eager staging buffers above are rewritten by the next
  // eager run_step: `uploads_done` (recorded after an eager step's uploads) is waited for first.
  // Graph steps and the sampling use one set of buffers per in-flight step (`slot`, alternating):
  // a step's set was last used by the step before the one in flight, which the host has waited
  // for (at most two in flight), so its uploads go out at launch on `upload_stream`, overlapping
  // the step in flight, and the main stream only waits for their event (`uploaded`). The
  // sampled tokens come back on `readback_stream`. `sampled` holds the latest step's tokens on the
  // device, read by the next step's token_src gather before its own sampling overwrites them
  // (stream order; that sampling also waits for the readback of the tokens it overwrites).
  struct InFlight {
    int slot = 0;
    int32_t rows = 0;
    size_t out_offset = 0;  // the tokens' place in sample_staging[slot]
    // Rows' DeviceSampling::logprobs (empty when no row asked); their values follow the tokens.
    std::vector<int32_t> logprobs;
  };
  std::deque<InFlight> in_flight;
  int next_slot = 0;
  cuda::PinnedMemory sample_staging[2];
  cuda::Event sampled_event[2];    // a slot's tokens are in sample_staging (readback stream)
  cuda::Event sample_uploaded[2];  // a slot's sampling inputs are on the device (upload stream)
  cuda::Event uploaded[2];         // a slot's graph inputs are on the device (upload stream)
  cuda::Event sampling_done;       // the latest sampling kernel ran (main stream)
  std::unique_ptr<cuda::Stream> upload_stream, readback_stream;
  cuda::Event uploads_done;
  bool uploads_recorded = false;
  double device_wait_s = 0;  // device_wait_seconds(): time in the synchronizations of steps
  // Blocks until `e` (a step's event) completes, timed as a device wait.
  void wait_event(cudaEvent_t e) {
    const auto t0 = std::chrono::steady_clock::now();
    PMKV_CUDA_CHECK(cudaEventSynchronize(e));
    device_wait_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  void wait_stream() {
    const auto t0 = std::chrono::steady_clock::now();
    PMKV_CUDA_CHECK(cudaStreamSynchronize(s()));
    device_wait_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  DeviceMemory sampled;            // int32 [sampled_capacity]
  int32_t* step_tokens = nullptr;  // the latest run_step's input token ids on the device
  PenaltyHistory penalty_history;  // the sampling rows' histories, rebuilt every step
  int32_t sampled_capacity = 0;
  int32_t sampled_rows = 0;  // rows the latest launched step sampled (0: none on the device)
  cuda::PinnedMemory src_staging;
  DeviceMemory src_dev;
  DeviceMemory sample_inputs[2], sample_ws;
  DeviceMemory sample_logprobs;  // [R] sampled token's, [R x 20] top ids, [R x 20] top values
  DeviceMemory prefill_ws, decode_ws;
  kernels::DecodePlan decode_plan;
  CudaMemoryPlan memory;

  // -- CUDA graphs of decode steps, one per (batch bucket, launch set); see run_step.
  static constexpr int32_t kGraphWaves = 2;  // demotion waves a graph has launches for
  static constexpr size_t kMaxGraphs = 96;
  std::unordered_map<uint64_t, GraphExecPtr> graphs;
  std::unordered_set<uint64_t> graph_seen;  // keys run once eagerly (captured on the next use)
  CudaGraphCounters graph_counters;
  double last_prepare_seconds = 0;
  // Host arrays of a step (run_step), kept so that their memory is reused.
  std::vector<int32_t> h_page_ids, h_page_bits, h_page_tokens, h_w_page, h_w_bits, h_w_slot;
  std::vector<kv::RequantOp> h_requants;
  std::vector<kv::DemoteOp> h_demotes;
  // Fixed-layout inputs of graph steps (offsets in bytes; arrays sized by the capacities), one
  // set per slot (see in_flight): the graphs of a slot bake in its set's pointers.
  struct GraphInputs {
    int32_t rows = 0, pages = 0, requants = 0, demotes = 0;  // capacities
    size_t tok = 0, pos = 0, src = 0, w_page = 0, w_bits = 0, w_slot = 0, logit_rows = 0;
    size_t op_ranges = 0, page_ids = 0, page_tokens = 0, requant_ops = 0, demote_ops = 0;
    size_t bytes = 0;
  };
  struct GraphSet {
    GraphInputs gin;
    DeviceMemory inputs, ws;  // the fixed-layout arrays; the decode plan's workspace
    cuda::PinnedMemory staging, plan_staging;
    kernels::DecodeWorkspaceLayout layout;
  };
  std::array<GraphSet, 2> graph_sets;

  bool graphs_enabled() const { return options.cuda_graphs && !timer.enabled; }
  // The batch bucket a decode step of `seqs` sequences runs in (1, 2, 4, 8, 16, 24, ...), 0 when
  // graphs are off or the batch is larger than graph_max_batch.
  int64_t graph_bucket(int64_t seqs) const {
    if (!graphs_enabled() || seqs < 1 || seqs > options.graph_max_batch) return 0;
    if (seqs <= 8) return seqs <= 1 ? 1 : seqs <= 2 ? 2 : seqs <= 4 ? 4 : 8;
    return (seqs + 7) / 8 * 8;
  }
  void drop_graphs(const char* why) {
    if (graphs.empty() && graph_seen.empty()) return;
    spdlog::debug("cuda: dropping {} captured graphs ({})", graphs.size(), why);
    graphs.clear();
    graph_seen.clear();
    ++graph_counters.drops;
  }
  uint64_t graph_key(const StepArgs& a, int slot) const {
    // rows (<= 512: 10 bits), log2 + 1 of each launch size (0: none; 5 bits each), flags, the
    // input set, the launches on the dense kernel.
    auto size_code = [](int32_t n) -> uint64_t { return n > 0 ? std::bit_width(uint32_t(n)) : 0; };
    uint64_t key = static_cast<uint64_t>(a.rows);
    for (int b = 0; b < 4; ++b)
      key |= size_code(a.split_ctas[b]) << (10 + 5 * b);
    return key | uint64_t{a.has_requant} << 35 | static_cast<uint64_t>(a.waves) << 36 |
           static_cast<uint64_t>(slot) << 40 | static_cast<uint64_t>(a.dense_mask) << 48;
  }
  // Grows slot `slot`'s fixed-layout graph inputs (dropping every graph) when a step has more
  // pages or ops.
  void reserve_graph_inputs(int slot, int32_t pages, int32_t requants, int32_t demotes);
  // Packs a graph step's inputs into slot `slot`'s staging buffers, copies them on the upload
  // stream and makes the main stream wait for them.
  void upload_graph_inputs(int slot, const StepBatch& b, int64_t rows,
                           const std::vector<int32_t>& w_page, const std::vector<int32_t>& w_bits,
                           const std::vector<int32_t>& w_slot,
                           const std::vector<kv::RequantOp>& requants,
                           const std::vector<kv::DemoteOp>& demotes,
                           const std::vector<OpRun>& requant_runs,
                           const std::vector<std::vector<OpRun>>& demote_runs, StepArgs* a);
  void kv_ops(const StepArgs& a, int64_t l);
  // A layer's decode attention: its launches per bit-width on the main stream or on branches
  // (attn_fork).
  void launch_attention(const kernels::DecodeParams& dp);
  void enqueue_forward(const StepArgs& a);

  // PMKV_CUDA_TIMING=1: CUDA events split each step into phases (upload + embedding, QKV + RoPE
  // + KV write, KV ops (run after attention), attention, o_proj + MLP, head + sampling); totals are logged every 64
  // steps. Off by default: the events cost a little.
  struct PhaseTimer {
    static constexpr int kPhases = 6;
    static constexpr const char* kNames[kPhases] = {"upload+embed", "qkv+rope", "kv_ops",
                                                    "attention",    "mlp",      "head"};
    bool enabled = false;
    std::vector<cudaEvent_t> events;  // [marks]
    std::vector<int> phase_of;        // phase ending at mark i (i >= 1)
    double total_ms[kPhases] = {};
    double host_ms = 0;
    int64_t steps = 0;
    std::chrono::steady_clock::time_point host_t0;
  } timer;
  void mark(int phase_ending) {
    if (!timer.enabled) return;
    cudaEvent_t e;
    PMKV_CUDA_CHECK(cudaEventCreate(&e));
    PMKV_CUDA_CHECK(cudaEventRecord(e, s()));
    timer.events.push_back(e);
    timer.phase_of.push_back(phase_ending);
  }
  void begin_timing() {
    if (!timer.enabled) return;
    timer.host_t0 = std::chrono::steady_clock::now();
    mark(-1);
  }
  // After the step's synchronization.
  void end_timing() {
    if (!timer.enabled || timer.events.empty()) return;
    for (size_t i = 1; i < timer.events.size(); ++i) {
      float ms = 0;
      cudaEventElapsedTime(&ms, timer.events[i - 1], timer.events[i]);
      timer.total_ms[timer.phase_of[i]] += ms;
    }
    for (cudaEvent_t e : timer.events)
      cudaEventDestroy(e);
    timer.events.clear();
    timer.phase_of.clear();
    timer.host_ms +=
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - timer.host_t0)
            .count();
    if (++timer.steps % 64 == 0) {
      std::string line;
      double gpu = 0;
      for (int p = 0; p < PhaseTimer::kPhases; ++p) {
        line += std::string(PhaseTimer::kNames[p]) + " " +
                std::to_string(timer.total_ms[p] / timer.steps) + " ms, ";
        gpu += timer.total_ms[p];
      }
      spdlog::info("cuda timing over {} steps, per step: {}gpu {} ms, wall {} ms", timer.steps,
                   line, gpu / timer.steps, timer.host_ms / timer.steps);
    }
  }

  cudaStream_t s() const { return stream->get(); }

  // -- loading
  DeviceMemory upload_f32(const std::vector<float>& v) {
    DeviceMemory m(v.size() * sizeof(float));
    PMKV_CUDA_CHECK(cudaMemcpy(m.as(), v.data(), m.bytes(), cudaMemcpyHostToDevice));
    weight_bytes += static_cast<int64_t>(m.bytes());
    return m;
  }
  DeviceMemory upload_bf16(const std::vector<float>& v) {
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i)
      b[i] = to_bf16(v[i]);
    DeviceMemory m(b.size() * sizeof(uint16_t));
    PMKV_CUDA_CHECK(cudaMemcpy(m.as(), b.data(), m.bytes(), cudaMemcpyHostToDevice));
    weight_bytes += static_cast<int64_t>(m.bytes());
    return m;
  }
  // Row blocks [rows_i, cols] stacked into one bf16 matrix. bf16 tensors are copied as stored;
  // others are widened to fp32 and rounded to bf16.
  DeviceMemory upload_stacked(const WeightStore& w, const std::vector<std::string>& names,
                              const std::vector<int64_t>& rows, int64_t cols) {
    int64_t total = 0;
    for (int64_t r : rows)
      total += r;
    DeviceMemory m(static_cast<size_t>(total * cols) * sizeof(uint16_t));
    int64_t at = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      const TensorInfo& info = w.info(names[i]);
      const std::vector<int64_t> shape{rows[i], cols};
      auto* dst = m.as<uint16_t>() + at * cols;
      if (info.dtype == DType::kBF16 && info.shape == shape) {
        const auto raw = w.raw(names[i]);
        PMKV_CUDA_CHECK(cudaMemcpy(dst, raw.data(), raw.size(), cudaMemcpyHostToDevice));
      } else {
        const std::vector<float> f = w.load_f32(names[i], shape);  // validates the shape
        std::vector<uint16_t> b(f.size());
        for (size_t j = 0; j < f.size(); ++j)
          b[j] = to_bf16(f[j]);
        PMKV_CUDA_CHECK(
            cudaMemcpy(dst, b.data(), b.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
      }
      at += rows[i];
    }
    weight_bytes += static_cast<int64_t>(m.bytes());
    return m;
  }
  std::vector<float> load_cat(const WeightStore& w, const std::vector<std::string>& names,
                              const std::vector<std::vector<int64_t>>& shapes) {
    std::vector<float> out;
    for (size_t i = 0; i < names.size(); ++i) {
      const auto v = w.load_f32(names[i], shapes[i]);
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }
  DeviceMemory dummy_bf16(int64_t n, uint64_t tag) {
    DeviceMemory m(static_cast<size_t>(n) * sizeof(uint16_t));
    // Uniform with std 0.02 (a common init scale): activations stay finite through every layer.
    PMKV_CUDA_CHECK(kernels::launch_fill_uniform_bf16(
        m.as<uint16_t>(), n, mix_seed(options.dummy_seed, tag), 0.02f * std::sqrt(3.0f), s()));
    weight_bytes += static_cast<int64_t>(m.bytes());
    return m;
  }
  DeviceMemory ones_f32(int64_t n) {
    DeviceMemory m(static_cast<size_t>(n) * sizeof(float));
    PMKV_CUDA_CHECK(kernels::launch_fill_f32(m.as<float>(), n, 1.0f, s()));
    weight_bytes += static_cast<int64_t>(m.bytes());
    return m;
  }

  // Reorders a stacked [gate (I rows); up (I rows)] bf16 matrix into groups of 8 gate rows and
  // the same 8 up rows (kernels::GateUpLayout::kInterleaved8), on the device.
  void interleave_gate_up(DeviceMemory& wgu) {
    const int64_t H = cfg.hidden_size, I = cfg.intermediate_size;
    DeviceMemory out(wgu.bytes());
    const size_t group = static_cast<size_t>(8 * H) * sizeof(uint16_t);  // 8 rows
    const auto* src = wgu.as<uint8_t>();
    auto* dst = out.as<uint8_t>();
    // Gate group q -> output group 2q, up group q -> 2q + 1.
    PMKV_CUDA_CHECK(cudaMemcpy2DAsync(dst, 2 * group, src, group, group, static_cast<size_t>(I / 8),
                                      cudaMemcpyDeviceToDevice, s()));
    PMKV_CUDA_CHECK(cudaMemcpy2DAsync(dst + group, 2 * group, src + static_cast<size_t>(I) * H * 2,
                                      group, group, static_cast<size_t>(I / 8),
                                      cudaMemcpyDeviceToDevice, s()));
    PMKV_CUDA_CHECK(cudaStreamSynchronize(s()));
    wgu = std::move(out);
  }

  void load(const WeightStore& w);
  void load_dummy();
  void reserve_rows(int64_t rows);
  void reserve_logits(int64_t rows);
};

void CudaBackend::Impl::load(const WeightStore& w) {
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, V = cfg.vocab_size;
  const int64_t qw = cfg.q_width(), kvw = cfg.kv_width();
  const bool has_embed = w.contains("model.embed_tokens.weight");
  const bool has_head = w.contains("lm_head.weight");
  const std::string embed_name = (has_embed || !cfg.tie_word_embeddings || !has_head)
                                     ? "model.embed_tokens.weight"
                                     : "lm_head.weight";
  embed = upload_stacked(w, {embed_name}, {V}, H);
  if (!cfg.tie_word_embeddings) lm_head = upload_stacked(w, {"lm_head.weight"}, {V}, H);
  final_norm = upload_f32(w.load_f32("model.norm.weight", std::vector<int64_t>{H}));
  layers.resize(cfg.num_layers);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    Layer& L = layers[l];
    L.attn_norm =
        upload_f32(w.load_f32(layer_name(l, "input_layernorm.weight"), std::vector<int64_t>{H}));
    L.mlp_norm = upload_f32(
        w.load_f32(layer_name(l, "post_attention_layernorm.weight"), std::vector<int64_t>{H}));
    const std::vector<std::string> qkv_names{layer_name(l, "self_attn.q_proj.weight"),
                                             layer_name(l, "self_attn.k_proj.weight"),
                                             layer_name(l, "self_attn.v_proj.weight")};
    std::vector<float> bqkv;
    if (cfg.qkv_bias) {
      bqkv =
          load_cat(w,
                   {layer_name(l, "self_attn.q_proj.bias"), layer_name(l, "self_attn.k_proj.bias"),
                    layer_name(l, "self_attn.v_proj.bias")},
                   {{qw}, {kvw}, {kvw}});
    }
    if (options.key_scales.empty()) {
      L.wqkv = upload_stacked(w, qkv_names, {qw, kvw, kvw}, H);
    } else {
      // Folding needs the values: widen, fold in fp32 (as the CPU backend does), round once.
      std::vector<float> wqkv = load_cat(w, qkv_names, {{qw, H}, {kvw, H}, {kvw, H}});
      fold_key_scales_layer(cfg, options.key_scales[l], wqkv, bqkv);
      L.wqkv = upload_bf16(wqkv);
    }
    if (cfg.qkv_bias) L.bqkv = upload_f32(bqkv);
    L.wo = upload_stacked(w, {layer_name(l, "self_attn.o_proj.weight")}, {H}, qw);
    if (cfg.o_bias) {
      L.bo =
          upload_f32(w.load_f32(layer_name(l, "self_attn.o_proj.bias"), std::vector<int64_t>{H}));
    }
    L.w_gate_up = upload_stacked(
        w, {layer_name(l, "mlp.gate_proj.weight"), layer_name(l, "mlp.up_proj.weight")}, {I, I}, H);
    if (gate_up_layout == kernels::GateUpLayout::kInterleaved8) interleave_gate_up(L.w_gate_up);
    L.w_down = upload_stacked(w, {layer_name(l, "mlp.down_proj.weight")}, {H}, I);
    if (cfg.mlp_bias) {
      L.b_gate_up = upload_f32(load_cat(
          w, {layer_name(l, "mlp.gate_proj.bias"), layer_name(l, "mlp.up_proj.bias")}, {{I}, {I}}));
      L.b_down =
          upload_f32(w.load_f32(layer_name(l, "mlp.down_proj.bias"), std::vector<int64_t>{H}));
    }
  }
}

void CudaBackend::Impl::load_dummy() {
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, V = cfg.vocab_size;
  const int64_t qw = cfg.q_width(), kvw = cfg.kv_width();
  uint64_t tag = 0;
  embed = dummy_bf16(V * H, tag++);
  if (!cfg.tie_word_embeddings) lm_head = dummy_bf16(V * H, tag++);
  final_norm = ones_f32(H);
  layers.resize(cfg.num_layers);
  for (Layer& L : layers) {
    L.attn_norm = ones_f32(H);
    L.mlp_norm = ones_f32(H);
    L.wqkv = dummy_bf16((qw + 2 * kvw) * H, tag++);
    L.wo = dummy_bf16(H * qw, tag++);
    L.w_gate_up = dummy_bf16(2 * I * H, tag++);
    L.w_down = dummy_bf16(H * I, tag++);
    // Biases stay empty: a dummy model of a biased architecture runs without them.
  }
  PMKV_CUDA_CHECK(cudaStreamSynchronize(s()));
}

void CudaBackend::Impl::reserve_graph_inputs(int slot, int32_t P, int32_t NR, int32_t ND) {
  const int64_t L = cfg.num_layers;
  GraphSet& set = graph_sets[slot];
  const GraphInputs& gin = set.gin;
  // Grow the fixed layouts when this step does not fit (every graph bakes their pointers in).
  if (gin.bytes == 0 || P > gin.pages || NR > gin.requants || ND > gin.demotes) {
    drop_graphs("graph inputs grow");
    GraphInputs g;
    g.rows = options.graph_max_batch;
    g.pages = std::max({P, 2 * gin.pages, 4096});
    g.requants = std::max({NR, 2 * gin.requants, 256});
    g.demotes = std::max({ND, 2 * gin.demotes, 64});
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t off = at;
      at = (at + bytes + 255) / 256 * 256;
      return off;
    };
    const size_t row_ints = static_cast<size_t>(g.rows) * 4;
    g.tok = take(row_ints);
    g.pos = take(row_ints);
    g.src = take(row_ints);
    g.w_page = take(row_ints * L);
    g.w_bits = take(row_ints * L);
    g.w_slot = take(row_ints * L);
    g.logit_rows = take(row_ints);
    g.op_ranges = take(static_cast<size_t>(L) * (1 + kGraphWaves) * 2 * 4);
    g.page_ids = take(static_cast<size_t>(g.pages) * 4);
    g.page_tokens = take(static_cast<size_t>(g.pages) * 4);
    g.requant_ops = take(static_cast<size_t>(g.requants) * sizeof(kv::RequantOp));
    g.demote_ops = take(static_cast<size_t>(g.demotes) * sizeof(kv::DemoteOp));
    g.bytes = at;
    set.gin = g;
    set.inputs.allocate(g.bytes);
    set.staging.reserve(g.bytes);
  }
}

void CudaBackend::Impl::upload_graph_inputs(
    int slot, const StepBatch& b, int64_t rows, const std::vector<int32_t>& w_page,
    const std::vector<int32_t>& w_bits, const std::vector<int32_t>& w_slot,
    const std::vector<kv::RequantOp>& requants, const std::vector<kv::DemoteOp>& demotes,
    const std::vector<OpRun>& requant_runs, const std::vector<std::vector<OpRun>>& demote_runs,
    StepArgs* a) {
  const int64_t L = cfg.num_layers;
  const size_t P = b.pages.size();
  GraphSet& set = graph_sets[slot];
  const GraphInputs& gin = set.gin;
  kernels::DecodeWorkspaceLayout& graph_layout = set.layout;
  kernels::DecodeCapacity need = kernels::decode_plan_sizes(decode_plan);
  if (graph_layout.total_bytes == 0 || !graph_layout.capacity.holds(need)) {
    drop_graphs("decode plan workspace grows");
    const kernels::DecodeCapacity& old = graph_layout.capacity;
    kernels::DecodeCapacity cap;
    cap.layers = need.layers;
    cap.items = std::max({need.items, 2 * old.items, 1024});
    cap.merges = std::max({need.merges, 2 * old.merges, 256});
    cap.bit_items = std::max({need.bit_items, 2 * old.bit_items, 1024});
    cap.layer_items = std::max({need.layer_items, 2 * old.layer_items, 256});
    graph_layout = kernels::decode_workspace_layout(cap, decode_plan.num_kv_heads,
                                                    decode_plan.group, decode_plan.head_dim);
    set.ws.allocate(static_cast<size_t>(graph_layout.total_bytes));
    set.plan_staging.reserve(static_cast<size_t>(graph_layout.tables_bytes));
  }

  // Pack into the pinned staging buffer at the fixed offsets; padding rows as run_step says.
  std::byte* st = set.staging.as<std::byte>();
  auto put = [&](size_t off, const void* src, size_t bytes) {
    if (bytes > 0) std::memcpy(st + off, src, bytes);
  };
  std::vector<int32_t> rowv(static_cast<size_t>(rows), 0);
  std::copy(b.token_ids.begin(), b.token_ids.end(), rowv.begin());
  put(gin.tok, rowv.data(), rowv.size() * 4);
  std::fill(rowv.begin(), rowv.end(), 0);
  std::copy(b.positions.begin(), b.positions.end(), rowv.begin());
  put(gin.pos, rowv.data(), rowv.size() * 4);
  if (!b.token_src.empty()) put(gin.src, b.token_src.data(), b.token_src.size() * 4);
  std::fill(rowv.begin(), rowv.end(), 0);
  std::copy(b.logit_rows.begin(), b.logit_rows.end(), rowv.begin());
  put(gin.logit_rows, rowv.data(), rowv.size() * 4);
  put(gin.w_page, w_page.data(), w_page.size() * 4);
  put(gin.w_bits, w_bits.data(), w_bits.size() * 4);
  put(gin.w_slot, w_slot.data(), w_slot.size() * 4);
  std::vector<int32_t> ranges(static_cast<size_t>(L) * (1 + kGraphWaves) * 2, 0);
  bool has_requant = false;
  int32_t waves = 0;
  for (int64_t l = 0; l < L; ++l) {
    int32_t* r = ranges.data() + l * (1 + kGraphWaves) * 2;
    r[0] = requant_runs[l].first;
    r[1] = requant_runs[l].count;
    has_requant = has_requant || requant_runs[l].count > 0;
    for (size_t w = 0; w < demote_runs[l].size(); ++w) {
      r[2 + 2 * w] = demote_runs[l][w].first;
      r[3 + 2 * w] = demote_runs[l][w].count;
      if (demote_runs[l][w].count > 0) waves = std::max(waves, static_cast<int32_t>(w) + 1);
    }
  }
  put(gin.op_ranges, ranges.data(), ranges.size() * 4);
  // (page ids and token counts are already in the staging buffer: run_step wrote them there)
  put(gin.requant_ops, requants.data(), requants.size() * sizeof(kv::RequantOp));
  put(gin.demote_ops, demotes.data(), demotes.size() * sizeof(kv::DemoteOp));
  // Copies of the used parts only (the capacities can be far larger than a step), on the upload
  // stream: the step in flight uses the other set.
  cudaStream_t up = upload_stream->get();
  std::byte* dv = set.inputs.as<std::byte>();
  auto copy = [&](size_t off, size_t bytes) {
    if (bytes == 0) return;
    PMKV_CUDA_CHECK(cudaMemcpyAsync(dv + off, st + off, bytes, cudaMemcpyHostToDevice, up));
  };
  copy(0, gin.page_ids);  // the row arrays and op ranges
  copy(gin.page_ids, P * 4);
  copy(gin.page_tokens, P * 4);
  copy(gin.requant_ops, requants.size() * sizeof(kv::RequantOp));
  copy(gin.demote_ops, demotes.size() * sizeof(kv::DemoteOp));

  std::byte* ps = set.plan_staging.as<std::byte>();
  kernels::pack_decode_plan(decode_plan, graph_layout, ps);
  std::byte* pw = set.ws.as<std::byte>();
  auto copy_plan = [&](int64_t off, size_t bytes) {
    if (bytes == 0) return;
    PMKV_CUDA_CHECK(cudaMemcpyAsync(pw + off, ps + off, bytes, cudaMemcpyHostToDevice, up));
  };
  copy_plan(graph_layout.layers_offset,
            decode_plan.layers.size() * sizeof(kernels::DecodeLayerPlan));
  copy_plan(graph_layout.items_offset, decode_plan.items.size() * sizeof(kernels::DecodeWorkItem));
  copy_plan(graph_layout.merges_offset,
            decode_plan.merges.size() * sizeof(kernels::DecodeMergeItem));
  copy_plan(graph_layout.bit_items_offset, decode_plan.bit_items.size() * 4);
  // The merge counters: zero as packed; the kernels leave them zero, this keeps a step from
  // inheriting a count an aborted one left behind.
  copy_plan(graph_layout.counters_offset, static_cast<size_t>(graph_layout.counters_bytes));
  PMKV_CUDA_CHECK(cudaEventRecord(uploaded[slot].get(), up));
  PMKV_CUDA_CHECK(cudaStreamWaitEvent(s(), uploaded[slot].get()));

  auto dev = [&](size_t off) { return reinterpret_cast<const int32_t*>(dv + off); };
  a->tok = dev(gin.tok);
  a->pos = dev(gin.pos);
  a->w_page = dev(gin.w_page);
  a->w_bits = dev(gin.w_bits);
  a->w_slot = dev(gin.w_slot);
  a->logit_row_ids = dev(gin.logit_rows);
  a->page_ids = dev(gin.page_ids);
  a->page_tokens = dev(gin.page_tokens);
  a->requants = reinterpret_cast<const kernels::KvRequantOp*>(dv + gin.requant_ops);
  a->demotes = reinterpret_cast<const kernels::KvDemoteOp*>(dv + gin.demote_ops);
  a->op_ranges = dev(gin.op_ranges);
  a->has_requant = has_requant;
  a->waves = waves;
  a->decode_ws = set.ws.as();
  a->fixed_layout = true;
  a->layout = graph_layout;
  // Launch sizes: per bit-width, the most items any layer has of it, rounded up to a power of two
  // (so the sizes, which are part of the graph's key, change rarely as contexts grow): every item
  // gets its own CTA as in an eager step and the surplus CTAs exit at once. Merges likewise.
  auto pow2_at_least = [](int32_t n) {
    int32_t p = 1;
    while (p < n)
      p *= 2;
    return p;
  };
  int32_t most[4] = {};
  for (const kernels::DecodeLayerPlan& lp : decode_plan.layers) {
    for (int bi = 0; bi < 4; ++bi)
      most[bi] = std::max(most[bi], lp.bits_count[bi]);
  }
  for (int bi = 0; bi < 4; ++bi)
    a->split_ctas[bi] = most[bi] > 0 ? pow2_at_least(most[bi]) : 0;
  a->dense_mask = decode_plan.dense_mask;
}

void CudaBackend::Impl::launch_attention(const kernels::DecodeParams& dp) {
  // The bit-widths with a launch, by decode_bits_index (0: 16 bits ... 3: 2 bits).
  const int32_t* sc = dp.plan.split_ctas;
  int present[4];
  int n = 0;
  for (int b = 0; b < 4; ++b) {
    if (sc[b] > 0) present[n++] = b;
  }
  if (attn_fork == AttnFork::kNone || n < 2) {
    PMKV_CUDA_CHECK(kernels::launch_decode(dp, s()));
    return;
  }
  // What stays on the main stream (a PDL launch after the KV ops) and what branches off.
  uint32_t main_mask = 0;
  std::array<uint32_t, 3> side_masks{};
  int sides = 0;
  if (attn_fork == AttnFork::kSixteen) {
    if (sc[0] == 0) {  // no 16-bit launch: nothing to branch off
      PMKV_CUDA_CHECK(kernels::launch_decode(dp, s()));
      return;
    }
    main_mask = 0xE;
    side_masks[sides++] = 0x1;
  } else {
    main_mask = 1u << present[n - 1];
    for (int i = 0; i < n - 1; ++i)
      side_masks[sides++] = 1u << present[i];
  }
  PMKV_CUDA_CHECK(cudaEventRecord(fork_event->get(), s()));
  kernels::DecodeParams main_part = dp;
  main_part.bits_mask = main_mask;
  PMKV_CUDA_CHECK(kernels::launch_decode(main_part, s()));
  for (int i = 0; i < sides; ++i) {
    cudaStream_t side = side_streams[i]->get();
    PMKV_CUDA_CHECK(cudaStreamWaitEvent(side, fork_event->get()));
    kernels::DecodeParams part = dp;
    part.bits_mask = side_masks[i];
    part.pdl = false;  // after an event wait: a plain launch
    PMKV_CUDA_CHECK(kernels::launch_decode(part, side));
    PMKV_CUDA_CHECK(cudaEventRecord(join_events[i]->get(), side));
  }
  for (int i = 0; i < sides; ++i) {
    PMKV_CUDA_CHECK(cudaStreamWaitEvent(s(), join_events[i]->get()));
  }
}

void CudaBackend::Impl::kv_ops(const StepArgs& a, int64_t l) {
  const kernels::KvPoolRef pool_ref{pool.as(), page_bytes, geometry};
  if (a.op_ranges != nullptr) {
    const int32_t* r = a.op_ranges + l * (1 + kGraphWaves) * 2;
    if (a.has_requant) {
      PMKV_CUDA_CHECK(kernels::launch_requant_ranged(pool_ref, a.requants, r, 2 * num_sms, s()));
    }
    for (int32_t w = 0; w < a.waves; ++w) {
      PMKV_CUDA_CHECK(
          kernels::launch_demote_ranged(pool_ref, a.demotes, r + 2 + 2 * w, num_sms, s()));
    }
    return;
  }
  const OpRun rq = (*a.requant_runs)[l];
  if (rq.count > 0) {
    PMKV_CUDA_CHECK(kernels::launch_requant(pool_ref, a.requants + rq.first, rq.count, s()));
  }
  for (const OpRun& wave : (*a.demote_runs)[l]) {
    if (wave.count == 0) continue;
    PMKV_CUDA_CHECK(kernels::launch_demote(pool_ref, a.demotes + wave.first, wave.count, s()));
  }
}

void CudaBackend::Impl::enqueue_forward(const StepArgs& a) {
  const int64_t L = cfg.num_layers, H = cfg.hidden_size, I = cfg.intermediate_size;
  const int64_t V = cfg.vocab_size, qw = cfg.q_width(), kvw = cfg.kv_width();
  const int64_t qkvw = qw + 2 * kvw, N = a.rows;
  const float scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  const int32_t window = static_cast<int32_t>(cfg.sliding_window.value_or(0));
  const kernels::KvPoolRef pool_ref{pool.as(), page_bytes, geometry};
  float* xp = x.as<float>();
  uint16_t* hp = h.as<uint16_t>();
  float* qkvp = qkv.as<float>();
  float* deltap = delta.as<float>();
  PMKV_CUDA_CHECK(kernels::launch_embedding(embed.as<uint16_t>(), static_cast<int32_t>(V), a.tok,
                                            static_cast<int32_t>(N), static_cast<int32_t>(H), xp,
                                            s()));
  const float eps = static_cast<float>(cfg.rms_norm_eps);
  // The layer's GEMMs' footprints (GemmRunner::layer_footprint).
  using Product = cuda::GemmRunner::LayerProduct;
  const cuda::GemmFootprint fp = gemm->layer_footprint(N, Product::kQkv);
  const cuda::GemmFootprint fp_o = gemm->layer_footprint(N, Product::kO);
  const cuda::GemmFootprint fp_gu = gemm->layer_footprint(N, Product::kGateUp);
  const cuda::GemmFootprint fp_down = gemm->layer_footprint(N, Product::kDown);
  // At one row the residual add + norm after the o and down projections is split (GemmRunner::
  // split_norm): those products add to x as their tiles complete, the products after them (gate/up,
  // the next qkv) normalize x in their prologues. Every product involved must take the bulk kernel.
  const bool split =
      gemm->split_norm(N, H, fp) &&  // one row only
      gate_up_layout == kernels::GateUpLayout::kInterleaved8 &&
      gemm->uses_bulk(hp, layers[0].wqkv.as(), qkvp, GemmOut::kF32, N, qkvw, H) &&
      gemm->uses_bulk(attn.as(), layers[0].wo.as(), deltap, GemmOut::kF32, N, H, qw) &&
      gemm->uses_bulk(hp, layers[0].w_gate_up.as(), act.as(), GemmOut::kBF16, N, 2 * I, H) &&
      gemm->uses_bulk(act.as(), layers[0].w_down.as(), deltap, GemmOut::kF32, N, H, I);
  const auto norm_of = [&](const DeviceMemory& weight) {
    return kernels::AddRmsNormParams{
        xp,      nullptr, nullptr, weight.as<float>(), eps, 1, static_cast<int32_t>(H),
        nullptr, nullptr};
  };
  mark(0);
  for (int64_t l = 0; l < L; ++l) {
    Layer& Ly = layers[l];
    // The attention norm; from layer 1 on, the previous layer's down projection did it together
    // with its residual add (run_add_norm below).
    if (l == 0) {
      PMKV_CUDA_CHECK(kernels::launch_add_rmsnorm(
          {xp, nullptr, nullptr, Ly.attn_norm.as<float>(), eps, static_cast<int32_t>(N),
           static_cast<int32_t>(H), nullptr, hp},
          s()));
    }
    if (split && l > 0) {  // the attention norm in the qkv GEMM's prologue
      const kernels::AddRmsNormParams nin = norm_of(Ly.attn_norm);
      gemm->run(hp, Ly.wqkv.as(), qkvp, GemmOut::kF32, N, qkvw, H, fp, &nin);
    } else {
      gemm->run(hp, Ly.wqkv.as(), qkvp, GemmOut::kF32, N, qkvw, H, fp);
    }
    kernels::RopeKvWriteParams rp{};
    rp.qkv = qkvp;
    rp.qkv_stride = qkvw;
    rp.bias = Ly.bqkv.as<float>();
    rp.rows = static_cast<int32_t>(N);
    rp.num_heads = static_cast<int32_t>(cfg.num_heads);
    rp.num_kv_heads = static_cast<int32_t>(cfg.num_kv_heads);
    rp.head_dim = static_cast<int32_t>(cfg.head_dim);
    rp.positions = a.pos;
    rp.inv_freq = inv_freq.as<float>();
    rp.q_out = q.as<float>();
    rp.pool = pool_ref;
    rp.page_ids = a.w_page + l * N;
    rp.bits = a.w_bits + l * N;
    rp.slots = a.w_slot + l * N;
    rp.pdl = attn_pdl;
    PMKV_CUDA_CHECK(kernels::launch_rope_kv_write(rp, s()));
    mark(1);
    if (a.decode) {
      kernels::DecodeParams dp{};
      dp.pool = pool.as();
      dp.page_bytes = page_bytes;
      dp.num_kv_heads = static_cast<int32_t>(cfg.num_kv_heads);
      dp.group = static_cast<int32_t>(cfg.group_size());
      dp.head_dim = static_cast<int32_t>(cfg.head_dim);
      dp.tokens16 = geometry.tokens16;
      dp.page_ids = a.page_ids;
      dp.page_tokens = a.page_tokens;
      dp.plan = a.fixed_layout
                    ? kernels::decode_layer_view(a.layout, a.decode_ws, static_cast<int>(l),
                                                 a.split_ctas, a.dense_mask)
                    : kernels::decode_layer_view(decode_plan, a.decode_ws, static_cast<int>(l));
      dp.q = q.as();
      dp.q_dtype = kernels::DType::kF32;
      dp.out = attn.as();
      dp.out_dtype = kernels::DType::kBF16;
      dp.scale = scale;
      dp.pdl = attn_pdl;
      launch_attention(dp);
    } else {
      kernels::PrefillParams pp{};
      pp.pool = pool.as();
      pp.page_bytes = page_bytes;
      pp.tokens16 = geometry.tokens16;
      pp.num_heads = static_cast<int32_t>(cfg.num_heads);
      pp.num_kv_heads = static_cast<int32_t>(cfg.num_kv_heads);
      pp.head_dim = static_cast<int32_t>(cfg.head_dim);
      pp.sliding_window = window;
      pp.scale = scale;
      pp.num_seqs = static_cast<int32_t>(a.num_seqs);
      pp.num_rows = static_cast<int32_t>(N);
      pp.max_rows_per_seq = a.max_rows;
      pp.total_cached = a.total_cached;
      pp.seq_starts = a.seq_starts;
      pp.seq_cached = a.seq_cached;
      pp.cached_starts = a.cached_starts;
      pp.page_starts = a.page_starts + l * a.num_seqs;
      pp.page_ids = a.page_ids;
      pp.page_bits = a.page_bits;
      pp.page_tokens = a.page_tokens;
      pp.q = q.as<float>();
      pp.q_stride = qw;
      pp.k = qkvp + qw;
      pp.v = qkvp + qw + kvw;
      pp.kv_stride = qkvw;
      pp.out = attn.as<uint16_t>();
      pp.workspace = prefill_ws.as();
      pp.workspace_bytes = static_cast<int64_t>(prefill_ws.bytes());
      PMKV_CUDA_CHECK(kernels::launch_prefill(pp, s()));
    }
    mark(3);
    // The layer's flushes and demotions, after its attention: the step reads the tables as they
    // were before them (KvCacheManager::attention_table); they rewrite pages it just read.
    kv_ops(a, l);
    mark(2);
    // o projection, its residual add and the MLP norm.
    const kernels::AddRmsNormParams mlp_in = norm_of(Ly.mlp_norm);
    if (split) {
      gemm->run_add(attn.as(), Ly.wo.as(), deltap, N, H, qw, xp, Ly.bo.as<float>(), fp_o);
    } else {
      gemm->run_add_norm(attn.as(), Ly.wo.as(), deltap, N, H, qw,
                         {xp, deltap, Ly.bo.as<float>(), Ly.mlp_norm.as<float>(), eps,
                          static_cast<int32_t>(N), static_cast<int32_t>(H), nullptr, hp},
                         fp_o);
    }
    // Decode at m <= 8 on sm_90: the SwiGLU in the GEMM's epilogue (one launch, no gu round
    // trip); otherwise the GEMM into gu, then the activation kernel.
    if (gate_up_layout != kernels::GateUpLayout::kInterleaved8 ||
        !gemm->run_gated(hp, Ly.w_gate_up.as(), act.as(), Ly.b_gate_up.as<float>(), N, 2 * I, H,
                         fp_gu, split ? &mlp_in : nullptr)) {
      gemm->run(hp, Ly.w_gate_up.as(), gu.as(), GemmOut::kBF16, N, 2 * I, H, fp_gu);
      PMKV_CUDA_CHECK(kernels::launch_silu_mul(gu.as<uint16_t>(), Ly.b_gate_up.as<float>(),
                                               static_cast<int32_t>(N), static_cast<int32_t>(I),
                                               act.as<uint16_t>(), s(), gate_up_layout));
    }
    if (l + 1 < L && split) {
      // Down projection and its residual add; the next qkv GEMM does the attention norm.
      gemm->run_add(act.as(), Ly.w_down.as(), deltap, N, H, I, xp, Ly.b_down.as<float>(), fp_down);
    } else if (l + 1 < L) {
      // Down projection, its residual add and the next layer's attention norm.
      gemm->run_add_norm(act.as(), Ly.w_down.as(), deltap, N, H, I,
                         {xp, deltap, Ly.b_down.as<float>(), layers[l + 1].attn_norm.as<float>(),
                          eps, static_cast<int32_t>(N), static_cast<int32_t>(H), nullptr, hp},
                         fp_down);
    } else {  // the last residual add comes with the final norm below
      gemm->run(act.as(), Ly.w_down.as(), deltap, GemmOut::kF32, N, H, I, fp_down);
    }
    mark(4);
  }
  const int64_t R = a.logit_rows;
  if (R > 0) {
    // The last MLP's residual add and the final norm, only for the rows whose logits are wanted.
    PMKV_CUDA_CHECK(kernels::launch_add_rmsnorm(
        {xp, deltap, layers.back().b_down.as<float>(), final_norm.as<float>(), eps,
         static_cast<int32_t>(R), static_cast<int32_t>(H), a.logit_row_ids, hf.as<uint16_t>()},
        s()));
    gemm->run(hf.as(), head_weights(), logits.as(), GemmOut::kF32, R, V, H);
  }
}

void CudaBackend::Impl::reserve_rows(int64_t rows) {
  if (rows <= rows_capacity) return;
  const bool growing = rows_capacity > 0;
  drop_graphs("activations grow");
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size;
  const int64_t qw = cfg.q_width(), qkvw = qw + 2 * cfg.kv_width();
  x.allocate(rows * H * 4);
  h.allocate(rows * H * 2);
  qkv.allocate(rows * qkvw * 4);
  q.allocate(rows * qw * 4);
  attn.allocate(rows * qw * 2);
  delta.allocate(rows * H * 4);
  gu.allocate(rows * 2 * I * 2);
  act.allocate(rows * I * 2);
  // Zeroed once: the padding rows of a graph step read rows no step wrote (finite values keep
  // every row of the GEMMs and norms clean).
  for (DeviceMemory* d : {&x, &h, &qkv, &q, &attn, &delta, &gu, &act})
    PMKV_CUDA_CHECK(cudaMemsetAsync(d->as(), 0, d->bytes(), s()));
  rows_capacity = rows;
  memory.activation_bytes =
      static_cast<int64_t>(x.bytes() + h.bytes() + qkv.bytes() + q.bytes() + attn.bytes() +
                           delta.bytes() + gu.bytes() + act.bytes());
  if (growing) {
    spdlog::info("cuda: activations grown to {} rows ({})", rows, mib(memory.activation_bytes));
  }
}

void CudaBackend::Impl::reserve_logits(int64_t rows) {
  if (rows <= logit_capacity) return;
  drop_graphs("logit rows grow");
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size;
  hf.allocate(rows * H * 2);
  logits.allocate(rows * V * 4);
  logits_host.reserve(static_cast<size_t>(rows * V * 4));
  logit_capacity = rows;
}

CudaBackend::CudaBackend(const ModelConfig& config, const WeightStore* weights,
                         kv::PageGeometry geometry, int32_t num_pages, CudaBackendOptions options)
    : impl_(std::make_unique<Impl>()), cfg_(config) {
  Impl& m = *impl_;
  if (device_count() <= options.device) {
    throw InvalidArgument("device cuda: no usable CUDA GPU " + std::to_string(options.device) +
                          " (" + std::to_string(device_count()) + " found); use --device cpu");
  }
  if (geometry.num_kv_heads != cfg_.num_kv_heads || geometry.head_dim != cfg_.head_dim) {
    throw InvalidArgument("CudaBackend: KV page geometry does not match the model");
  }
  static_assert(kernels::kDecodeMaxGroup == 8, "cuda_supports() says 8 query heads per KV head");
  if (std::string why; !cuda_supports(cfg_, &why)) {
    throw InvalidArgument("device cuda: this model has " + why + "; use --device cpu");
  }
  if (weights == nullptr && !options.dummy_weights) {
    throw InvalidArgument("CudaBackend: no weights given and dummy weights not asked for");
  }
  if (!options.key_scales.empty()) validate_key_scales(cfg_, options.key_scales);
  m.cfg = cfg_;
  if (cfg_.intermediate_size % 8 == 0) m.gate_up_layout = kernels::GateUpLayout::kInterleaved8;
  m.geometry = geometry;
  m.page_bytes = kv::page_bytes(geometry);
  m.num_pages = num_pages;
  m.options = std::move(options);
  // Graph inputs are laid out for the largest bucket: keep that bounded.
  m.options.graph_max_batch = std::clamp(m.options.graph_max_batch, 0, 512);
  PMKV_CUDA_CHECK(cudaSetDevice(m.options.device));
  cudaDeviceProp prop{};
  PMKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, m.options.device));
  m.num_sms = prop.multiProcessorCount;
  m.memory.device_name = prop.name;
  m.memory.device_total_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  m.stream = std::make_unique<cuda::Stream>();
  m.upload_stream = std::make_unique<cuda::Stream>();
  m.readback_stream = std::make_unique<cuda::Stream>();
  m.fork_event = std::make_unique<cuda::Event>();
  for (size_t i = 0; i < m.side_streams.size(); ++i) {
    m.side_streams[i] = std::make_unique<cuda::Stream>();
    m.join_events[i] = std::make_unique<cuda::Event>();
  }
  if (const char* v = std::getenv("PMKV_ATTN_FORK"); v != nullptr) {
    const std::string f = v;
    if (f == "0") m.attn_fork = Impl::AttnFork::kNone;
    if (f == "16") m.attn_fork = Impl::AttnFork::kSixteen;
  }
  if (const char* v = std::getenv("PMKV_DECODE_MIN_ITEM_KB"); v != nullptr) {
    m.decode_min_item_bytes = std::max<int64_t>(0, std::atoll(v)) * 1024;
  }
  if (const char* v = std::getenv("PMKV_DECODE_DENSE"); v != nullptr) {
    using Dense = kernels::DecodePlanConfig::Dense;
    const std::string d = v;
    if (d == "never") m.decode_dense = Dense::kNever;
    if (d == "always") m.decode_dense = Dense::kAlways;
  }
  if (const char* t = std::getenv("PMKV_CUDA_TIMING"); t != nullptr && std::string(t) == "1") {
    m.timer.enabled = true;
  }
  m.gemm = std::make_unique<cuda::GemmRunner>(m.stream->get());
  for (const char* name : {"PMKV_PDL", "PMKV_ATTN_PDL"}) {
    if (const char* v = std::getenv(name); v != nullptr && std::string(v) == "0") {
      m.attn_pdl = false;
    }
  }

  if (m.options.dummy_weights) {
    m.load_dummy();
  } else {
    m.load(*weights);
  }
  m.memory.weight_bytes = m.weight_bytes;
  const std::vector<float> inv = rope_inv_freq(cfg_);
  m.inv_freq.allocate(inv.size() * sizeof(float));
  PMKV_CUDA_CHECK(
      cudaMemcpy(m.inv_freq.as(), inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice));

  // One page past the pool's: the scratch page the padding rows of a graph step write to.
  m.pool.allocate(static_cast<size_t>(num_pages + 1) * static_cast<size_t>(m.page_bytes));
  // Pages are written before they are read; zeroing makes a stray read deterministic.
  PMKV_CUDA_CHECK(cudaMemsetAsync(m.pool.as(), 0, m.pool.bytes(), m.s()));
  m.memory.kv_pool_bytes = static_cast<int64_t>(m.pool.bytes());
  m.reserve_rows(std::max<int32_t>(1, m.options.max_step_tokens));
  m.reserve_logits(std::max<int32_t>(1, m.options.max_logit_rows));
  m.memory.workspace_bytes = int64_t{32} << 20;  // cuBLASLt
  PMKV_CUDA_CHECK(cudaStreamSynchronize(m.s()));
  size_t free_b = 0, total_b = 0;
  PMKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  spdlog::info(
      "cuda: {} ({} SMs, {}): weights {} (bf16{}), KV pool {} ({} pages), activations {} for {} "
      "rows, {} free",
      m.memory.device_name, m.num_sms, mib(m.memory.device_total_bytes), mib(m.weight_bytes),
      m.options.dummy_weights ? ", dummy" : "", mib(m.memory.kv_pool_bytes), num_pages,
      mib(m.memory.activation_bytes), m.rows_capacity, mib(static_cast<int64_t>(free_b)));
}

CudaBackend::~CudaBackend() {
  if (impl_ && impl_->stream) cudaStreamSynchronize(impl_->s());
  if (impl_ && impl_->upload_stream) cudaStreamSynchronize(impl_->upload_stream->get());
  if (impl_ && impl_->readback_stream) cudaStreamSynchronize(impl_->readback_stream->get());
}

int CudaBackend::device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

int64_t CudaBackend::weight_bytes() const {
  return impl_->weight_bytes;
}
int64_t CudaBackend::kv_pool_bytes() const {
  return impl_->memory.kv_pool_bytes;
}
const CudaMemoryPlan& CudaBackend::memory_plan() const {
  return impl_->memory;
}
const CudaGraphCounters& CudaBackend::graph_counters() const {
  return impl_->graph_counters;
}
double CudaBackend::last_prepare_seconds() const {
  return impl_->last_prepare_seconds;
}
double CudaBackend::device_wait_seconds() const {
  return impl_->device_wait_s;
}
void CudaBackend::synchronize() {
  impl_->wait_stream();
  PMKV_CUDA_CHECK(cudaStreamSynchronize(impl_->upload_stream->get()));
  PMKV_CUDA_CHECK(cudaStreamSynchronize(impl_->readback_stream->get()));
}

void CudaBackend::run_step(const StepBatch& b) {
  Impl& m = *impl_;
  const int64_t N = b.num_tokens(), S = b.num_seqs(), L = cfg_.num_layers;
  const int64_t V = cfg_.vocab_size;
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  if (!b.token_src.empty() && static_cast<int64_t>(b.token_src.size()) != N) {
    throw std::invalid_argument("CudaBackend: token_src must have one entry per row");
  }
  bool gather = false;  // some row's token comes from the previous step's sampling
  for (int64_t r = 0; r < N; ++r) {
    if (!b.token_src.empty() && b.token_src[r] >= 0) {
      gather = true;
      if (b.token_src[r] >= m.sampled_rows) {
        throw std::invalid_argument("CudaBackend: token_src " + std::to_string(b.token_src[r]) +
                                    " is not a row the previous step sampled");
      }
      continue;
    }
    const int32_t id = b.token_ids[r];
    if (id < 0 || id >= V)
      throw InvalidArgument("token id " + std::to_string(id) + " out of range");
  }
  for (int64_t i = 0; i < R; ++i) {
    if (b.logit_rows[i] < 0 || b.logit_rows[i] >= N) {
      throw std::invalid_argument("CudaBackend::forward: logit row out of range");
    }
  }
  // The engine thread may not be the thread that built the backend.
  PMKV_CUDA_CHECK(cudaSetDevice(m.options.device));
  // A graph step's input set (see Impl::in_flight).
  const int slot = m.next_slot;

  // -- Host side: flatten the step into arrays.
  std::vector<int32_t> cached_starts(S + 1, 0);
  int32_t max_rows = 0;
  for (int64_t s = 0; s < S; ++s) {
    cached_starts[s + 1] = cached_starts[s] + b.seq_cached[s];
    max_rows = std::max(max_rows, b.seq_starts[s + 1] - b.seq_starts[s]);
  }
  const auto t_prepare = std::chrono::steady_clock::now();
  const size_t P = b.pages.size();
  // Long contexts at large batches have ~10^5-10^6 pages per step: the page arrays and the decode
  // plan (per layer) are built on several host threads then.
  const bool many_pages = P > 65536;
  // KV ops of every layer: requants then each demotion wave, one contiguous run per (layer, list).
  std::vector<kv::RequantOp>& requants = m.h_requants;
  std::vector<kv::DemoteOp>& demotes = m.h_demotes;
  requants.clear();
  demotes.clear();
  std::vector<OpRun> requant_runs(L, {0, 0});
  std::vector<std::vector<OpRun>> demote_runs(L);
  size_t max_waves = 0;
  for (int64_t l = 0; l < L && !b.kv_ops.layers.empty(); ++l) {
    const kv::KvLayerOps& ops = b.kv_ops.layers[l];
    requant_runs[l] = {static_cast<int32_t>(requants.size()),
                       static_cast<int32_t>(ops.requant.size())};
    requants.insert(requants.end(), ops.requant.begin(), ops.requant.end());
    for (const auto& wave : ops.demote_waves) {
      demote_runs[l].push_back(
          {static_cast<int32_t>(demotes.size()), static_cast<int32_t>(wave.size())});
      demotes.insert(demotes.end(), wave.begin(), wave.end());
    }
    max_waves = std::max(max_waves, demote_runs[l].size());
  }

  // Decode steps (one row per sequence) use the split-KV decode kernel over the pages, planned
  // once for every layer; anything else the prefill kernel. A decode step of at most
  // graph_max_batch sequences whose demotions come in few enough waves runs as a CUDA graph of
  // its batch-size bucket: `rows` = the bucket, the rows past N are padding (token 0 at position
  // 0, K/V written to the scratch page, attention left out, logits not read).
  const bool decode = N > 0 && max_rows == 1 && N == S;
  const int64_t bucket = decode && max_waves <= Impl::kGraphWaves ? m.graph_bucket(S) : 0;
  const bool graph = bucket > 0;
  const int64_t rows = graph ? bucket : N;
  const int64_t logit_rows = graph ? bucket : R;
  m.reserve_rows(std::max<int64_t>(rows, 1));
  m.reserve_logits(std::max<int64_t>(logit_rows, 1));

  // The page arrays. A graph step writes page ids and token counts straight into the pinned
  // staging buffer of its fixed-layout inputs (they are most of a long-context step's bytes);
  // an eager step into host vectors that are packed below.
  auto& page_ids = m.h_page_ids;
  auto& page_bits = m.h_page_bits;
  auto& page_tokens = m.h_page_tokens;
  page_bits.resize(P);
  int32_t* ids_out = nullptr;
  int32_t* tokens_out = nullptr;
  if (graph) {
    m.reserve_graph_inputs(slot, static_cast<int32_t>(P), static_cast<int32_t>(requants.size()),
                           static_cast<int32_t>(demotes.size()));
    const Impl::GraphSet& set = m.graph_sets[slot];
    ids_out = reinterpret_cast<int32_t*>(set.staging.as<std::byte>() + set.gin.page_ids);
    tokens_out = reinterpret_cast<int32_t*>(set.staging.as<std::byte>() + set.gin.page_tokens);
  } else {
    page_ids.resize(P);
    page_tokens.resize(P);
    ids_out = page_ids.data();
    tokens_out = page_tokens.data();
  }
#pragma omp parallel for if (many_pages) num_threads(8)
  for (size_t i = 0; i < P; ++i) {
    ids_out[i] = b.pages[i].page;
    page_bits[i] = b.pages[i].bits;
    tokens_out[i] = b.pages[i].num_tokens;
  }

  // Per layer and row: the 16-bit slot the row's K/V goes to.
  auto& w_page = m.h_w_page;
  auto& w_bits = m.h_w_bits;
  auto& w_slot = m.h_w_slot;
  w_page.assign(L * rows, m.num_pages);
  w_bits.assign(L * rows, 16);
  w_slot.assign(L * rows, 0);
  if (N > 0) {
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t s = 0; s < S; ++s) {
        int32_t row = b.seq_starts[s];
        for (int32_t w = b.write_starts[l * S + s]; w < b.write_starts[l * S + s + 1]; ++w) {
          const kv::KvWrite& kw = b.writes[w];
          for (int32_t j = 0; j < kw.count; ++j, ++row) {
            w_page[l * rows + row] = kw.page;
            w_slot[l * rows + row] = kw.slot + j;
          }
        }
        if (row != b.seq_starts[s + 1]) {
          throw std::logic_error("CudaBackend: KV writes do not cover the rows of a sequence");
        }
      }
    }
  }
  if (decode) {
    std::vector<kernels::DecodeLayerTable> tables(L);
    for (int64_t l = 0; l < L; ++l) {
      tables[l] = {static_cast<int32_t>(S), b.page_starts.data() + l * S, page_bits.data(),
                   tokens_out};
    }
    kernels::DecodePlanConfig pc;
    pc.num_kv_heads = static_cast<int32_t>(cfg_.num_kv_heads);
    pc.group = static_cast<int32_t>(cfg_.group_size());
    pc.head_dim = static_cast<int32_t>(cfg_.head_dim);
    pc.tokens16 = m.geometry.tokens16;
    pc.sliding_window = static_cast<int32_t>(cfg_.sliding_window.value_or(0));
    pc.num_sms = m.num_sms;
    if (m.decode_min_item_bytes > 0) pc.min_item_bytes = m.decode_min_item_bytes;
    pc.dense = m.decode_dense;
    static const kernels::DecodeParallelFor omp_for = [](int n,
                                                         const std::function<void(int)>& body) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(8)
      for (int i = 0; i < n; ++i)
        body(i);
    };
    kernels::plan_decode(pc, tables, &m.decode_plan,
                         many_pages ? omp_for : kernels::DecodeParallelFor{});
  }

  StepArgs a;
  a.rows = rows;
  a.logit_rows = logit_rows;
  a.decode = decode;
  a.num_seqs = S;
  a.max_rows = max_rows;
  a.total_cached = cached_starts[S];
  int32_t* tok_dev = nullptr;        // the step's token ids on the device (token_src gather target)
  const int32_t* src_dev = nullptr;  // the step's token_src on the device
  if (graph) {
    m.upload_graph_inputs(slot, b, rows, w_page, w_bits, w_slot, requants, demotes, requant_runs,
                          demote_runs, &a);
    const Impl::GraphSet& set = m.graph_sets[slot];
    tok_dev = reinterpret_cast<int32_t*>(set.inputs.as<std::byte>() + set.gin.tok);
    src_dev = reinterpret_cast<const int32_t*>(set.inputs.as<std::byte>() + set.gin.src);
  } else {
    // A step in flight may not have read its inputs out of the eager staging buffers yet.
    if (m.uploads_recorded) m.wait_event(m.uploads_done.get());
    Packer& pk = m.packer;
    pk.clear();
    const size_t o_tok = pk.add(b.token_ids), o_pos = pk.add(b.positions);
    const size_t o_seq_starts = pk.add(b.seq_starts), o_seq_cached = pk.add(b.seq_cached);
    const size_t o_cached_starts = pk.add(cached_starts);
    const size_t o_page_starts = pk.add(b.page_starts);
    const size_t o_page_ids = pk.add(page_ids), o_page_bits = pk.add(page_bits);
    const size_t o_page_tokens = pk.add(page_tokens);
    const size_t o_w_page = pk.add(w_page), o_w_bits = pk.add(w_bits), o_w_slot = pk.add(w_slot);
    const size_t o_logit_rows = pk.add(b.logit_rows);
    const size_t o_requants = pk.add(requants), o_demotes = pk.add(demotes);
    const size_t in_bytes = pk.bytes().size();
    m.staging.reserve(in_bytes);
    m.inputs.reserve(in_bytes);
    // The previous step ended with a synchronize, so the staging buffer is free to overwrite.
    std::memcpy(m.staging.as(), pk.bytes().data(), in_bytes);
    m.begin_timing();
    PMKV_CUDA_CHECK(
        cudaMemcpyAsync(m.inputs.as(), m.staging.as(), in_bytes, cudaMemcpyHostToDevice, m.s()));
    auto dev = [&](size_t off) {
      return reinterpret_cast<const int32_t*>(m.inputs.as<std::byte>() + off);
    };
    a.tok = dev(o_tok);
    tok_dev = reinterpret_cast<int32_t*>(m.inputs.as<std::byte>() + o_tok);
    a.pos = dev(o_pos);
    a.seq_starts = dev(o_seq_starts);
    a.seq_cached = dev(o_seq_cached);
    a.cached_starts = dev(o_cached_starts);
    a.page_starts = dev(o_page_starts);
    a.page_ids = dev(o_page_ids);
    a.page_bits = dev(o_page_bits);
    a.page_tokens = dev(o_page_tokens);
    a.w_page = dev(o_w_page);
    a.w_bits = dev(o_w_bits);
    a.w_slot = dev(o_w_slot);
    a.logit_row_ids = dev(o_logit_rows);
    a.requants =
        reinterpret_cast<const kernels::KvRequantOp*>(m.inputs.as<std::byte>() + o_requants);
    a.demotes = reinterpret_cast<const kernels::KvDemoteOp*>(m.inputs.as<std::byte>() + o_demotes);
    a.requant_runs = &requant_runs;
    a.demote_runs = &demote_runs;
    if (decode) {
      // The plan's tables go through pinned memory (a pageable copy would sync the stream).
      const kernels::DecodeWorkspaceLayout layout = kernels::decode_workspace_layout(m.decode_plan);
      m.decode_ws.reserve(static_cast<size_t>(layout.total_bytes));
      m.plan_staging.reserve(std::max<int64_t>(layout.tables_bytes, 1));
      kernels::pack_decode_plan(m.decode_plan, layout, m.plan_staging.as());
      if (layout.tables_bytes > 0) {
        PMKV_CUDA_CHECK(cudaMemcpyAsync(m.decode_ws.as(), m.plan_staging.as(),
                                        static_cast<size_t>(layout.tables_bytes),
                                        cudaMemcpyHostToDevice, m.s()));
      }
      a.decode_ws = m.decode_ws.as();
    } else if (N > 0) {
      m.prefill_ws.reserve(static_cast<size_t>(std::max<int64_t>(
          1, kernels::prefill_workspace_bytes(cached_starts[S], static_cast<int32_t>(N),
                                              static_cast<int32_t>(cfg_.num_kv_heads),
                                              static_cast<int32_t>(cfg_.head_dim)))));
    }
  }

  m.step_tokens = tok_dev;
  if (gather && N > 0) {
    // Rows whose token the previous step sampled on the device: copied in before the layers (a
    // graph step's token_src came with its inputs).
    if (!graph) {
      m.src_staging.reserve(static_cast<size_t>(N) * 4);
      m.src_dev.reserve(static_cast<size_t>(N) * 4);
      std::memcpy(m.src_staging.as(), b.token_src.data(), static_cast<size_t>(N) * 4);
      PMKV_CUDA_CHECK(cudaMemcpyAsync(m.src_dev.as(), m.src_staging.as(),
                                      static_cast<size_t>(N) * 4, cudaMemcpyHostToDevice, m.s()));
      src_dev = m.src_dev.as<int32_t>();
    }
    PMKV_CUDA_CHECK(kernels::launch_gather_sampled(tok_dev, src_dev, m.sampled.as<int32_t>(),
                                                   static_cast<int32_t>(N), m.s()));
  }
  if (!graph) {
    PMKV_CUDA_CHECK(cudaEventRecord(m.uploads_done.get(), m.s()));
    m.uploads_recorded = true;
  }
  m.last_prepare_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_prepare).count();
  if (N == 0) {  // a demotion-only step (the scheduler's overcommit path)
    for (int64_t l = 0; l < L; ++l)
      m.kv_ops(a, l);
    return;
  }
  if (!graph) {
    m.enqueue_forward(a);
    return;
  }
  // The graph of this shape: replayed when captured; captured on its second use (the first runs
  // the same launches eagerly, which also does every lazy set-up: cuBLASLt heuristics, kernel
  // attributes).
  const uint64_t key = m.graph_key(a, slot);
  if (auto it = m.graphs.find(key); it != m.graphs.end()) {
    ++m.graph_counters.replays;
    PMKV_CUDA_CHECK(cudaGraphLaunch(it->second.get(), m.s()));
    return;
  }
  if (!m.graph_seen.insert(key).second) {
    if (m.graphs.size() >= Impl::kMaxGraphs) m.drop_graphs("the graph cache is full");
    cudaGraph_t g = nullptr;
    PMKV_CUDA_CHECK(cudaStreamBeginCapture(m.s(), cudaStreamCaptureModeThreadLocal));
    try {
      m.enqueue_forward(a);
    } catch (...) {
      cudaStreamEndCapture(m.s(), &g);
      if (g != nullptr) cudaGraphDestroy(g);
      throw;
    }
    PMKV_CUDA_CHECK(cudaStreamEndCapture(m.s(), &g));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    PMKV_CUDA_CHECK(e);
    auto& slot = m.graphs[key];
    slot.reset(exec);
    ++m.graph_counters.captures;
    spdlog::debug("cuda: captured the decode graph of batch bucket {} (key {:#x})", bucket, key);
    ++m.graph_counters.replays;
    PMKV_CUDA_CHECK(cudaGraphLaunch(exec, m.s()));
    return;
  }
  ++m.graph_counters.eager_warmups;
  m.enqueue_forward(a);
}

void CudaBackend::forward(const StepBatch& b, std::span<float> logits_out) {
  Impl& m = *impl_;
  const int64_t R = static_cast<int64_t>(b.logit_rows.size()), V = cfg_.vocab_size;
  if (static_cast<int64_t>(logits_out.size()) != R * V) {
    throw std::invalid_argument("CudaBackend::forward: logits buffer has the wrong size");
  }
  if (!m.in_flight.empty()) throw std::logic_error("CudaBackend::forward: steps in flight");
  run_step(b);
  m.sampled_rows = 0;  // this step's tokens are sampled by the caller
  if (R > 0) {
    PMKV_CUDA_CHECK(cudaMemcpyAsync(m.logits_host.as(), m.logits.as(),
                                    static_cast<size_t>(R * V) * sizeof(float),
                                    cudaMemcpyDeviceToHost, m.s()));
  }
  m.mark(5);
  m.wait_stream();
  m.end_timing();
  if (R > 0) {
    std::memcpy(logits_out.data(), m.logits_host.as(), static_cast<size_t>(R * V) * sizeof(float));
  }
}

void CudaBackend::forward_sample(const StepBatch& b, std::span<const DeviceSampling> rows,
                                 std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs) {
  if (!impl_->in_flight.empty()) {
    throw std::logic_error("CudaBackend::forward_sample: steps in flight (wait_sampled first)");
  }
  if (tokens.size() != rows.size() || (!logprobs.empty() && logprobs.size() != rows.size())) {
    throw std::invalid_argument("CudaBackend::forward_sample: one token per sampling row");
  }
  launch_sample(b, rows);
  wait_sampled(tokens, logprobs);
}

void CudaBackend::launch_sample(const StepBatch& b, std::span<const DeviceSampling> rows) {
  Impl& m = *impl_;
  const int64_t R = static_cast<int64_t>(b.logit_rows.size()), V = cfg_.vocab_size;
  if (static_cast<int64_t>(rows.size()) != R) {
    throw std::invalid_argument("CudaBackend::launch_sample: one sampling row per logit row");
  }
  if (m.in_flight.size() >= 2) {
    throw std::logic_error("CudaBackend::launch_sample: two steps in flight already");
  }
  // Sampling inputs first: validates before any launch.
  std::vector<kernels::SamplingRow> params(R);
  std::vector<int32_t> hist_last(R, -1);
  PenaltyHistory& hist = m.penalty_history;
  hist.reset(static_cast<int32_t>(V));
  bool any_penalty = false, any_last = false;
  std::vector<int32_t> want_logprobs;
  for (int64_t r = 0; r < R; ++r) {
    const DeviceSampling& d = rows[r];
    if (d.params == nullptr) throw std::invalid_argument("forward_sample: row without params");
    if (d.logprobs > kMaxDeviceLogprobs) {
      throw std::invalid_argument("launch_sample: more than " + std::to_string(kMaxDeviceLogprobs) +
                                  " logprobs");
    }
    const SamplingParams& p = *d.params;
    kernels::SamplingRow& k = params[r];
    k = {};
    k.temperature = p.temperature;
    k.top_k = p.top_k;
    k.top_p = p.top_p;
    k.min_p = p.min_p;
    k.repetition_penalty = p.repetition_penalty;
    k.presence_penalty = p.presence_penalty;
    k.frequency_penalty = p.frequency_penalty;
    k.logprobs = -1;
    k.logprob_slot = -1;
    k.seed = d.seed;
    k.offset = d.sampled;
    if (d.logprobs >= 0) {
      if (want_logprobs.empty()) want_logprobs.assign(R, -1);
      want_logprobs[r] = d.logprobs;
      k.logprobs = d.logprobs;
    }
    const bool rep = p.repetition_penalty != 1.0f;
    const bool out_pen = rep || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    hist.add_row(out_pen ? d.output_ids : std::span<const int32_t>{},
                 rep ? d.prompt_ids : std::span<const int32_t>{});
    if (d.last_token_row >= 0) {
      if (d.last_token_row >= b.num_tokens()) {
        throw std::invalid_argument("launch_sample: last_token_row is not a row of the step");
      }
      hist_last[r] = d.last_token_row;
      any_last = any_last || out_pen;
    }
    any_penalty = any_penalty || out_pen;
  }
  // Rows whose logits the kernel rewrites keep a raw copy for their log-probabilities.
  int32_t logprob_copies = 0;
  for (kernels::SamplingRow& k : params) {
    if (k.logprobs >= 0 && kernels::sampling_rewrites_row(k, any_penalty)) {
      k.logprob_slot = logprob_copies++;
    }
  }
  Impl::InFlight f;
  f.slot = m.next_slot;
  f.rows = static_cast<int32_t>(R);
  cuda::PinnedMemory& staging = m.sample_staging[f.slot];
  DeviceMemory& inputs = m.sample_inputs[f.slot];
  Packer pk;
  size_t o_params = 0, o_starts = 0, o_ids = 0, o_counts = 0, o_prompt = 0, o_last = 0;
  size_t bytes = 0;  // the packed sampling inputs; the tokens come back after them
  const size_t lp_bytes =
      want_logprobs.empty() ? 0 : static_cast<size_t>(R) * (1 + 2 * kMaxDeviceLogprobs) * 4;
  if (R > 0) {
    // The sampling inputs go out first, on the upload stream, and arrive while the layers run.
    // This slot's previous step was waited for (at most two in flight), so its buffers are free.
    o_params = pk.add(params);
    o_starts = pk.add(hist.starts());
    o_ids = pk.add(hist.ids());
    o_counts = pk.add(hist.output_counts());
    o_prompt = pk.add(hist.in_prompt());
    o_last = pk.add(hist_last);
    bytes = pk.bytes().size();
    staging.reserve(bytes + static_cast<size_t>(R) * 4 + lp_bytes);
    inputs.reserve(bytes);
    std::memcpy(staging.as(), pk.bytes().data(), bytes);
    cudaStream_t up = m.upload_stream->get();
    PMKV_CUDA_CHECK(cudaMemcpyAsync(inputs.as(), staging.as(), bytes, cudaMemcpyHostToDevice, up));
    PMKV_CUDA_CHECK(cudaEventRecord(m.sample_uploaded[f.slot].get(), up));
  }
  run_step(b);
  if (R > 0) {
    if (R > m.sampled_capacity) {
      // Grows keeping this step's tokens (already gathered from by run_step's launches).
      m.sampled_capacity = static_cast<int32_t>(std::max<int64_t>(R, 2 * m.sampled_capacity));
      m.sampled.allocate(static_cast<size_t>(m.sampled_capacity) * 4);
    }
    std::byte* base = inputs.as<std::byte>();
    kernels::SamplingLaunch sl;
    sl.logits = m.logits.as<float>();
    sl.rows = static_cast<int32_t>(R);
    sl.vocab = static_cast<int32_t>(V);
    sl.params = reinterpret_cast<const kernels::SamplingRow*>(base + o_params);
    if (any_penalty) {
      sl.hist_starts = reinterpret_cast<const int32_t*>(base + o_starts);
      sl.hist_ids = reinterpret_cast<const int32_t*>(base + o_ids);
      sl.hist_output_counts = reinterpret_cast<const int32_t*>(base + o_counts);
      sl.hist_in_prompt = reinterpret_cast<const uint8_t*>(base + o_prompt);
      if (any_last) {
        sl.hist_last_row = reinterpret_cast<const int32_t*>(base + o_last);
        sl.tokens = m.step_tokens;
      }
    }
    sl.out_tokens = m.sampled.as<int32_t>();
    static_assert(kMaxDeviceLogprobs == kernels::kMaxSamplingLogprobs);
    if (lp_bytes > 0) {
      m.sample_logprobs.reserve(lp_bytes);
      float* lp = m.sample_logprobs.as<float>();
      sl.out_logprob = lp;
      sl.out_top_ids = reinterpret_cast<int32_t*>(lp + R);
      sl.out_top_logprobs = lp + R + R * kMaxDeviceLogprobs;
      sl.logprob_copies = logprob_copies;
    }
    const int64_t ws = kernels::sampling_workspace_bytes(sl.rows, sl.vocab, logprob_copies);
    m.sample_ws.reserve(static_cast<size_t>(std::max<int64_t>(ws, 1)));
    sl.workspace = m.sample_ws.as();
    sl.workspace_bytes = static_cast<int64_t>(m.sample_ws.bytes());
    // The inputs are on the device, and the previous step's tokens (and log-probabilities)
    // were read back before this sampling overwrites them.
    PMKV_CUDA_CHECK(cudaStreamWaitEvent(m.s(), m.sample_uploaded[f.slot].get()));
    PMKV_CUDA_CHECK(cudaStreamWaitEvent(m.s(), m.sampled_event[f.slot ^ 1].get()));
    PMKV_CUDA_CHECK(kernels::launch_sampling(sl, m.s()));
    f.out_offset = bytes;
  }
  m.sampled_rows = static_cast<int32_t>(R);
  m.mark(5);
  // The tokens come back on the readback stream, so that the next step's layers need not wait
  // for the copy.
  cudaStream_t rb = m.readback_stream->get();
  PMKV_CUDA_CHECK(cudaEventRecord(m.sampling_done.get(), m.s()));
  PMKV_CUDA_CHECK(cudaStreamWaitEvent(rb, m.sampling_done.get()));
  if (R > 0) {
    PMKV_CUDA_CHECK(cudaMemcpyAsync(staging.as<std::byte>() + f.out_offset, m.sampled.as<int32_t>(),
                                    static_cast<size_t>(R) * 4, cudaMemcpyDeviceToHost, rb));
    if (lp_bytes > 0) {
      PMKV_CUDA_CHECK(
          cudaMemcpyAsync(staging.as<std::byte>() + f.out_offset + static_cast<size_t>(R) * 4,
                          m.sample_logprobs.as(), lp_bytes, cudaMemcpyDeviceToHost, rb));
      f.logprobs = std::move(want_logprobs);
    }
  }
  PMKV_CUDA_CHECK(cudaEventRecord(m.sampled_event[f.slot].get(), rb));
  m.in_flight.push_back(f);
  m.next_slot ^= 1;
  if (m.timer.enabled) {
    // The phase timer reads one step's events at a time.
    PMKV_CUDA_CHECK(cudaStreamSynchronize(rb));
    m.end_timing();
  }
}

void CudaBackend::wait_sampled(std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs) {
  Impl& m = *impl_;
  if (m.in_flight.empty()) throw std::logic_error("CudaBackend::wait_sampled: no step in flight");
  const Impl::InFlight f = m.in_flight.front();
  if (static_cast<int64_t>(tokens.size()) != f.rows ||
      (!logprobs.empty() && static_cast<int64_t>(logprobs.size()) != f.rows)) {
    throw std::invalid_argument("CudaBackend::wait_sampled: the step sampled " +
                                std::to_string(f.rows) + " rows, the caller expects " +
                                std::to_string(tokens.size()));
  }
  m.in_flight.pop_front();
  m.wait_event(m.sampled_event[f.slot].get());
  const std::byte* out = m.sample_staging[f.slot].as<std::byte>() + f.out_offset;
  if (f.rows > 0) std::memcpy(tokens.data(), out, static_cast<size_t>(f.rows) * 4);
  const size_t R = static_cast<size_t>(f.rows);
  for (size_t r = 0; r < logprobs.size(); ++r) {
    TokenLogprobs& t = logprobs[r];
    t = {};
    const int32_t n = f.logprobs.empty() ? -1 : f.logprobs[r];
    if (n < 0) continue;
    auto at = [&](size_t i, auto v) {
      std::memcpy(&v, out + (R + i) * 4, 4);
      return v;
    };
    t.logprob = at(r, 0.0f);
    for (int32_t j = 0; j < n; ++j) {
      const size_t e = r * kMaxDeviceLogprobs + static_cast<size_t>(j);
      t.top.emplace_back(at(R + e, int32_t{0}), at(R + R * kMaxDeviceLogprobs + e, 0.0f));
    }
  }
}

void CudaBackend::drop_in_flight() noexcept {
  Impl& m = *impl_;
  cudaStreamSynchronize(m.s());
  cudaStreamSynchronize(m.upload_stream->get());
  cudaStreamSynchronize(m.readback_stream->get());
  m.in_flight.clear();
  m.sampled_rows = 0;
}

}  // namespace pmkv
