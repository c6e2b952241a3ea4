// What a kernel boundary costs on the critical path of a decode step, and whether a flag in
// global memory releases the next kernel sooner than griddepcontrol.wait does.
//
// A CUDA graph of --kernels launches of one small kernel (G CTAs of 128 threads), each reading the
// previous one's output and writing its own, with `--work-ns` of spinning after its wait (the
// kernel's own critical-path work). Modes:
//   plain: ordinary launches (stream order).
//   pdl:   programmatic dependent launch; every CTA calls griddepcontrol.launch_dependents at its
//          start and griddepcontrol.wait before it reads (what pmkv's kernels do, kernels/pdl.cuh).
//   flag:  programmatic dependent launch; instead of griddepcontrol.wait, thread 0 of each CTA
//          polls a counter (ld.acquire.gpu) until all G CTAs of the kernel before have counted
//          themselves in (bar.sync; fence.acq_rel.gpu; atomicAdd: the cooperative-groups grid
//          barrier's publication pattern).
// Reports, per mode: the graph's time per kernel (events over the replays), and from %globaltimer
// stamps the release gap: first CTA of kernel i past its wait minus last CTA of kernel i - 1 done
// (median over kernels), and the span from that last CTA done to kernel i's last CTA done.
//
// usage: bench_pdl_boundary [--kernels N] [--ctas G] [--work-ns W] [--replays R]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"

namespace {

enum Mode { kPlain = 0, kPdl = 1, kFlag = 2 };
constexpr int kThreads = 128;

struct Args {
  const float* in;
  float* out;
  unsigned* wait_count;        // flag mode: counted in by the kernel before (null for the first)
  unsigned* signal_count;      // flag mode: this kernel's CTAs count themselves in here
  unsigned long long* stamps;  // [G][2]: past the wait, done
  int mode;
  int work_ns;
};

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__global__ void __launch_bounds__(kThreads) step_kernel(Args a) {
  if (a.mode != kPlain) asm volatile("griddepcontrol.launch_dependents;\n" :::);
  if (a.mode == kPdl) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  if (a.mode == kFlag && a.wait_count != nullptr) {
    if (threadIdx.x == 0) {
      unsigned v = 0;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                     : "=r"(v)
                     : "l"(a.wait_count)
                     : "memory");
      } while (v < gridDim.x);
    }
    __syncthreads();
  }
  const unsigned long long t0 = now_ns();
  const int i = blockIdx.x * kThreads + threadIdx.x;
  float v = a.in[i] + 1.0f;
  if (threadIdx.x == 0)
    while (now_ns() < t0 + static_cast<unsigned long long>(a.work_ns)) {
    }
  __syncthreads();
  a.out[i] = v;
  if (a.mode == kFlag) {
    __syncthreads();
    if (threadIdx.x == 0) {
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
      atomicAdd(a.signal_count, 1u);
    }
  }
  if (threadIdx.x == 0) {
    a.stamps[2 * blockIdx.x] = t0;
    a.stamps[2 * blockIdx.x + 1] = now_ns();
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int kernels = 256, ctas = 0, work_ns = 0, replays = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--kernels")
      kernels = v;
    else if (k == "--ctas")
      ctas = v;
    else if (k == "--work-ns")
      work_ns = v;
    else if (k == "--replays")
      replays = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  if (ctas <= 0) ctas = prop.multiProcessorCount;
  const size_t n = static_cast<size_t>(ctas) * kThreads;
  float* buf[2];
  for (auto& b : buf) {
    CK(cudaMalloc(&b, n * sizeof(float)));
    CK(cudaMemset(b, 0, n * sizeof(float)));
  }
  unsigned* counts;
  CK(cudaMalloc(&counts, kernels * sizeof(unsigned)));
  unsigned long long* stamps;
  const size_t stamp_count = static_cast<size_t>(kernels) * ctas * 2;
  CK(cudaMalloc(&stamps, stamp_count * sizeof(unsigned long long)));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::printf("%s, %d SMs: %d kernels of %d CTAs, %d ns of work each, %d replays\n", prop.name,
              prop.multiProcessorCount, kernels, ctas, work_ns, replays);

  for (int mode : {kPlain, kPdl, kFlag}) {
    cudaGraph_t graph;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CK(cudaMemsetAsync(counts, 0, kernels * sizeof(unsigned), s));
    for (int k = 0; k < kernels; ++k) {
      Args a{buf[k % 2],
             buf[(k + 1) % 2],
             k > 0 ? counts + k - 1 : nullptr,
             counts + k,
             stamps + static_cast<size_t>(k) * ctas * 2,
             mode,
             work_ns};
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(ctas);
      cfg.blockDim = dim3(kThreads);
      cfg.stream = s;
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr.val.programmaticStreamSerializationAllowed = 1;
      if (mode != kPlain && k > 0) {
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
      }
      CK(cudaLaunchKernelEx(&cfg, step_kernel, a));
    }
    CK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, graph, 0));
    for (int w = 0; w < 3; ++w)
      CK(cudaGraphLaunch(exec, s));
    CK(cudaStreamSynchronize(s));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<double> per_kernel;
    for (int r = 0; r < replays; ++r) {
      CK(cudaEventRecord(e0, s));
      CK(cudaGraphLaunch(exec, s));
      CK(cudaEventRecord(e1, s));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      per_kernel.push_back(1e3 * ms / kernels);
    }
    // The last replay's stamps.
    std::vector<unsigned long long> st(stamp_count);
    CK(cudaMemcpy(st.data(), stamps, stamp_count * sizeof(unsigned long long),
                  cudaMemcpyDeviceToHost));
    // The data chain must have run: every element went through `kernels` increments per replay.
    std::vector<float> out(n);
    CK(cudaMemcpy(out.data(), buf[kernels % 2], n * sizeof(float), cudaMemcpyDeviceToHost));
    std::vector<double> gap, span;
    for (int k = 1; k < kernels; ++k) {
      unsigned long long prev_done = 0, first_past = ~0ull, last_done = 0;
      for (int c = 0; c < ctas; ++c) {
        prev_done = std::max(prev_done, st[(static_cast<size_t>(k - 1) * ctas + c) * 2 + 1]);
        first_past = std::min(first_past, st[(static_cast<size_t>(k) * ctas + c) * 2]);
        last_done = std::max(last_done, st[(static_cast<size_t>(k) * ctas + c) * 2 + 1]);
      }
      gap.push_back((static_cast<double>(first_past) - static_cast<double>(prev_done)) / 1e3);
      span.push_back((static_cast<double>(last_done) - static_cast<double>(prev_done)) / 1e3);
    }
    const char* names[] = {"plain", "pdl", "flag"};
    std::printf(
        "%-5s: %.3f us a kernel (median of replays, min %.3f); release gap %.3f us, last done "
        "to last done %.3f us (medians over kernels); out[0] = %.0f\n",
        names[mode], median(per_kernel), *std::min_element(per_kernel.begin(), per_kernel.end()),
        median(gap), median(span), out[0]);
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
  }
  return 0;
}
