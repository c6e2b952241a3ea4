#!/usr/bin/env bash
# Session 21, call 15: validation of the session's last code (e179fdc): the full GPU backend
# suite and gpu_serve.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|FAILED|logprobs:|differ" $OUT/gpu_backend.txt | tail -8 >> $S
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $OUT/pip.txt 2>&1
PMKV_BIN=/tmp/g/pk/pmkv PMKV_PYTHON=/tmp/venv/bin/python timeout 200 bash tests/gpu/serve_cuda/run.sh > $OUT/gpu_serve.txt 2>&1; echo "gpu_serve rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed" $OUT/gpu_serve.txt | tail -3 >> $S
cd $OUT && tar -cJf logs.txz gpu_backend.txt gpu_serve.txt pip.txt && rm -f gpu_backend.txt gpu_serve.txt pip.txt
cat $S
