#!/usr/bin/env bash
# Session 18, call 8: the branches build: GPU tests, gpu_serve, benchmarks at the new default.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
tar -C .gpubin -xJf .gpubin/st.txz
S=$OUT/summary.txt; : > $S
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$?" >> $S; grep -B1 -A2 "bit-widths at once" $OUT/gpu_backend.txt >> $S; tail -3 $OUT/gpu_backend.txt >> $S
.gpubin/pmkv_test_gpu_kernels "gpu decode*" > $OUT/gpu_decode.txt 2>&1; echo "gpu decode rc=$?" >> $S; tail -2 $OUT/gpu_decode.txt >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=/tmp/venv/bin/python bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$?" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
B="/tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy"
for i in 1 2 3; do $B --scenarios batch1 --decode-steps 200 --out $OUT/batch1_$i.json 2>&1 | grep "batch1 decode" >> $S; done
$B --scenarios throughput --batches 1 --contexts 4096,16384,65536 --bits 16,4,2 --throughput-steps 12 --out $OUT/tp_batch1_long.json 2>&1 | grep "tokens/s" >> $S
$B --scenarios throughput --batches 16,64 --contexts 4096,16384 --bits 16,4,2 --throughput-steps 12 --out $OUT/tp_grid.json 2>&1 | grep "tokens/s" >> $S
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_decode.txt gpu_serve.txt pip.txt && rm gpu_backend.txt gpu_decode.txt gpu_serve.txt pip.txt
cat $S
