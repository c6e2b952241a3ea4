// The decoder's small kernels and the KV pool's byte kernels against their byte floors: embedding
// gather, residual add + RMSNorm, SiLU-mul, bias + RoPE + KV write (kernels/model/layer_ops.h),
// the window flush (launch_requant) and the page demotion (launch_demote, kernels/kv/kv_ops.h).
//
// Each case is timed as a CUDA graph of --launches back-to-back launches (the fastest of 5
// replays), its inputs rotating over enough copies that a launch reads from DRAM, not from the L2
// the launch before filled (>= 3x the L2 a rotation, at most 64 copies). Floors, both in us a
// launch: `byte_floor_us` = the bytes the kernel must read and write / the device's copy bandwidth
// (a device-to-device cudaMemcpyAsync, read + write counted), and `launch_floor_us` = an empty
// kernel's launch in the same kind of graph. A small case cannot beat the launch floor; a large
// one should approach the byte floor.
//
// Shapes default to Llama-3-8B (hidden 4096, intermediate 14336, 32 / 8 heads of 128) and the
// default KV geometry (32-token 16-bit pages). Rows: decode batches (1, 16, 64) and a 4096-token
// prefill chunk. KV ops: --ops flushes of one 16-bit page (32 tokens) into a b-bit page, and --ops
// demotions of two b-bit pages into one b/2-bit page, for b in 16, 8, 4 (2 for the flush).
//
// usage: bench_layer_ops [--rows 1,16,64,4096] [--ops 64,1024] [--launches 50] [--out FILE]
// Prints a table on stderr; --out writes one JSON object a case (device, commit from $COMMIT).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/kv/kv_ops.h"
#include "kernels/kv_page_layout.h"
#include "kernels/model/layer_ops.h"

namespace {

namespace kk = pmkv::kernels;
namespace kv = pmkv::kv;

__global__ void empty_kernel() {}

// Device buffers of one case, freed with it.
struct Buffers {
  std::vector<void*> ptrs;
  template <class T>
  T* alloc(int64_t count) {
    void* p = nullptr;
    CK(cudaMalloc(&p, static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T)));
    ptrs.push_back(p);
    return static_cast<T*>(p);
  }
  template <class T>
  T* upload(const std::vector<T>& v) {
    T* p = alloc<T>(static_cast<int64_t>(v.size()));
    CK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
  }
  float* random_f32(int64_t n, uint32_t seed) {
    float* p = alloc<float>(n);
    pmkv::bench::fill_f32<<<1024, 256>>>(p, n, seed);
    CK(cudaGetLastError());
    return p;
  }
  uint16_t* random_bf16(int64_t n, uint32_t seed) {
    uint16_t* p = alloc<uint16_t>(n);
    pmkv::bench::fill_bf16<<<1024, 256>>>(p, n, seed);
    CK(cudaGetLastError());
    return p;
  }
  ~Buffers() {
    for (void* p : ptrs)
      cudaFree(p);
  }
};

