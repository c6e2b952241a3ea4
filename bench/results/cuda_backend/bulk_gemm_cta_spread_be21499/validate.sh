# The one device call that shared_tiles_first.patch still needs (it was built, not run).
# Here: git apply the patch; build pmkv_test_gpu_kernels, pmkv_test_gpu_backend, bench_cuda_backend,
# bench_skinny_gemm (-DCMAKE_CUDA_ARCHITECTURES=90); bundle them with scripts/package_device.sh
# into .gpubin/pk.txz with the unpatched bench_skinny_gemm as old_bsg and the unpatched
# bench_cuda_backend as old_bench; carry .gpubin; then on the device:
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh
export PMKV_SOURCE_DIR=$PWD
R=$OUT/r; mkdir -p $R
for b in old_bsg bench_skinny_gemm; do /tmp/g/pk/$b --rows 1,8 2> $R/$b.txt > $R/$b.json; grep "bulk \|compact " $R/$b.txt | sed "s/^/$b /"; done
B="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2; do for b in old_bench bench_cuda_backend; do $b $B --scenarios batch1 --decode-steps 200 --out $R/b1_${b}_$r.json 2>&1 | grep -a "batch1 decode" | sed "s/^/$b.$r /"; done; done
# Bit-identical results: the bulk-shaped model's max |gpu - cpu| must read 0.0313232 / 0.0324857 /
# 0.0314536 as at be21499 (backend_be21499.txt).
pmkv_test_gpu_backend "cuda backend: bulk-GEMM shapes (fused SwiGLU) match the CPU backend" 2>&1 | grep -a "bulk-shaped\|passed\|failed"
pmkv_test_gpu_kernels "[bulk]" 2>&1 | tail -2
tar czf $OUT/r.tgz -C $OUT r
