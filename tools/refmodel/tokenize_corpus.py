#!/usr/bin/env python3
"""Step 3 of tools/refmodel: pre-tokenize the corpus for training.

    python3 tools/refmodel/tokenize_corpus.py --corpus /tmp/pmkv-corpus/corpus --out .refmodel_carry

Each document of CORPUS/train.txt and CORPUS/heldout.txt (separated by "\\x1e" lines) becomes
<s> (1) + sentencepiece ids + </s> (2); documents are concatenated in file order into
OUT/train.u16 and OUT/heldout.u16 (little-endian uint16), compressed to .u16.xz. OUT/meta.json
records token counts, the vocabulary size and the sha256 of the tokenizer. The tokenizer is copied
to OUT/tokenizer.model. Deterministic.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import shutil
import subprocess
from pathlib import Path

import numpy as np
import sentencepiece as spm

_sp = None


def _init(model):
    global _sp
    _sp = spm.SentencePieceProcessor(model_file=model)


def _enc(docs):
    out = []
    for d in docs:
        ids = [1] + _sp.encode(d) + [2]
        out.append(np.asarray(ids, dtype=np.uint16))
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def read_docs(path):
    text = Path(path).read_text(encoding="utf-8")
    docs = [d.strip("\n") for d in text.split("\n\x1e\n")]
    return [d for d in docs if d]


def encode_file(src, model, procs):
    docs = read_docs(src)
    chunks = [docs[i:i + 64] for i in range(0, len(docs), 64)]
    with mp.Pool(procs, initializer=_init, initargs=(model,)) as pool:
        parts = pool.map(_enc, chunks, chunksize=4)
    return np.concatenate(parts), len(docs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, help="default: CORPUS/tokenizer.model")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--procs", type=int, default=mp.cpu_count())
    args = ap.parse_args()
    model = str(args.tokenizer or args.corpus / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.vocab_size() <= 65536
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": sp.vocab_size(), "bos_id": 1, "eos_id": 2,
            "tokenizer_sha256": hashlib.sha256(Path(model).read_bytes()).hexdigest(), "format": "uint16 little-endian; each document is <s> ids </s>"}
    for split in ("train", "heldout"):
        src = args.corpus / f"{split}.txt"
        ids, ndocs = encode_file(src, model, args.procs)
        raw = args.out / f"{split}.u16"
        ids.astype("<u2").tofile(raw)
        subprocess.run(["xz", "-f", "-T0", "-9", str(raw)], check=True)
        nbytes = src.stat().st_size
        meta[split] = {"documents": ndocs, "tokens": int(ids.size), "text_bytes": nbytes,
                       "bytes_per_token": round(nbytes / ids.size, 4),
                       "xz_bytes": (args.out / f"{split}.u16.xz").stat().st_size}
        print(split, meta[split], flush=True)
    shutil.copy(model, args.out / "tokenizer.model")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