struct Result {
  std::string kernel, shape;
  int64_t rows = 0, bytes = 0;
  double us = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> rows_list = {1, 16, 64, 4096}, ops_list = {64, 1024};
  int launches = 50;
  std::string out_path;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--rows") {
      rows_list = pmkv::bench::parse_list(v);
    } else if (a == "--ops") {
      ops_list = pmkv::bench::parse_list(v);
    } else if (a == "--launches") {
      launches = std::stoi(v);
    } else if (a == "--out") {
      out_path = v;
    } else {
      std::fprintf(stderr,
                   "usage: bench_layer_ops [--rows 1,16,64,4096] [--ops 64,1024] [--launches 50] "
                   "[--out FILE]\n");
      return 2;
    }
  }
  if ((argc - 1) % 2 != 0 || launches < 1) {
    std::fprintf(stderr, "options take one value each; --launches >= 1\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  // A graph of `launches` calls of enqueue(j) (j = 0, 1, ...), the fastest of 5 replays, in us a
  // launch.
  const auto graph_us = [&](const std::function<void(int)>& enqueue) {
    const double ms = pmkv::bench::best_graph_ms(
        s,
        [&] {
          for (int j = 0; j < launches; ++j)
            enqueue(j);
        },
        1);
    return 1e3 * ms / launches;
  };
  // Copies of a case's inputs so that a rotation reads >= 3 L2s, at most 64.
  const auto copies_for = [&](int64_t bytes) {
    const int64_t want = (3 * int64_t{prop.l2CacheSize} + bytes - 1) / std::max<int64_t>(bytes, 1);
    return static_cast<int>(std::clamp<int64_t>(want, 1, 64));
  };

  // The device's copy bandwidth (read + write counted, as bench_decode_attention's) and an
  // empty launch.
  const double copy_gbps = pmkv::bench::copy_bandwidth_gbps();
  const double launch_us = graph_us([&](int) { empty_kernel<<<1, 32, 0, s>>>(); });
  std::fprintf(stderr, "device %s, copy bandwidth %.0f GB/s (read + write), empty launch %.2f us\n",
               prop.name, copy_gbps, launch_us);

  const int64_t hidden = 4096, inter = 14336, heads = 32, kv_heads = 8, head_dim = 128;
  const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  std::vector<Result> results;
  const auto report = [&](Result r) {
    const double floor_us = r.bytes / (copy_gbps * 1e3);
    std::fprintf(stderr, "%-14s %-28s %9.2f us  byte floor %8.2f us (%5.1f%%)  launch %.2f us\n",
                 r.kernel.c_str(), r.shape.c_str(), r.us, floor_us, 100.0 * floor_us / r.us,
                 launch_us);
    results.push_back(std::move(r));
  };

  for (const int64_t rows : rows_list) {
    const std::string shape = "rows " + std::to_string(rows);
    {  // embedding: a bf16 row of the table in, an fp32 row out.
      Buffers b;
      const int64_t vocab = 128256;
      const uint16_t* table = b.random_bf16(vocab * hidden, 1);
      const int64_t bytes = rows * hidden * (2 + 4) + rows * 4;
      const int c = copies_for(bytes);
      std::vector<int32_t> ids;  // each copy gathers other rows of the table
      for (int64_t r = 0; r < c * rows; ++r)
        ids.push_back(static_cast<int32_t>((r * 7919) % vocab));
      const int32_t* d_ids = b.upload(ids);
      float* x = b.alloc<float>(c * rows * hidden);
      const double us = graph_us([&](int j) {
        CK(kk::launch_embedding(table, static_cast<int32_t>(vocab), d_ids + (j % c) * rows,
                                static_cast<int32_t>(rows), static_cast<int32_t>(hidden),
                                x + (j % c) * rows * hidden, s));
      });
      report({"embedding", shape + " x 4096", rows, bytes, us});
    }
    {  // add + RMSNorm: x and delta in, x and the bf16 row out.
      Buffers b;
      const int64_t per = rows * hidden;
      const int c = copies_for(per * 14);
      float* x = b.random_f32(c * per, 2);
      const float* delta = b.random_f32(c * per, 3);
      const float* weight = b.random_f32(hidden, 4);
      uint16_t* out = b.alloc<uint16_t>(c * per);
      const double us = graph_us([&](int j) {
        kk::AddRmsNormParams p;
        p.x = x + (j % c) * per;
        p.delta = delta + (j % c) * per;
        p.weight = weight;
        p.rows = static_cast<int32_t>(rows);
        p.dim = static_cast<int32_t>(hidden);
        p.out = out + (j % c) * per;
        CK(kk::launch_add_rmsnorm(p, s));
      });
      report({"add_rmsnorm", shape + " x 4096", rows, per * (4 + 4 + 4 + 2) + hidden * 4, us});
    }
    {  // SiLU-mul: the bf16 gate|up row in, the bf16 activation out.
      Buffers b;
      const int64_t per = rows * 2 * inter;
      const int c = copies_for(per * 3);
      const uint16_t* gate_up = b.random_bf16(c * per, 5);
      uint16_t* out = b.alloc<uint16_t>(c * rows * inter);
      const double us = graph_us([&](int j) {
        CK(kk::launch_silu_mul(gate_up + (j % c) * per, nullptr, static_cast<int32_t>(rows),
                               static_cast<int32_t>(inter), out + (j % c) * rows * inter, s,
                               kk::GateUpLayout::kInterleaved8));
      });
      report({"silu_mul", shape + " x 14336", rows, rows * inter * (4 + 2), us});
    }
    {  // RoPE + KV write at 16 bits: qkv fp32 in, q out, k and v back, the new rows into pages.
      Buffers b;
      const kv::PageGeometry g{static_cast<int32_t>(kv_heads), static_cast<int32_t>(head_dim), 32};
      const int64_t page_bytes = kv::page_bytes(g);
      const int64_t per_pages = (rows + g.tokens16 - 1) / g.tokens16;
      const int64_t pool_row = kv_heads * 2 * (kv::row_bytes(head_dim, 16) + kv::param_bytes(16));
      const int64_t bytes = rows * (qkv_width * 4 + q_width * 4 + 2 * kv_width * 4 + pool_row);
      const int c = copies_for(bytes);
      float* qkv = b.random_f32(c * rows * qkv_width, 6);
      float* q_out = b.alloc<float>(c * rows * q_width);
      uint8_t* pool = b.alloc<uint8_t>(c * per_pages * page_bytes);
      std::vector<int32_t> positions, page_ids, bits, slots;
      for (int copy = 0; copy < c; ++copy)
        for (int64_t r = 0; r < rows; ++r) {
          positions.push_back(static_cast<int32_t>(1000 + r));
          page_ids.push_back(static_cast<int32_t>(copy * per_pages + r / g.tokens16));
          bits.push_back(16);
          slots.push_back(static_cast<int32_t>(r % g.tokens16));
        }
      std::vector<float> inv_freq(static_cast<size_t>(head_dim / 2));
      for (int64_t i = 0; i < head_dim / 2; ++i)
        inv_freq[static_cast<size_t>(i)] =
            std::pow(500000.0f, -2.0f * static_cast<float>(i) / static_cast<float>(head_dim));
      const int32_t* d_pos = b.upload(positions);
      const int32_t* d_pages = b.upload(page_ids);
      const int32_t* d_bits = b.upload(bits);
      const int32_t* d_slots = b.upload(slots);
      const float* d_inv = b.upload(inv_freq);
      const double us = graph_us([&](int j) {
        const int64_t k = j % c;
        kk::RopeKvWriteParams p;
        p.qkv = qkv + k * rows * qkv_width;
        p.qkv_stride = qkv_width;
        p.rows = static_cast<int32_t>(rows);
        p.num_heads = static_cast<int32_t>(heads);
        p.num_kv_heads = static_cast<int32_t>(kv_heads);
        p.head_dim = static_cast<int32_t>(head_dim);
        p.positions = d_pos + k * rows;
        p.inv_freq = d_inv;
        p.q_out = q_out + k * rows * q_width;
        p.pool = {pool, page_bytes, g};
        p.page_ids = d_pages + k * rows;
        p.bits = d_bits + k * rows;
        p.slots = d_slots + k * rows;
        CK(kk::launch_rope_kv_write(p, s));
      });
      report({"rope_kv_write", shape + ", 32/8 heads, 16-bit", rows, bytes, us});
    }
  }

  // The KV pool's byte kernels: flushes of a full 16-bit page into a b-bit page, demotions of two
  // b-bit pages into one b/2-bit page.
  const kv::PageGeometry g{static_cast<int32_t>(kv_heads), static_cast<int32_t>(head_dim), 32};
  const int64_t page_bytes = kv::page_bytes(g);
  const auto token_bytes = [&](int bits) {
    return kv_heads * 2 * (kv::row_bytes(head_dim, bits) + kv::param_bytes(bits));
  };
  for (const int64_t ops : ops_list) {
    for (const int dst_bits : {8, 4, 2}) {  // flush: 32 tokens 16 -> dst_bits
      Buffers b;
      const int64_t bytes = ops * g.tokens16 * (token_bytes(16) + token_bytes(dst_bits));
      const int c = copies_for(bytes);
      uint8_t* pool = b.alloc<uint8_t>(c * 2 * ops * page_bytes);
      pmkv::bench::fill_bf16<<<1024, 256>>>(reinterpret_cast<uint16_t*>(pool),
                                            c * 2 * ops * page_bytes / 2, 7);
      CK(cudaGetLastError());
      std::vector<kk::KvRequantOp> host;
      for (int copy = 0; copy < c; ++copy)
        for (int64_t o = 0; o < ops; ++o) {
          const int32_t base = static_cast<int32_t>((copy * ops + o) * 2);
          host.push_back({base, 16, 0, base + 1, dst_bits, 0, g.tokens16});
        }
      const kk::KvRequantOp* d_ops = b.upload(host);
      const double us = graph_us([&](int j) {
        CK(kk::launch_requant({pool, page_bytes, g}, d_ops + (j % c) * ops,
                              static_cast<int32_t>(ops), s));
      });
      report({"requant", std::to_string(ops) + " pages 16 -> " + std::to_string(dst_bits), ops,
              bytes, us});
    }
    for (const int from : {16, 8, 4}) {  // demotion: two full pages at `from` into one at from/2
      Buffers b;
      const int32_t tok = kv::tokens_per_page(g, from);
      const int64_t bytes = ops * (2 * tok * token_bytes(from) + page_bytes);
      const int c = copies_for(bytes);
      uint8_t* pool = b.alloc<uint8_t>(c * 2 * ops * page_bytes);
      pmkv::bench::fill_bf16<<<1024, 256>>>(reinterpret_cast<uint16_t*>(pool),
                                            c * 2 * ops * page_bytes / 2, 8);
      CK(cudaGetLastError());
      std::vector<kk::KvDemoteOp> host;
      for (int copy = 0; copy < c; ++copy)
        for (int64_t o = 0; o < ops; ++o) {
          kk::KvDemoteOp op{};
          const int32_t base = static_cast<int32_t>((copy * ops + o) * 2);
          op.src[0] = base;
          op.src[1] = base + 1;
          op.tokens[0] = op.tokens[1] = tok;
          op.num_src = 2;
          op.from_bits = from;
          op.to_bits = from / 2;
          host.push_back(op);
        }
      const kk::KvDemoteOp* d_ops = b.upload(host);
      // Every launch demotes the same pages again: their bytes change, the work does not.
      const double us = graph_us([&](int j) {
        CK(kk::launch_demote({pool, page_bytes, g}, d_ops + (j % c) * ops,
                             static_cast<int32_t>(ops), s));
      });
      report({"demote",
              std::to_string(ops) + " pages " + std::to_string(from) + " -> " +
                  std::to_string(from / 2),
              ops, bytes, us});
    }
  }

  if (!out_path.empty()) {
    FILE* f = std::fopen(out_path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
      return 1;
    }
    const char* commit = std::getenv("COMMIT");
    for (const Result& r : results) {
      const double floor_us = r.bytes / (copy_gbps * 1e3);
      std::fprintf(
          f,
          "{\"kernel\": \"%s\", \"shape\": \"%s\", \"rows_or_ops\": %lld, \"bytes\": %lld, "
          "\"time_us\": %.3f, \"byte_floor_us\": %.3f, \"fraction_of_byte_floor\": %.4f, "
          "\"launch_floor_us\": %.3f, \"copy_gbps\": %.1f, \"launches\": %d, "
          "\"device\": \"%s\", \"commit\": \"%s\"}\n",
          r.kernel.c_str(), r.shape.c_str(), static_cast<long long>(r.rows),
          static_cast<long long>(r.bytes), r.us, floor_us, floor_us / r.us, launch_us, copy_gbps,
          launches, prop.name, commit != nullptr ? commit : "unknown");
    }
    std::fclose(f);
  }
  return 0;
}
