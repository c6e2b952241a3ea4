#!/usr/bin/env bash
# Session 21, call 9: where the server's engine thread spends a step under load (00d4fa5's
# counters), against the GPU's step alone at the same batch and contexts (bench_cuda_backend).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
export COMMIT=00d4fa5
/tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy --scenarios throughput \
  --batches 64 --contexts 512,1024 --bits 16 --throughput-steps 24 --async-steps 1 --out $OUT/tp_b64.json > $OUT/tp.txt 2>&1
echo "bench b64 rc=$? ($(( $(date +%s) - T0 )) s): $(python3 -c "
import json
j=json.load(open('$OUT/tp_b64.json'))
print([(p['batch'],p['context'],round(p['step_ms_median'],3),round(p.get('build_step_ms_median',0),3),round(p.get('prepare_ms_median',0),3)) for p in j['throughput']])" 2>&1)" >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
/tmp/g/pk/pmkv serve --model bench/configs/llama3-8b --port 8011 --grpc-port 0 --set model.load_format=dummy \
    --set engine.device=cuda --set kv_cache.memory=48G --set engine.max_model_len=4096 \
    --set scheduler.max_running=64 --set scheduler.max_step_tokens=4096 > $OUT/serve.log 2>&1 &
P=$!
for i in $(seq 1 180); do $PY -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8011/health',timeout=1)" 2>/dev/null && break; sleep 1; done
while read -r name args; do
  timeout 100 $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 64 --requests 128 --max-tokens 512 --prompt-ids 512 $args --json > $OUT/l.json 2>$OUT/load_$name.err
  echo "$name [$args]: $(python3 -c "
import json; d=json.load(open('$OUT/l.json')); print({k: d[k] for k in d if k.startswith('server') or k in ('throughput_tokens_per_s','wall_s')})" 2>&1) ($(( $(date +%s) - T0 )) s)" >> $S
done <<'LIST'
greedy --temperature 0
greedy_b --temperature 0
presence --temperature 0 --presence-penalty 0.5
topp --temperature 1 --top-p 0.9
lp5 --temperature 0 --logprobs 5
LIST
kill $P; wait $P
rm -f $OUT/l.json
cd $OUT && tar -cJf logs.txz tp.txt pip.txt serve.log load_*.err && rm -f tp.txt pip.txt serve.log load_*.err
cat $S
