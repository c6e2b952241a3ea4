#!/usr/bin/env bash
# Step 2 of tools/refmodel: train the sentencepiece tokenizer of models/pmkv-ref on the training
# split (never on the held-out split) with Debian's spm_train (package sentencepiece).
#
#   bash tools/refmodel/train_tokenizer.sh /tmp/pmkv-corpus/corpus [VOCAB]
#
# writes CORPUS/tokenizer.model and CORPUS/tokenizer.vocab. BPE with byte fallback, Llama's ids
# (unk 0, <s> 1, </s> 2, no pad), <|im_start|> and <|im_end|> as user-defined symbols (ids 3 and 4,
# single tokens wherever they appear in text), identity normalization with whitespace kept as is
# (indentation matters in documentation), digits split one by one. Deterministic: spm_train's
# sentence sampling uses a fixed seed (--random_seed).
set -euo pipefail
corpus=${1:?usage: train_tokenizer.sh CORPUS_DIR [VOCAB]}
vocab=${2:-12000}
# one line per sentence for spm_train: the document separator lines are dropped
grep -av $'^\x1e$' "$corpus/train.txt" | grep -av '^$' > "$corpus/spm_input.txt"
spm_train \
  --input="$corpus/spm_input.txt" \
  --model_prefix="$corpus/tokenizer" \
  --model_type=bpe \
  --vocab_size="$vocab" \
  --byte_fallback=true \
  --character_coverage=0.9995 \
  --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 \
  --user_defined_symbols='<|im_start|>,<|im_end|>' \
  --normalization_rule_name=identity \
  --remove_extra_whitespaces=false \
  --allow_whitespace_only_pieces=true \
  --split_digits=true \
  --max_sentence_length=8192 \
  --input_sentence_size=2000000 \
  --shuffle_input_sentence=true \
  --random_seed=1234 \
  --num_threads="$(nproc)"
rm -f "$corpus/spm_input.txt"
