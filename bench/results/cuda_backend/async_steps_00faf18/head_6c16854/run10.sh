#!/usr/bin/env bash
# Session 20, call 6: validation at HEAD (6c16854): GPU backend tests, gpu_serve, a short async A/B.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|differ|FAILED" $OUT/gpu_backend.txt | tail -6 >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=/tmp/venv/bin/python bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
B="/tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy"
for a in 0 1; do
  COMMIT=6c16854 $B --scenarios batch1,throughput --decode-steps 200 --batches 64 --contexts 16384 --bits 4 --throughput-steps 24 --async-steps $a --out $OUT/head_async$a.json 2>&1 | grep -E "batch1 decode|tokens/s" | sed "s/^/async $a: /" >> $S
done
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_serve.txt pip.txt && rm -f gpu_backend.txt gpu_serve.txt pip.txt
cat $S
