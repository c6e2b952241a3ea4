#!/usr/bin/env bash
# Session 20, call 9: the penalty histories through PenaltyHistory (dense counters): GPU backend
# tests (sampling kernel equivalence, steps-ahead with penalized sequences), gpu_serve, a server
# load with penalties, async off / on.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|differ|FAILED|kept-out" -A1 $OUT/gpu_backend.txt | tail -14 >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=$PY bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
for a in off on; do
  /tmp/g/pk/pmkv serve --model bench/configs/llama3-8b --port 8011 --grpc-port 0 --set model.load_format=dummy \
    --set engine.device=cuda --set kv_cache.memory=48G --set engine.max_model_len=4096 \
    --set scheduler.max_running=64 --set scheduler.max_step_tokens=4096 --set engine.async_steps=$a > $OUT/serve_$a.log 2>&1 &
  P=$!
  for i in $(seq 1 180); do $PY -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8011/health',timeout=1)" 2>/dev/null && break; sleep 1; done
  $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 64 --requests 128 --max-tokens 512 --prompt-ids 512 --temperature 0 --presence-penalty 0.5 --json > $OUT/l.json 2>$OUT/load_$a.err
  echo "async $a c64 presence 0.5: $(cat $OUT/l.json)" >> $S
  kill $P; wait $P
done
rm -f $OUT/l.json
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_serve.txt pip.txt serve_*.log load_*.err && rm -f gpu_backend.txt gpu_serve.txt pip.txt serve_*.log load_*.err
cat $S
