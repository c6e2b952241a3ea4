#!/usr/bin/env bash
# HEAD c9083ad on the device: every GPU test suite, batch-1 decode twice, the serving integration.
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
timeout 300 /tmp/g/pk/pmkv_test_gpu_kernels > $W/test_kernels.log 2>&1; echo "gpu kernels rc=$?" >> $W/summary.txt
tail -3 $W/test_kernels.log >> $W/summary.txt
timeout 150 /tmp/g/pk/pmkv_test_gpu_backend -s "cuda backend: at 2 bits it loses what the CPU backend loses" > $W/test_backend_2bit.log 2>&1; echo "gpu_backend 2-bit rc=$?" >> $W/summary.txt
grep -E "rms \|gpu" $W/test_backend_2bit.log >> $W/summary.txt
timeout 150 /tmp/g/pk/pmkv_test_gpu_backend > $W/test_backend.log 2>&1; echo "gpu_backend rc=$?" >> $W/summary.txt
tail -3 $W/test_backend.log >> $W/summary.txt
B=/tmp/g/pk/bench_cuda_backend
M="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2; do
  $B $M --scenarios batch1 --decode-steps 200 --async-steps 1 --out $W/b1_r$r.json > /dev/null 2>> $W/bench.log
  echo "b1 r$r $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1_r$r.json) $(grep -o '"fraction_of_weight_floor":[^,]*' $W/b1_r$r.json)" >> $W/summary.txt
done
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $W/pip.log 2>&1
PMKV_BIN=/tmp/g/pk/pmkv PMKV_SOURCE_DIR=$PWD PMKV_PYTHON=/tmp/venv/bin/python timeout 150 bash tests/gpu/serve_cuda/run.sh > $W/serve.log 2>&1; echo "gpu_serve rc=$?" >> $W/summary.txt
grep -E "passed|failed" $W/serve.log >> $W/summary.txt
cat $W/summary.txt
cd $OUT && tar czf run8.tgz w && rm -rf w
