// ktrace: a CUDA injection library that logs every kernel's GPU start and end, kernels launched
// from CUDA graphs included, through CUPTI's concurrent-kernel activity records. The device
// machine has no Nsight Systems; this gives the in-graph timeline of a decode step (which kernel
// waits on which) at the cost of a few percent of speed. Not part of pmkv's build.
//
// Build (here; CUPTI ships with the CUDA 13 toolkit):
//   g++ -O2 -shared -fPIC -o libktrace.so tools/ktrace/ktrace.cpp -I/usr/local/cuda/include \
//       -L/usr/local/cuda/lib64 -lcupti -Wl,-rpath,'$ORIGIN'
// and carry libktrace.so with libcupti.so.13 beside it. Run:
//   CUDA_INJECTION64_PATH=$PWD/libktrace.so KTRACE_OUT=trace.csv bench_cuda_backend ...
// Output: one line per kernel, "start_ns,end_ns,graph_node_id,mangled_name" (unsorted), and with
// KTRACE_MEMCPY set one per memory copy, "start_ns,end_ns,graph_node_id,memcpy_<kind>_<bytes>";
// tools/ktrace/layers.py summarizes a batch-1 decode trace layer by layer.
#include <cupti.h>

#include <cstdio>
#include <cstdlib>

namespace {

FILE* g_out = nullptr;

void CUPTIAPI requested(uint8_t** buf, size_t* size, size_t* max_records) {
  *size = size_t{16} << 20;
  *buf = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI completed(CUcontext, uint32_t, uint8_t* buf, size_t, size_t valid) {
  CUpti_Activity* r = nullptr;
  while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
    if (g_out == nullptr) continue;
    if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {  // "memcpy_<copy kind>_<bytes>" (1: HtoD, 2: DtoH)
      const auto* c = reinterpret_cast<const CUpti_ActivityMemcpy6*>(r);
      std::fprintf(g_out, "%llu,%llu,%llu,memcpy_%u_%llu\n", static_cast<unsigned long long>(c->start),
                   static_cast<unsigned long long>(c->end),
                   static_cast<unsigned long long>(c->graphNodeId), unsigned{c->copyKind},
                   static_cast<unsigned long long>(c->bytes));
      continue;
    }
    if (r->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(r);
    std::fprintf(g_out, "%llu,%llu,%llu,%s\n", static_cast<unsigned long long>(k->start),
                 static_cast<unsigned long long>(k->end),
                 static_cast<unsigned long long>(k->graphNodeId), k->name);
  }
  std::free(buf);
}

void finish() {
  cuptiActivityFlushAll(1);
  if (g_out != nullptr) std::fclose(g_out);
  g_out = nullptr;
}

}  // namespace

extern "C" int InitializeInjection(void) {
  const char* path = std::getenv("KTRACE_OUT");
  g_out = std::fopen(path != nullptr ? path : "ktrace.csv", "w");
  if (g_out == nullptr) return 0;
  cuptiActivityRegisterCallbacks(requested, completed);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  if (std::getenv("KTRACE_MEMCPY") != nullptr) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  std::atexit(finish);
  return 1;
}
