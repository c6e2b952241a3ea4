#!/usr/bin/env bash
# Session 21, call 8: validation of 86d6658 (device logprobs + faster selections): GPU backend
# tests, gpu_serve, decode steps per sampling mode (bench_cuda_backend), the server with logprobs.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|FAILED|logprobs:" $OUT/gpu_backend.txt | tail -4 >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=$PY timeout 200 bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
export COMMIT=86d6658
while read -r name args; do
  /tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy --scenarios throughput \
    --batches 1,16,64 --contexts 4096 --bits 16 --throughput-steps 24 --async-steps 1 $args --out $OUT/tp_$name.json > $OUT/tp_$name.txt 2>&1
  echo "$name [$args] rc=$? ($(( $(date +%s) - T0 )) s): $(python3 -c "
import json
j=json.load(open('$OUT/tp_$name.json'))
print([(p['batch'],round(p['step_ms_median'],3),round(p['tokens_per_s'],1)) for p in j['throughput']])" 2>&1)" >> $S
done <<'LIST'
greedy --logprobs -1
greedy_lp0 --logprobs 0
greedy_lp5 --logprobs 5
greedy_lp20 --logprobs 20
t1_topk50 --temperature 1 --top-k 50
t1_topp09 --temperature 1 --top-p 0.9
t08_k50_p095_lp5 --temperature 0.8 --top-k 50 --top-p 0.95 --logprobs 5
greedy_b --logprobs -1
greedy_lp5_b --logprobs 5
LIST
run_load() {  # binary tag logprobs requests max_tokens
  /tmp/g/pk/$1 serve --model bench/configs/llama3-8b --port 8011 --grpc-port 0 --set model.load_format=dummy \
    --set engine.device=cuda --set kv_cache.memory=48G --set engine.max_model_len=4096 \
    --set scheduler.max_running=64 --set scheduler.max_step_tokens=4096 > $OUT/serve_$2.log 2>&1 &
  P=$!
  for i in $(seq 1 180); do $PY -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8011/health',timeout=1)" 2>/dev/null && break; sleep 1; done
  timeout 150 $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 64 --requests $4 --max-tokens $5 --prompt-ids 512 --temperature 0 --logprobs $3 --json > $OUT/l.json 2>$OUT/load_$2.err
  echo "$2 ($1) c64 logprobs $3: $(cat $OUT/l.json) ($(( $(date +%s) - T0 )) s)" >> $S
  kill $P; wait $P
}
run_load pmkv new_lp5_short 5 64 128
run_load pmkv new_lp5 5 128 512
run_load pmkv new_lp0 0 128 512
run_load pmkv new_none -1 128 512
rm -f $OUT/l.json
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_serve.txt pip.txt tp_*.txt serve_*.log load_*.err && rm -f gpu_backend.txt gpu_serve.txt pip.txt tp_*.txt serve_*.log load_*.err && tar -cJf tp_json.txz tp_*.json && rm -f tp_*.json
cat $S
