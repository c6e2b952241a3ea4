#!/usr/bin/env python3
"""PyTorch SDPA peer of bench_decode_attention: decode attention over bf16 K/V of the same shapes.

q [B, Hq, 1, D], K/V [B, Hkv, ctx, D] bf16, enable_gqa=True (falls back to repeat_interleave'd
K/V when this torch lacks enable_gqa; the JSON says which). Times each call with torch.cuda
events (median), rotating over enough K/V copies that L2 cannot hold them. One JSON line per
(batch, context).
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--ctx", default="1024,4096,16384,65536")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--min-time-ms", type=float, default=300)
    ap.add_argument("--out", default="-")
    a = ap.parse_args()
    out = sys.stdout if a.out == "-" else open(a.out, "w")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    torch.manual_seed(0)
    for batch in [int(x) for x in a.batch.split(",")]:
        for ctx in [int(x) for x in a.ctx.split(",")]:
            kv_bytes = 2 * batch * a.kv_heads * ctx * a.head_dim * 2
            q_bytes = batch * a.q_heads * a.head_dim * 2
            rot = max(1, min(1024, math.ceil(4 * l2 / kv_bytes)))
            free, _ = torch.cuda.mem_get_info()
            rec = {"batch": batch, "context": ctx, "q_heads": a.q_heads, "kv_heads": a.kv_heads,
                   "head_dim": a.head_dim, "dtype": "bfloat16", "torch": torch.__version__,
                   "device": props.name}
            if rot * kv_bytes + (2 << 30) > free:
                rec["skipped"] = "does not fit in device memory"
                print(json.dumps(rec), file=out, flush=True)
                continue
            qs = [torch.randn(batch, a.q_heads, 1, a.head_dim, device=dev, dtype=torch.bfloat16)
                  for _ in range(rot)]
            ks = [torch.randn(batch, a.kv_heads, ctx, a.head_dim, device=dev, dtype=torch.bfloat16)
                  for _ in range(rot)]
            vs = [torch.randn(batch, a.kv_heads, ctx, a.head_dim, device=dev, dtype=torch.bfloat16)
                  for _ in range(rot)]
            mode = "enable_gqa"

            def call(i):
                if mode == "enable_gqa":
                    return F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=True)
                rep = a.q_heads // a.kv_heads
                return F.scaled_dot_product_attention(
                    qs[i], ks[i].repeat_interleave(rep, 1), vs[i].repeat_interleave(rep, 1))

            try:
                call(0)
            except TypeError:
                mode = "repeat_interleave (timing includes the repeat)"
            for i in range(max(3, rot)):
                call(i % rot)
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            call(0)
            e.record()
            torch.cuda.synchronize()
            once = s.elapsed_time(e)
            reps = int(min(500, max(30, a.min_time_ms / max(once, 1e-3))))
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(reps)]
            for i, (s, e) in enumerate(evs):
                s.record()
                call(i % rot)
                e.record()
            torch.cuda.synchronize()
            ms = sorted(s.elapsed_time(e) for s, e in evs)
            t_us = ms[len(ms) // 2] * 1e3
            bytes_ = kv_bytes + 2 * q_bytes
            rec.update({"mode": mode, "time_us": t_us, "time_us_p10": ms[len(ms) // 10] * 1e3,
                        "time_us_p90": ms[len(ms) * 9 // 10] * 1e3, "reps": reps, "rotation": rot,
                        "bytes": bytes_, "effective_gbps": bytes_ / (t_us * 1e-6) / 1e9})
            print(json.dumps(rec), file=out, flush=True)
            print(f"sdpa batch {batch} ctx {ctx}: {t_us:.1f} us ({mode})", file=sys.stderr)
            del qs, ks, vs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
