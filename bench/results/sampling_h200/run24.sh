#!/usr/bin/env bash
# Session 21, call 11: c794d09 (buffers grow geometrically): GPU backend tests, gpu_serve, and
# the server's engine-thread shares under load (greedy, presence 0.5, logprobs 5; async on/off).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|FAILED" $OUT/gpu_backend.txt | tail -2 >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=$PY timeout 200 bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
for a in on off; do
/tmp/g/pk/pmkv serve --model bench/configs/llama3-8b --port 8011 --grpc-port 0 --set model.load_format=dummy \
    --set engine.device=cuda --set kv_cache.memory=48G --set engine.max_model_len=4096 \
    --set scheduler.max_running=64 --set scheduler.max_step_tokens=4096 --set engine.async_steps=$a > $OUT/serve_$a.log 2>&1 &
P=$!
for i in $(seq 1 180); do $PY -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8011/health',timeout=1)" 2>/dev/null && break; sleep 1; done
while read -r name args; do
  [ $a = off ] && [ $name = lp5 ] && continue
  timeout 100 $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 64 --requests 128 --max-tokens 512 --prompt-ids 512 $args --json > $OUT/l.json 2>$OUT/load_${a}_$name.err
  echo "async $a $name [$args]: $(python3 -c "
import json; d=json.load(open('$OUT/l.json')); print({k: d[k] for k in d if k.startswith('server') or k in ('throughput_tokens_per_s','wall_s')})" 2>&1) ($(( $(date +%s) - T0 )) s)" >> $S
done <<'LIST'
greedy --temperature 0
presence --temperature 0 --presence-penalty 0.5
lp5 --temperature 0 --logprobs 5
greedy_b --temperature 0
presence_b --temperature 0 --presence-penalty 0.5
LIST
kill $P; wait $P
done
rm -f $OUT/l.json
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_serve.txt pip.txt serve_*.log load_*.err && rm -f gpu_backend.txt gpu_serve.txt pip.txt serve_*.log load_*.err
cat $S
