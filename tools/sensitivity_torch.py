#!/usr/bin/env python3
"""PM-KVQ's gradient-based KV sensitivity with PyTorch/transformers, to check `pmkv calibrate
sensitivity` (which measures the KL divergence directly) ranks layers the same way.

For each calibration sample (the same token windows: the offsets `pmkv calibrate sensitivity`
wrote into its JSON), one forward with positions stretched by `stretch` and one backward of the LM
loss; for each layer l and bits b:
    s_K[b][l] += mean(|(Q_b(K) - K) * dL/dK|)   (K after RoPE; same for V)
paired by layer index (the released code pairs layer i with layer L-1-i's gradient: a defect).
Q_b is PM-KVQ's quantizer: per token and KV head, asymmetric RTN, group = head_dim.

usage: sensitivity_torch.py --model DIR --text FILE --pmkv-json SENS.json [--out FILE.json]
Prints the Spearman rank correlation of the per-layer sensitivities, per bit-width, for K and V.
"""
import argparse
import json

import numpy as np
import sentencepiece as spm
import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.models.llama import modeling_llama

CAPTURED = {}


def capture_attention(module, query, key, value, attention_mask, **kwargs):
    key.retain_grad()
    value.retain_grad()
    CAPTURED[module.layer_idx] = (key, value)
    return modeling_llama.eager_attention_forward(module, query, key, value, attention_mask,
                                                  **kwargs)


def quantize(x, bits):
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(1e-5, 1e5)
    q = torch.clamp(torch.round((x - lo) / scale), 0, 2 ** bits - 1)
    return q * scale + lo


def spearman(a, b):
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--pmkv-json", required=True)
    ap.add_argument("--out")
    args = ap.parse_args()
    ours = json.load(open(args.pmkv_json))
    sp = spm.SentencePieceProcessor(model_file=f"{args.model}/tokenizer.model")
    tokens = [sp.bos_id()] + sp.encode(open(args.text, encoding="utf-8").read())
    AttentionInterface.register("capture", capture_attention)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                                 attn_implementation="capture")
    model.eval()
    bits = ours["bits"]
    layers = model.config.num_hidden_layers
    sk = {b: np.zeros(layers) for b in bits}
    sv = {b: np.zeros(layers) for b in bits}
    seq_len, stretch = ours["seq_len"], ours["stretch"]
    for off in ours["offsets"]:
        ids = torch.tensor([tokens[off:off + seq_len]])
        pos = torch.arange(0, seq_len * stretch, stretch).unsqueeze(0)
        CAPTURED.clear()
        out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
        for l in range(layers):
            k, v = CAPTURED[l]
            for b in bits:
                sk[b][l] += ((quantize(k.detach(), b) - k.detach()) * k.grad).abs().mean().item()
                sv[b][l] += ((quantize(v.detach(), b) - v.detach()) * v.grad).abs().mean().item()
        model.zero_grad()
    n = len(ours["offsets"])
    result = {"bits": bits, "method": "gradient_taylor (PM-KVQ)", "transformers": transformers.__version__,
              "k": {str(b): (sk[b] / n).tolist() for b in bits},
              "v": {str(b): (sv[b] / n).tolist() for b in bits}, "spearman": {}}
    for b in bits:
        for kind in ("k", "v"):
            r = spearman(np.array(ours[kind][str(b)]), np.array(result[kind][str(b)]))
            result["spearman"][f"{kind}{b}"] = r
            print(f"{kind.upper()} {b:>2} bits: spearman {r:+.3f}  pmkv "
                  f"{np.round(ours[kind][str(b)], 5).tolist()}  torch "
                  f"{np.round(result[kind][str(b)], 6).tolist()}")
    # Combined K+V per layer at the lowest bits: what the allocator ranks.
    lo = str(min(bits))
    a = np.array(ours["k"][lo]) + np.array(ours["v"][lo])
    t = np.array(result["k"][lo]) + np.array(result["v"][lo])
    result["spearman"][f"kv{lo}"] = spearman(a, t)
    print(f"K+V {lo} bits: spearman {spearman(a, t):+.3f}")
    if args.out:
        json.dump(result, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
