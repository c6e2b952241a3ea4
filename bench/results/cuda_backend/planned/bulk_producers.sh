#!/usr/bin/env bash
# Planned device call (thirty-third session; not yet run: no device was lent for it): the bulk
# GEMM with 4 cp.async producer warps (PMKV_BULK_PRODUCERS=4, sweep order) against the default
# TMA producer, and the variant's skinny-GEMM tests. Here (bench/README.md, "Skinny GEMM"):
#   cmake -S . -B /tmp/bvP4 -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
#     -DCMAKE_CUDA_FLAGS=-DPMKV_BULK_PRODUCERS=4 && ninja -C /tmp/bvP4 bench_skinny_gemm pmkv_test_gpu_kernels
#   xz -T2 -c build/bench/bench_skinny_gemm > .gpubin/bsg.xz
#   xz -T2 -c /tmp/bvP4/bench/bench_skinny_gemm > .gpubin/bsg_p4.xz
#   xz -T2 -c /tmp/bvP4/tests/gpu/pmkv_test_gpu_kernels > .gpubin/tk_p4.xz
# then `run` with carry [".gpubin"]: bash bench/results/cuda_backend/planned/bulk_producers.sh
set -u
for f in bsg bsg_p4 tk_p4; do xz -dk .gpubin/$f.xz && chmod +x .gpubin/$f; done
timeout 300 .gpubin/tk_p4 "[skinny_gemm]" > $OUT/tests_p4.log 2>&1
echo "variant [skinny_gemm] rc=$?"; tail -3 $OUT/tests_p4.log
for r in 1 2; do
  for b in bsg bsg_p4; do
    .gpubin/$b --rows 1,8 > $OUT/${b}_r$r.json 2> $OUT/${b}_r$r.txt
    echo "== $b round $r"; cat $OUT/${b}_r$r.txt
  done
done
