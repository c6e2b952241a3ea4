#!/usr/bin/env bash
# Same-machine A/B of decode-attention builds: runs each binary (bench_decode_attention builds, by
# name under .gpubin/) over the same points, two interleaved rounds, and prints each point's
# minimum time per binary and the ratios to the first. Writes the raw JSON lines to $OUT.
#   OUT=/tmp/ab BITS=16 BATCH=16,64 CTX=4096,16384 bash bench/ab_decode.sh base_build new_build
# EXTRA: more bench_decode_attention arguments (e.g. --ctas-per-sm 1).
set -euo pipefail
: "${OUT:?set OUT to a directory}"
mkdir -p "$OUT"
ARGS="--kv-heads 8 --group 4 --head-dim 128 --tokens16 ${TOKENS16:-32} --batch ${BATCH:-1,16,64}"
ARGS="$ARGS --ctx ${CTX:-1024,4096,16384,65536} --bits ${BITS:-16,8,4,2} ${EXTRA:-}"
for r in 1 2; do
  for b in "$@"; do
    ".gpubin/$b" $ARGS --out "$OUT/ab_${b}_r$r.jsonl" >/dev/null 2>&1
  done
done
python3 - "$OUT" "$@" <<'PY'
import json, sys
out, bins = sys.argv[1], sys.argv[2:]
res = {}
for b in bins:
    for r in (1, 2):
        for line in open(f"{out}/ab_{b}_r{r}.jsonl"):
            j = json.loads(line)
            res.setdefault(b, {}).setdefault((j["bits"], j["batch"], j["context"]), []).append(j["time_us"])
print("point", *bins, *(f"{b}/{bins[0]}" for b in bins[1:]))
for k in sorted(res[bins[0]], key=lambda x: (-x[0], x[1], x[2])):
    t = [min(res[b][k]) for b in bins]
    print(k, *[f"{x:.1f}" for x in t], *[f"{x / t[0]:.3f}" for x in t[1:]])
PY
