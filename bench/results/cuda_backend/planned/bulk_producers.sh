#!/usr/bin/env bash
# Planned device call (thirty-third session; not yet run: no device was lent for it): the bulk
# GEMM with 4 and 8 cp.async producer warps (PMKV_BULK_PRODUCERS, sweep order) against the
# default TMA producer, and each variant's skinny-GEMM tests. Here (bench/README.md, "Skinny GEMM"):
#   cmake -S . -B /tmp/bvP4 -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
#     -DCMAKE_CUDA_FLAGS=-DPMKV_BULK_PRODUCERS=4 && ninja -C /tmp/bvP4 bench_skinny_gemm pmkv_test_gpu_kernels
#   cmake -S . -B /tmp/bvP8 -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
#     -DCMAKE_CUDA_FLAGS=-DPMKV_BULK_PRODUCERS=8 && ninja -C /tmp/bvP8 bench_skinny_gemm pmkv_test_gpu_kernels
#   xz -T2 -c build/bench/bench_skinny_gemm > .gpubin/bsg.xz
#   for p in 4 8; do xz -T2 -c /tmp/bvP$p/bench/bench_skinny_gemm > .gpubin/bsg_p$p.xz
#     xz -T2 -c /tmp/bvP$p/tests/gpu/pmkv_test_gpu_kernels > .gpubin/tk_p$p.xz; done
# then `run` with carry [".gpubin"]: bash bench/results/cuda_backend/planned/bulk_producers.sh
set -u
for f in bsg bsg_p4 bsg_p8 tk_p4 tk_p8; do xz -dk .gpubin/$f.xz && chmod +x .gpubin/$f; done
for p in 4 8; do
  timeout 150 .gpubin/tk_p$p "[skinny_gemm]" > $OUT/tests_p$p.log 2>&1
  echo "P=$p [skinny_gemm] rc=$?"; tail -2 $OUT/tests_p$p.log
done
for r in 1 2; do
  for b in bsg bsg_p4 bsg_p8; do
    .gpubin/$b --rows 1,8 > $OUT/${b}_r$r.json 2> $OUT/${b}_r$r.txt
    echo "== $b round $r"; cat $OUT/${b}_r$r.txt
  done
done
