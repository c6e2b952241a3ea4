#!/usr/bin/env bash
# KV-cache quality table: perplexity and greedy agreement (vs a 16-bit cache) of pmkv's KV
# configurations at equal memory, on a model and a held-out text (pmkv eval, CPU backend).
#   bench/kv_quality.sh MODEL_DIR TEXT [WINDOW] [CHUNK] [MAX_TOKENS]
# Budgets "= uniform b-bit" are the pages a uniform b-bit cache needs at WINDOW tokens
# (kv_cache.budget.uniform_bits + max_len), so every row at one budget holds the same memory.
# Prints a markdown table; writes one JSON per configuration under bench/results/kv_quality/MODEL/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
TEXT=$2
WINDOW=${3:-1024}
CHUNK=${4:-16}
MAX_TOKENS=${5:-0}
PMKV=${PMKV:-build/pmkv}
OUT=bench/results/kv_quality/$(basename "$MODEL")
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
W=${KV_WINDOW_TOKENS:-128}

cfg() {  # name, yaml body
  printf 'kv_cache:\n  window_tokens: %s\n%s\n' "$W" "$2" > "$TMP/$1.yaml"
}
cfg uniform-16 "  init_bits: 16"
cfg uniform-8 "  init_bits: 8"
cfg uniform-4 "  init_bits: 4"
cfg uniform-2 "  init_bits: 2"
for b in 4 2; do
  for p in block oldest_first; do
    cfg "pmkvq-$p-budget$b" "  policy: $p
  budget: {uniform_bits: $b, max_len: $WINDOW}"
  done
done

extra=()
[ "$MAX_TOKENS" != 0 ] && extra=(--max-tokens "$MAX_TOKENS")
echo "| configuration | perplexity | vs 16-bit | greedy agreement | KV bytes at window end | token-layers at 16/8/4/2 bits at window end |"
echo "| --- | --- | --- | --- | --- | --- |"
for name in uniform-16 uniform-8 uniform-4 uniform-2 pmkvq-block-budget4 pmkvq-oldest_first-budget4 \
            pmkvq-block-budget2 pmkvq-oldest_first-budget2; do
  "$PMKV" eval --model "$MODEL" --text "$TEXT" --window "$WINDOW" --chunk "$CHUNK" \
      --kv-config "$TMP/$name.yaml" "${extra[@]}" 2>/dev/null > "$OUT/$name.json" || {
    echo "| $name | (failed: $(tail -1 "$OUT/$name.json" 2>/dev/null)) | | | | |"; continue; }
  python3 - "$OUT/$name.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); r = d["result"]
bits = r["kv_token_layers_by_bits_per_window_end"]
print(f"| {sys.argv[2]} | {d['perplexity']:.4f} | {d['perplexity_ratio_vs_16bit']:.4f} | "
      f"{d['greedy_agreement']:.4f} | {r['kv_bytes_per_window_end']:.0f} | "
      + "/".join(f"{bits[b]:.0f}" for b in ("16", "8", "4", "2")) + " |")
PY
done
