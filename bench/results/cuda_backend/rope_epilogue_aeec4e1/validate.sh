# The one device call rope_epilogue.patch needs (built here at aeec4e1, not run on a GPU).
# Here: git apply the patch; build pmkv_test_gpu_kernels, pmkv_test_gpu_backend,
# bench_cuda_backend (-DCMAKE_CUDA_ARCHITECTURES=90); bundle them with scripts/package_device.sh
# into .gpubin/pk.txz; carry .gpubin; then on the device:
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh
export PMKV_SOURCE_DIR=$PWD
R=$OUT/r; mkdir -p $R
# The epilogue against the GEMM + launch_rope_kv_write (new case), and the rest of the GEMM tests.
pmkv_test_gpu_kernels "[skinny_gemm]" 2>&1 | tail -3
pmkv_test_gpu_kernels "gpu rope_kv_write*" 2>&1 | tail -2   # the kernel now calls rope_kv_task
# The backend: batch-1 numbers must equal 2b0d195's (0.0313232 / 0.0324857 / 0.0314536).
pmkv_test_gpu_backend 2>&1 | grep -a "bulk-shaped\|passed\|failed"
B="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2 3; do for v in 1 0; do PMKV_ROPE_EPILOGUE=$v bench_cuda_backend $B --scenarios batch1 --decode-steps 200 --out $R/b1_rope${v}_$r.json 2>&1 | grep -a "batch1 decode" | sed "s/^/rope_epilogue=$v r$r: /"; done; done
tar czf $OUT/r.tgz -C $OUT r
