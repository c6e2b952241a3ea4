#!/usr/bin/env python3
"""Summarizes a ktrace CSV (tools/ktrace/ktrace.cpp) of batch-1 decode (bench_cuda_backend
--scenarios batch1): for each decoder layer of steps FIRST..LAST, how long each kernel keeps the
critical path after the one before it ended (qkv GEMM, RoPE + KV write, decode attention, o,
gate/up, down), medians over the layers in us. Kernels start early under PDL, so "after the
previous end" is what a kernel adds to the step.

usage: layers.py TRACE.csv [FIRST LAST]
"""
import collections
import statistics
import sys

from ktrace_csv import int_arg, load


def kind(name):
    for key, k in (("bulk_gemm_kernel", "gemm"), ("skinny_gemm", "gemm"), ("decode_split", "attn"),
                   ("rope_kv", "rope"), ("embedding", "embed")):
        if key in name:
            return k
    return "other"


def main():
    first = int_arg(2, 5)
    last = int_arg(3, 20)
    ev = load(sys.argv[1])
    steps = [i for i, e in enumerate(ev) if kind(e[2]) == "embed"]
    # A layer's kernels in order; a kind absent from a step (RoPE fused away, say) is left out.
    full = [("gemm", "qkv"), ("rope", "rope"), ("attn", "attn"), ("gemm", "o"),
            ("gemm", "gate_up"), ("gemm", "down")]
    res = collections.defaultdict(list)
    for s in range(first, min(last + 1, len(steps) - 1)):
        seq = [e for e in ev[steps[s]:steps[s + 1]] if kind(e[2]) in ("gemm", "rope", "attn")]
        present = {kind(e[2]) for e in seq}
        pattern = [k for k, _ in full if k in present]
        names = [n for k, n in full if k in present]
        P = len(pattern)
        layers, i = [], 0
        while i + P <= len(seq):
            if [kind(e[2]) for e in seq[i:i + P]] == pattern:
                layers.append(seq[i:i + P])
                i += P
            else:
                i += 1
        for j in range(1, len(layers) - 1):  # whole layers with a layer before them
            ends = [layers[j - 1][-1][1]] + [e[1] for e in layers[j]]
            for k, n in enumerate(names):
                res[n].append((ends[k + 1] - ends[k]) / 1e3)
            res["layer"].append((ends[-1] - ends[0]) / 1e3)
    if not res:
        print("0 layers: no step matched a layer's kernel pattern")
        return
    print(f"{len(res['layer'])} layers, median us after the previous kernel's end:")
    print(" ".join(f"{k} {statistics.median(v):.1f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
