#!/usr/bin/env bash
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
G=/tmp/g/pk
timeout 300 $G/pmkv_test_gpu_kernels > $W/test_kernels.log 2>&1; echo "gpu kernels rc=$?" >> $W/summary.txt
tail -2 $W/test_kernels.log >> $W/summary.txt
timeout 150 $G/pmkv_test_gpu_backend > $W/test_backend.log 2>&1; echo "gpu_backend rc=$?" >> $W/summary.txt
tail -2 $W/test_backend.log >> $W/summary.txt
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt > $W/pip.log 2>&1
PMKV_BIN=$G/pmkv PMKV_SOURCE_DIR=$PWD PMKV_PYTHON=/tmp/venv/bin/python timeout 150 bash tests/gpu/serve_cuda/run.sh > $W/serve.log 2>&1; echo "gpu_serve rc=$?" >> $W/summary.txt
grep -E "passed|failed" $W/serve.log >> $W/summary.txt
M="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2; do
  $G/bench_cuda_backend $M --scenarios batch1 --decode-steps 200 --async-steps 1 --out $W/b1_r$r.json > /dev/null 2>> $W/bench.log
  echo "b1 r$r $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1_r$r.json) $(grep -o '"fraction_of_weight_floor":[^,]*' $W/b1_r$r.json)" >> $W/summary.txt
done
$G/bench_weight_stream --modes tma,ldgsts,read --pdl 1 > $W/ws.json 2> $W/ws.txt; grep -v "^    " $W/ws.txt >> $W/summary.txt
$G/bench_skinny_gemm --rows 1 > $W/bsg.json 2> $W/bsg.txt; grep -E "read stream|m=1 bulk " $W/bsg.txt | cut -c1-120 >> $W/summary.txt
cd $OUT && tar czf run11.tgz w && rm -rf w
