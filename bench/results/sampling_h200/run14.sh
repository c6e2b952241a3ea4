#!/usr/bin/env bash
# Session 21, call 1: log-probabilities on the device (65d1ddd): GPU backend tests (sampling kernel
# logprobs vs Sampler, backend logprobs vs host logits), gpu_serve, then the server under load with
# logprobs=5: 6afda5d (host sampling, steps one at a time) vs 65d1ddd, and 65d1ddd without logprobs.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader >> $S
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|differ|FAILED|logprobs:" -A1 $OUT/gpu_backend.txt | tail -16 >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PY=/tmp/venv/bin/python
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=$PY timeout 200 bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
run_load() {  # binary tag logprobs
  /tmp/g/pk/$1 serve --model bench/configs/llama3-8b --port 8011 --grpc-port 0 --set model.load_format=dummy \
    --set engine.device=cuda --set kv_cache.memory=48G --set engine.max_model_len=4096 \
    --set scheduler.max_running=64 --set scheduler.max_step_tokens=4096 > $OUT/serve_$2.log 2>&1 &
  P=$!
  for i in $(seq 1 180); do $PY -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8011/health',timeout=1)" 2>/dev/null && break; sleep 1; done
  timeout 100 $PY bench/load_test.py --base-url http://127.0.0.1:8011/v1 --concurrency 64 --requests 128 --max-tokens 512 --prompt-ids 512 --temperature 0 --logprobs $3 --json > $OUT/l.json 2>$OUT/load_$2.err
  echo "$2 ($1) c64 logprobs $3: $(cat $OUT/l.json) ($(( $(date +%s) - T0 )) s)" >> $S
  kill $P; wait $P
}
run_load pmkv_old old_lp5 5
run_load pmkv new_lp5 5
run_load pmkv new_none -1
rm -f $OUT/l.json
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_serve.txt pip.txt serve_*.log load_*.err && rm -f gpu_backend.txt gpu_serve.txt pip.txt serve_*.log load_*.err
cat $S
