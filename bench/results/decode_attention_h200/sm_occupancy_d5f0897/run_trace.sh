#!/usr/bin/env bash
# Device call: does the oldest CTA of an SM run as if alone? 2 bits, 16K tokens, 4 KV heads, one
# item a run (--dense always): batch 33 / 66 / 99 / 132 = 1 / 2 / 3 / 4 CTAs an SM on 132 SMs.
set -u
xz -dk .gpubin/bda_trace.xz && chmod +x .gpubin/bda_trace
mkdir -p $OUT/tr
PMKV_TRACE_DIR=$OUT/tr .gpubin/bda_trace --bits 2 --kv-heads 4 --group 4 --batch 33,66,99,132 \
  --ctx 16384 --dense always --min-time-ms 100 --out $OUT/points.jsonl > /dev/null
python3 bench/decode_trace_report.py $OUT/tr/*.txt > $OUT/report.txt
grep -E "txt:|first tile -|loop end |CTAs per SM|rank [0-9]|strict" $OUT/report.txt
python3 -c "
import json
for l in open('$OUT/points.jsonl'):
    j = json.loads(l); print(j['batch'], j['time_us'], j['items'], j['dense'])"
