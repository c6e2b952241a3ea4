#!/usr/bin/env python3
"""PyTorch reference perplexity of a Hugging Face model directory on a text file, by the eval
protocol of models/pmkv-ref/README.md (what `pmkv eval --model DIR --text FILE` must match):

1. tokens = [BOS] + sentencepiece Encode(whole file as one string) (tokenizer.model of DIR);
2. split into consecutive non-overlapping windows of --window (2048) tokens, the last one shorter;
3. each window is evaluated independently from scratch (positions 0..len-1); its first token is
   predicted by nothing, so a window of n tokens contributes n-1 predictions;
4. perplexity = exp(total NLL / total predicted tokens) (natural log).

The model runs in transformers' LlamaForCausalLM on the CPU in float32 (bf16 weights upcast
exactly), eager attention.

    /path/to/venv-with-torch-and-transformers/bin/python tools/refmodel/eval_ppl.py \\
        --model models/pmkv-ref --text models/pmkv-ref/heldout.txt
"""
import argparse
import json
import math
import time

import sentencepiece as spm
import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import LlamaForCausalLM
    dtype = getattr(torch, a.dtype)
    sp = spm.SentencePieceProcessor(model_file=f"{a.model}/tokenizer.model")
    text = open(a.text, encoding="utf-8").read()
    ids = [sp.bos_id()] + sp.encode(text)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="eager").eval()
    t0 = time.time()
    nll, cnt, per_window = 0.0, 0, []
    with torch.no_grad():
        for s in range(0, len(ids), a.window):
            w = torch.tensor(ids[s:s + a.window])[None]
            if w.size(1) < 2:
                continue
            logits = model(w).logits.to(torch.float64)
            l = F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
            nll += l
            cnt += w.size(1) - 1
            per_window.append(round(l / (w.size(1) - 1), 5))
    out = {"perplexity": math.exp(nll / cnt), "nll": nll, "mean_nll": nll / cnt, "tokens": len(ids),
           "predicted_tokens": cnt, "windows": len(per_window), "window": a.window,
           "text_bytes": len(text.encode()), "bits_per_byte": nll / math.log(2) / len(text.encode()),
           "dtype": a.dtype, "seconds": round(time.time() - t0, 1), "per_window_mean_nll": per_window}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
