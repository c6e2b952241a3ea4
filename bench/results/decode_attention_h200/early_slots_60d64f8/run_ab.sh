#!/usr/bin/env bash
# Device call: early-slot A/B of decode attention (2/4 bits), then the attention tests of the
# fastest variant. Run from the repository root with carry [".gpubin"].
set -u
cd .gpubin && tar -xJf ab.txz && cd ..
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
OUT=$OUT/ab BITS=2,4 BATCH=1,16,64 CTX=4096,16384 EXTRA="--min-time-ms 200" \
  bash bench/ab_decode.sh bda_e0 bda_e1 bda_e2 bda_e3 | tee $OUT/ab_table.txt
best=$(python3 - "$OUT/ab" <<'PY'
import json, sys
out = sys.argv[1]
tot = {}
for b in ("bda_e0", "bda_e1", "bda_e2", "bda_e3"):
    best = {}
    for r in (1, 2):
        for line in open(f"{out}/ab_{b}_r{r}.jsonl"):
            j = json.loads(line)
            if j["batch"] >= 16:
                k = (j["bits"], j["batch"], j["context"])
                best[k] = min(best.get(k, 1e9), j["time_us"])
    tot[b] = sum(best.values())
print(min(tot, key=tot.get), file=sys.stdout)
print(tot, file=sys.stderr)
PY
)
echo "fastest at batch >= 16: $best"
e=${best#bda_e}
if [ "$e" != 0 ]; then
  timeout 240 .gpubin/tgk_e$e "[attention]" > $OUT/test_e$e.log 2>&1
  echo "tests e$e rc=$?"; tail -3 $OUT/test_e$e.log
fi
