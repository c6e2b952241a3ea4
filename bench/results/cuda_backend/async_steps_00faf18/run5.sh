#!/usr/bin/env bash
# Session 20, call 1: steps run ahead (async_steps): GPU backend tests, throughput A/B, gpu_serve.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|differ|FAILED" $OUT/gpu_backend.txt | tail -8 >> $S
B="/tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy"
for r in 1 2; do for a in 0 1; do
  $B --scenarios throughput --batches 1,16,64 --contexts 4096,16384 --bits 16,4,2 --throughput-steps 24 --async-steps $a --out $OUT/tp_async${a}_r$r.json > $OUT/tp_async${a}_r$r.txt 2>&1
  echo "round $r async $a rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
  grep -E "tokens/s" $OUT/tp_async${a}_r$r.txt >> $S
done; done
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=/tmp/venv/bin/python bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_serve.txt pip.txt tp_*.txt && rm -f gpu_backend.txt gpu_serve.txt pip.txt tp_*.txt
cat $S
