#!/usr/bin/env bash
# On the device machine: every GPU test suite and the batch-1 benchmark in one call, on the bundle
# scripts/device_pack.sh made here. Run from the repository root with carry [".gpubin", ".whl"]:
#   bash scripts/device_suite.sh [SUITE...]
# SUITE: kernels (pmkv_test_gpu_kernels), backend (pmkv_test_gpu_backend), serve (gpu_serve:
# tests/gpu/serve_cuda/run.sh), batch1 (bench_cuda_backend batch-1 decode, Llama-3-8B shape, dummy
# weights, twice); default: all four. Writes $OUT/suite/ (one log per suite, summary.txt) and
# packs it into $OUT/suite.tgz; prints summary.txt at the end. Exit status: 0 only when every
# suite passed.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder whose files come back (the run tool sets it)}"
W=$OUT/suite
mkdir -p "$W" /tmp/g
tar -C /tmp/g -xJf .gpubin/pk.txz
# shellcheck disable=SC1091
source /tmp/g/pk/env.sh
PK=/tmp/g/pk
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(kernels backend serve batch1)
status=0
note() { echo "$*" >> "$W/summary.txt"; }
# A run is killed at 600 s: each suite gets its own limit or what is left of 570 s, whichever is
# less, and the logs so far stay in $OUT/suite/ (at most 8 files) if the call still runs out.
t_start=$(date +%s)
limit() {
  local left=$((570 - ($(date +%s) - t_start)))
  echo $((left < $1 ? left : $1))
}
note "binaries of $(cat "$PK/COMMIT" 2>/dev/null || echo "an unknown commit"), $(nvidia-smi -L 2>/dev/null | head -1)"
for s in "${suites[@]}"; do
  t0=$(date +%s)
  if [ "$(limit 30)" -lt 30 ]; then
    note "$s: not run (the call's time is spent)"
    status=1
    continue
  fi
  case $s in
    kernels)
      timeout "$(limit 300)" "$PK/pmkv_test_gpu_kernels" > "$W/kernels.log" 2>&1
      rc=$?
      tail -2 "$W/kernels.log" >> "$W/summary.txt" ;;
    backend)
      timeout "$(limit 300)" "$PK/pmkv_test_gpu_backend" > "$W/backend.log" 2>&1
      rc=$?
      tail -2 "$W/backend.log" >> "$W/summary.txt" ;;
    serve)
      python3 -m venv /tmp/venv &&
        /tmp/venv/bin/pip install -q --no-index --find-links .whl -r .whl/requirements.txt \
          > "$W/pip.log" 2>&1
      PMKV_BIN=$PK/pmkv PMKV_SOURCE_DIR=$PWD PMKV_PYTHON=/tmp/venv/bin/python \
        timeout "$(limit 400)" bash tests/gpu/serve_cuda/run.sh > "$W/serve.log" 2>&1
      rc=$?
      grep -E "passed|failed|error" "$W/serve.log" | tail -4 >> "$W/summary.txt" ;;
    batch1)
      rc=0
      for r in 1 2; do
        COMMIT=$(cat "$PK/COMMIT" 2>/dev/null || echo unknown) \
          timeout "$(limit 120)" "$PK/bench_cuda_backend" --model bench/configs/llama3-8b --load-format dummy \
          --scenarios batch1 --decode-steps 200 --async-steps 1 --out "$W/batch1_r$r.json" \
          > /dev/null 2>> "$W/batch1.log" || rc=$?
        note "batch1 run $r: $(grep -o '"batch1_decode_ms_per_token":[^,]*' "$W/batch1_r$r.json")" \
          "$(grep -o '"fraction_of_weight_floor":[^,]*' "$W/batch1_r$r.json")"
      done ;;
    *)
      echo "unknown suite $s (kernels, backend, serve, batch1)" >&2
      rc=2 ;;
  esac
  note "$s: rc=$rc in $(($(date +%s) - t0)) s"
  [ "$rc" = 0 ] || status=1
done
cat "$W/summary.txt"
tar -C "$OUT" -czf "$OUT/suite.tgz" suite && rm -rf "$W"
exit $status
