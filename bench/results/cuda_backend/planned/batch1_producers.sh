#!/usr/bin/env bash
# Planned device call (thirty-fourth session; not yet run: no device was lent for it): batch 1 end
# to end, and batch 8, with the bulk GEMM's 4 and 8 cp.async producer warps (PMKV_BULK_PRODUCERS)
# against the default TMA producer, after each variant's backend tests. Here, with /tmp/bvP4 and
# /tmp/bvP8 configured as bulk_producers.sh says:
#   ninja -C build bench_cuda_backend
#   ninja -C /tmp/bvP4 bench_cuda_backend pmkv_test_gpu_backend
#   ninja -C /tmp/bvP8 bench_cuda_backend pmkv_test_gpu_backend
#   scripts/package_device.sh /tmp/e2e/pk build/bench/bench_cuda_backend
#   for p in 4 8; do for b in bench/bench_cuda_backend tests/gpu/pmkv_test_gpu_backend; do
#     cp /tmp/bvP$p/$b /tmp/e2e/pk/$(basename $b)_p$p && strip --strip-unneeded /tmp/e2e/pk/$(basename $b)_p$p
#   done; done
#   git rev-parse --short HEAD > /tmp/e2e/pk/COMMIT
#   tar -C /tmp/e2e -cf - pk | xz -T2 -9 > .gpubin/e2e.txz      # ~12 MB
# then `run` with carry [".gpubin"]: bash bench/results/cuda_backend/planned/all.sh (this and the
# other planned parts; run alone, this writes 18 files to $OUT: wrap it in a tar as all.sh does)
# (P = 8 is an sm_90a build of everything; the others sm_90.)
set -u
mkdir -p /tmp/e2e && tar -C /tmp/e2e -xJf .gpubin/e2e.txz
# shellcheck disable=SC1091
source /tmp/e2e/pk/env.sh
C=$(cat /tmp/e2e/pk/COMMIT)
for p in 4 8; do
  timeout 120 pmkv_test_gpu_backend_p$p > $OUT/backend_p$p.log 2>&1
  echo "P=$p pmkv_test_gpu_backend rc=$?"; tail -2 $OUT/backend_p$p.log
done
B="--model bench/configs/llama3-8b --load-format dummy"
# bcb SECONDS P ARGS...: bench_cuda_backend of variant P (0: the default build) under a time
# limit, its JSON's commit the bundle's with "+P4" / "+P8".
bcb() {
  local t=$1 p=$2; shift 2
  if [ "$p" = 0 ]; then
    COMMIT=$C timeout "$t" bench_cuda_backend $B "$@"
  else
    COMMIT=$C+P$p timeout "$t" bench_cuda_backend_p$p $B "$@"
  fi
}
for r in 1 2 3; do
  for p in 0 4 8; do
    bcb 60 $p --scenarios batch1 --decode-steps 200 --async-steps 1 \
      --out $OUT/b1_p${p}_r$r.json > /dev/null 2>> $OUT/b1.log
    echo "batch1 P=$p round $r rc=$?:" \
      "$(grep -o '"batch1_decode_ms_per_token":[^,]*' $OUT/b1_p${p}_r$r.json)" \
      "$(grep -o '"fraction_of_weight_floor":[^,]*' $OUT/b1_p${p}_r$r.json)"
  done
done
for r in 1 2; do
  for p in 0 4 8; do
    bcb 90 $p --scenarios throughput --batches 1,4,8 --contexts 4096 --bits 16,2 \
      --throughput-steps 24 --out $OUT/tp_p${p}_r$r.json > /dev/null 2>> $OUT/tp.log
    echo "throughput P=$p round $r rc=$?"
  done
done
