#!/usr/bin/env bash
# Session 20, call 4: the server under load: async off / on (waits after prompt-heavy steps) /
# on always ahead (PMKV_ASYNC_DRAIN_PROMPT_TOKENS=0); gpu_serve.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=$PY bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
for r in 1 2; do for v in off on ahead; do
  a=$v; D=512; [ $v = ahead ] && a=on && D=0
  PMKV_ASYNC_DRAIN_PROMPT_TOKENS=$D /tmp/g/pk/pmkv serve --model bench/configs/llama3-8b --port 8011 --grpc-port 0 --set model.load_format=dummy \
    --set engine.device=cuda --set kv_cache.memory=48G --set engine.max_model_len=4096 \
    --set scheduler.max_running=64 --set scheduler.max_step_tokens=4096 --set engine.async_steps=$a > $OUT/serve_${v}_r$r.log 2>&1 &
  P=$!
  for i in $(seq 1 180); do $PY -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8011/health',timeout=1)" 2>/dev/null && break; sleep 1; done
  $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 64 --requests 128 --max-tokens 512 --prompt-ids 512 --temperature 0 --json > $OUT/l.json 2>$OUT/load_${v}_r$r.err
  echo "r$r $v c64: $(cat $OUT/l.json)" >> $S
  $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 16 --requests 48 --max-tokens 512 --prompt-ids 2048 --temperature 0 --json > $OUT/l.json 2>>$OUT/load_${v}_r$r.err
  echo "r$r $v c16: $(cat $OUT/l.json)" >> $S
  kill $P; wait $P
  echo "serve $v r$r done ($(( $(date +%s) - T0 )) s)" >> $S
done; done
rm -f $OUT/l.json
cd $OUT && tar -cJf logs.txz serve_*.log load*.err pip.txt gpu_serve.txt && rm -f serve_*.log load*.err pip.txt gpu_serve.txt
cat $S
