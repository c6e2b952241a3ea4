#!/usr/bin/env bash
# Session 20, call 2: async_steps at batch 1 (bench) and through the real server (load test).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
B="/tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy"
for r in 1 2; do for a in 0 1; do
  $B --scenarios batch1 --decode-steps 200 --async-steps $a --out $OUT/b1_async${a}_r$r.json 2>&1 | grep "batch1 decode" | sed "s/^/r$r async $a: /" >> $S
done; done
$B --scenarios throughput --batches 128 --contexts 4096,16384 --bits 16,4,2 --throughput-steps 24 --async-steps 1 --out $OUT/tp128_async1.json 2>&1 | grep tokens/s >> $S
$B --scenarios throughput --batches 128 --contexts 4096,16384 --bits 16,4,2 --throughput-steps 24 --async-steps 0 --out $OUT/tp128_async0.json 2>&1 | grep tokens/s >> $S
echo "bench done ($(( $(date +%s) - T0 )) s)" >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
for r in 1 2; do for a in off on; do
  /tmp/g/pk/pmkv serve --model bench/configs/llama3-8b --port 8011 --grpc-port 0 --set model.load_format=dummy \
    --set engine.device=cuda --set kv_cache.memory=48G --set engine.max_model_len=4096 \
    --set scheduler.max_running=64 --set scheduler.max_step_tokens=4096 --set engine.async_steps=$a > $OUT/serve_${a}_r$r.log 2>&1 &
  P=$!
  for i in $(seq 1 180); do $PY -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8011/health',timeout=1)" 2>/dev/null && break; sleep 1; done
  $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 64 --requests 128 --max-tokens 512 --prompt-ids 512 --temperature 0 --json > $OUT/load64_${a}_r$r.json 2>$OUT/load64_${a}_r$r.err
  echo "r$r async $a c64: $(cat $OUT/load64_${a}_r$r.json)" >> $S
  $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 1 --requests 3 --max-tokens 256 --prompt-ids 512 --temperature 0 --json > $OUT/load1_${a}_r$r.json 2>>$OUT/load64_${a}_r$r.err
  echo "r$r async $a c1: $(cat $OUT/load1_${a}_r$r.json)" >> $S
  kill $P; wait $P
  echo "serve $a r$r done ($(( $(date +%s) - T0 )) s)" >> $S
done; done
cd $OUT && tar -cJf logs.txz serve_*.log load*.err pip.txt && rm -f serve_*.log load*.err pip.txt
cat $S
