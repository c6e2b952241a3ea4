#!/usr/bin/env bash
# Session 21, call 2: what device log-probabilities cost a decode step (bench_cuda_backend
# --logprobs), and the server with logprobs=5 on a load the old binary (6afda5d) finishes.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
export COMMIT=65d1ddd
for lp in -1 0 5 20 -1 20; do
  /tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy --scenarios throughput \
    --batches 1,16,64 --contexts 4096 --bits 16 --throughput-steps 24 --async-steps 1 --logprobs $lp --out $OUT/tp_lp$lp.json > $OUT/tp.txt 2>&1
  echo "logprobs $lp rc=$? ($(( $(date +%s) - T0 )) s): $(python3 -c "
import json,sys
j=json.load(open('$OUT/tp_lp$lp.json'))
pts=j.get('throughput',j.get('results',[]))
print([(p.get('batch'),p.get('context'),p.get('step_ms_median',p.get('ms_per_step')),p.get('tokens_per_s')) for p in pts])" 2>&1)" >> $S
done
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
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
run_load pmkv_old old_lp5_short 5 64 128
run_load pmkv new_lp5_short 5 64 128
run_load pmkv_old old_none_short -1 64 128
rm -f $OUT/l.json
cd $OUT && tar -cJf logs.txz tp.txt pip.txt serve_*.log load_*.err && rm -f tp.txt pip.txt serve_*.log load_*.err
cat $S
