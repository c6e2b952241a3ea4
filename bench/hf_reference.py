#!/usr/bin/env python3
"""Side-by-side reference: PyTorch + transformers LlamaForCausalLM with random weights.

Builds the model from a Hugging Face config.json (default bench/configs/llama3-8b/config.json)
directly on the device in bf16 (no checkpoint: speed does not depend on the weight values) and
measures, after warm-up:

  (a) batch-1 decode: model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N,
      cache_implementation="static") on a --prompt-len prompt; time to first token measured
      separately with max_new_tokens=1; ms/token = (total - ttft) / (N - 1), since the first of
      the N tokens comes out of the prefill and N - 1 decode steps follow it;
  (b) prefill: one forward over a --prefill-len (4096) prompt (logits of the last position only,
      no cache), and the time to first token of that prompt through generate(max_new_tokens=1);
  (c) with --batch-decode B: decode throughput at batch B over a --batch-ctx (4096) prompt.

The weight-read floor: every parameter matrix a decode step reads (the LM head included; the
input embedding is only a row gather, so it is not counted, unless tied to the LM head, where the
matrix counts once) divided by the device-to-device copy bandwidth, measured here as in
bench_decode_attention: a 2 GiB copy, bytes read + written / time, median of 10 after 2 warm-ups.

torch.compile is off unless --compile (transformers' generate would otherwise auto-compile the
decode step of a static cache; we pass disable_compile=True where this transformers knows it).
When a generate option is not accepted (transformers API drift) the script falls back (default
dynamic cache, no disable_compile) and records it under "fallbacks" in the JSON.

Examples (device machine):
  python3 bench/hf_reference.py --out /tmp/hf_ref.json
  python3 bench/hf_reference.py --attn eager --batch-decode 16 --out /tmp/hf_ref_eager.json
Smoke run on a CPU:
  python3 bench/hf_reference.py --device cpu --tiny --prompt-len 16 --new-tokens 8 --prefill-len 256
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "llama3-8b",
                              "config.json")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn):
    """Wall time of fn() in ms, the device drained before and after."""
    sync(dev)
    t0 = time.perf_counter()
    r = fn()
    sync(dev)
    return (time.perf_counter() - t0) * 1e3, r


def median(xs):
    return statistics.median(xs) if xs else None


def git_commit():
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def copy_bandwidth_gbps(dev, nbytes):
    """Device-to-device copy of nbytes: (read + written bytes) / time, median of 10 after 2."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    b = torch.empty_like(a)
    ms = []
    for i in range(12):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            e.synchronize()
            t = s.elapsed_time(e)
        else:
            t, _ = timed(dev, lambda: b.copy_(a))
        if i >= 2:
            ms.append(t)
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * nbytes / (median(ms) * 1e-3) / 1e9


def load_config(path, tiny, attn):
    import transformers
    with open(path) as f:
        d = json.load(f)
    if tiny:
        d.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model_type = d.pop("model_type", "llama")
    cfg = transformers.AutoConfig.for_model(model_type, **d)
    # Both spellings: 4.x reads _attn_implementation, 5.x has a setter as well.
    try:
        cfg._attn_implementation = attn
    except Exception:
        pass
    return cfg


def rope_theta_of(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return rp["rope_theta"]
    return getattr(cfg, "rope_theta", None)


def build_model(cfg, dev, dtype, attn, fallbacks):
    import transformers
    cls = getattr(transformers, (cfg.architectures or ["LlamaForCausalLM"])[0], None)
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype, on dev: no fp32 detour
    try:
        with torch.device(dev):
            model = None
            for kw in ({"dtype": dtype, "attn_implementation": attn},
                       {"torch_dtype": dtype, "attn_implementation": attn}):
                try:
                    if cls is transformers.AutoModelForCausalLM:
                        model = cls.from_config(cfg, **kw)
                    else:
                        model = cls._from_config(cfg, **kw)
                    break
                except TypeError as e:
                    fallbacks.append(f"_from_config({', '.join(kw)}) failed: {e}")
            if model is None:
                model = cls(cfg)
                fallbacks.append("constructed with cls(config)")
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=dev, dtype=dtype).eval()
    # Our own init, on the device (cheap), whatever transformers did or skipped: matrices
    # N(0, 0.02), vectors (norm weights) 1. Keeps activations finite over 32 layers.
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)
    return model


def decode_weight_bytes(model):
    """Bytes of the parameters one decode step reads: all of them but the input embedding (a row
    gather), the LM head included; a tied embedding/LM head matrix counts once."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None else None
    total = 0
    for p in model.parameters():  # tied parameters come once
        if p is emb and head_w is not emb:
            continue
        total += p.numel() * p.element_size()
    emb_bytes = emb.numel() * emb.element_size()
    return total, emb_bytes


class Generator:
    """model.generate with the options we want, falling back where this transformers refuses."""

    def __init__(self, model, dev, want_static, want_compile, fallbacks, pad_id):
        self.model, self.dev, self.fallbacks = model, dev, fallbacks
        self.static = want_static
        self.disable_compile = not want_compile
        self.use_disable_compile = True
        self.pad_id = pad_id
        self.compile_mode = "off"

    def kwargs(self, n):
        kw = dict(do_sample=False, min_new_tokens=n, max_new_tokens=n, use_cache=True,
                  pad_token_id=self.pad_id)
        if self.static:
            kw["cache_implementation"] = "static"
        if self.use_disable_compile:
            kw["disable_compile"] = self.disable_compile
        return kw

    def probe(self, ids):
        """One short generate to settle the options (and catch API drift early)."""
        while True:
            try:
                with torch.inference_mode():
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                              **self.kwargs(2))
                assert out.shape[1] == ids.shape[1] + 2, out.shape
                break
            except Exception as e:  # noqa: BLE001 - API drift shows up as several types
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if self.use_disable_compile and "disable_compile" in str(e):
                    self.use_disable_compile = False
                    self.fallbacks.append(f"generate refused disable_compile ({msg}); dropped")
                elif self.static:
                    self.static = False
                    self.fallbacks.append(
                        f"static cache failed ({msg}); using the default (dynamic) cache")
                elif self.use_disable_compile:
                    self.use_disable_compile = False
                    self.fallbacks.append(f"generate failed ({msg}); dropped disable_compile")
                else:
                    raise
        if not self.disable_compile:
            self.compile_mode = ("transformers auto-compile of the decode step"
                                 if self.use_disable_compile and self.static
                                 else "torch.compile(model.forward)")
            if self.compile_mode.startswith("torch.compile"):
                self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead")
        elif not self.use_disable_compile and self.static:
            self.compile_mode = "unknown: this transformers may auto-compile a static cache"

    def run(self, ids, n):
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **self.kwargs(n))
        return out.shape[1] - ids.shape[1]

    def time(self, ids, n, warmup, reps):
        for _ in range(warmup):
            self.run(ids, n)
        ts, got = [], None
        for _ in range(reps):
            t, got = timed(self.dev, lambda: self.run(ids, n))
            ts.append(t)
        return ts, got


def prefill_forward(model, ids):
    with torch.inference_mode():
        for kw in ({"logits_to_keep": 1}, {"num_logits_to_keep": 1}, {}):
            try:
                return model(input_ids=ids, use_cache=False, **kw), kw
            except TypeError:
                continue
    raise RuntimeError("forward refused every logits_to_keep spelling")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="a Hugging Face config.json")
    ap.add_argument("--tiny", action="store_true",
                    help="shrink to 2 layers, hidden 256 (smoke runs)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--compile", action="store_true",
                    help="let generate compile the decode step (default: off)")
    ap.add_argument("--prompt-len", type=int, default=128, help="batch-1 decode prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="batch-1 decode tokens (N)")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--batch-decode", type=int, default=0,
                    help="also measure decode throughput at this batch (e.g. 16); 0: skip")
    ap.add_argument("--batch-ctx", type=int, default=4096, help="prompt length of --batch-decode")
    ap.add_argument("--batch-new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--copy-mib", type=int, default=2048,
                    help="size of the copy-bandwidth test (default 2 GiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON here (it is printed to stdout as well)")
    a = ap.parse_args()
    if a.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")

    import transformers
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for a smoke run)")
    dtype = DTYPES[a.dtype]
    torch.manual_seed(a.seed)
    fallbacks = []
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    cfg_name = os.path.basename(os.path.dirname(os.path.abspath(a.config))) + (
        " (tiny: 2 layers, hidden 256)" if a.tiny else "")
    res = {"device": device_name, "torch": torch.__version__,
           "transformers": transformers.__version__, "config": cfg_name,
           "config_path": os.path.relpath(os.path.abspath(a.config)), "dtype": str(dtype).split(".")[-1],
           "attn_implementation": a.attn, "commit": git_commit(),
           "command": "python3 " + " ".join(shlex.quote(x) for x in sys.argv)}

    copy_bytes = a.copy_mib << 20
    if dev.type == "cpu" and a.copy_mib == 2048:
        copy_bytes = 256 << 20  # smoke runs: keep the CPU copy short
    log(f"device {device_name}; measuring copy bandwidth ({copy_bytes >> 20} MiB)...")
    bw = copy_bandwidth_gbps(dev, copy_bytes)
    res.update(copy_bandwidth_gb_s=bw, copy_bytes=copy_bytes)
    log(f"copy bandwidth {bw:.0f} GB/s (read + written)")

    cfg = load_config(a.config, a.tiny, a.attn)
    t0 = time.perf_counter()
    model = build_model(cfg, dev, dtype, a.attn, fallbacks)
    sync(dev)
    res["build_s"] = time.perf_counter() - t0
    res["attn_implementation_used"] = getattr(model.config, "_attn_implementation", None)
    nparams = sum(p.numel() for p in model.parameters())
    wbytes, emb_bytes = decode_weight_bytes(model)
    floor = bw * 1e9 / wbytes
    res.update(params=nparams, weight_bytes=wbytes, input_embedding_bytes_not_counted=emb_bytes,
               weight_floor_tokens_per_s=floor,
               model_shape={k: getattr(cfg, k, None) for k in (
                   "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                   "max_position_embeddings")} | {"rope_theta": rope_theta_of(cfg)})
    log(f"built {nparams / 1e9:.3f} B params in {res['build_s']:.1f} s; decode reads "
        f"{wbytes / 1e9:.2f} GB of weights: floor {floor:.1f} tokens/s")

    vocab = cfg.vocab_size
    eos = cfg.eos_token_id
    pad = (eos[0] if isinstance(eos, (list, tuple)) else eos)
    pad = 0 if pad is None else pad

    def prompt(b, n):
        # Token ids away from the special ones; values do not matter for speed.
        return torch.randint(0, min(vocab, 100000), (b, n), device=dev)

    gen = Generator(model, dev, want_static=True, want_compile=a.compile, fallbacks=fallbacks,
                    pad_id=pad)
    ids = prompt(1, a.prompt_len)
    gen.probe(ids)
    res.update(cache="static" if gen.static else "dynamic (default)", compile=gen.compile_mode)
    log(f"cache {res['cache']}, compile {gen.compile_mode}")

    # (a) batch-1 decode.
    ttft, _ = gen.time(ids, 1, a.warmup, a.reps)
    tot, got = gen.time(ids, a.new_tokens, a.warmup, a.reps)
    if got != a.new_tokens:
        fallbacks.append(f"batch-1 generate made {got} tokens, not {a.new_tokens}")
    steps = got - 1
    ms_tok = (median(tot) - median(ttft)) / steps
    res.update(batch1_prompt_len=a.prompt_len, batch1_new_tokens=got, batch1_decode_steps=steps,
               batch1_ttft_ms=median(ttft), batch1_total_ms=median(tot),
               batch1_total_ms_all=tot, batch1_ttft_ms_all=ttft,
               batch1_decode_ms_per_token=ms_tok, batch1_decode_tokens_per_s=1e3 / ms_tok,
               fraction_of_floor=(1e3 / ms_tok) / floor)
    log(f"batch 1: ttft {median(ttft):.1f} ms, {ms_tok:.2f} ms/token "
        f"({1e3 / ms_tok:.1f} tokens/s, {100 * res['fraction_of_floor']:.1f}% of the floor)")

    # (b) prefill of a long prompt: one forward, and time to first token through generate.
    ids = prompt(1, a.prefill_len)
    for _ in range(max(1, a.warmup)):
        _, kw = prefill_forward(model, ids)
    if not kw:
        fallbacks.append("forward refused logits_to_keep: prefill computes all logits")
    pts = [timed(dev, lambda: prefill_forward(model, ids))[0] for _ in range(a.reps)]
    t4k, _ = gen.time(ids, 1, a.warmup, a.reps)
    res.update(prefill_len=a.prefill_len, prefill_forward_ms=median(pts),
               prefill_forward_ms_all=pts, prefill_4k_tokens_per_s=a.prefill_len / median(pts) * 1e3,
               prefill_logits=("last position only" if kw else "all positions"),
               ttft_4k_ms=median(t4k), ttft_4k_ms_all=t4k)
    log(f"prefill {a.prefill_len}: forward {median(pts):.1f} ms "
        f"({res['prefill_4k_tokens_per_s']:.0f} tokens/s), ttft {median(t4k):.1f} ms")
    del ids

    # (c) decode throughput at batch B over a long context.
    if a.batch_decode > 0:
        B, n = a.batch_decode, a.batch_new_tokens
        ids = prompt(B, a.batch_ctx)
        reps = max(1, min(a.reps, 3))
        bt, _ = gen.time(ids, 1, 1, reps)
        bn, got = gen.time(ids, n, 1, reps)
        steps = got - 1
        step_ms = (median(bn) - median(bt)) / steps
        kv_bytes = (2 * B * (a.batch_ctx + n // 2) * cfg.num_hidden_layers * cfg.num_key_value_heads
                    * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
                    * torch.finfo(dtype).bits // 8)
        bfloor = B * bw * 1e9 / (wbytes + kv_bytes)
        res.update(batch_decode=B, batch_ctx=a.batch_ctx, batch_new_tokens=got,
                   batch_ttft_ms=median(bt), batch_total_ms=median(bn), batch_step_ms=step_ms,
                   batch_decode_tokens_per_s=B * 1e3 / step_ms,
                   batch_kv_bytes_per_step=kv_bytes, batch_floor_tokens_per_s=bfloor,
                   batch_fraction_of_floor=(B * 1e3 / step_ms) / bfloor)
        log(f"batch {B} x ctx {a.batch_ctx}: step {step_ms:.2f} ms "
            f"({B * 1e3 / step_ms:.0f} tokens/s; floor with KV reads {bfloor:.0f})")
        del ids

    if dev.type == "cuda":
        res["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    res["fallbacks"] = fallbacks

    rows = [("device", device_name), ("torch / transformers", f"{res['torch']} / {res['transformers']}"),
            ("config", cfg_name), ("dtype / attention", f"{res['dtype']} / {res['attn_implementation_used']}"),
            ("cache / compile", f"{res['cache']} / {res['compile']}"),
            ("copy bandwidth (GB/s, r+w)", f"{bw:.0f}"),
            ("weight bytes per decode step (GB)", f"{wbytes / 1e9:.3f}"),
            ("weight-read floor (tokens/s)", f"{floor:.1f}"),
            (f"batch-1 TTFT, {a.prompt_len}-token prompt (ms)", f"{res['batch1_ttft_ms']:.2f}"),
            ("batch-1 decode (ms/token)", f"{ms_tok:.3f}"),
            ("batch-1 decode (tokens/s)", f"{1e3 / ms_tok:.1f}"),
            ("batch-1 decode, fraction of floor", f"{100 * res['fraction_of_floor']:.1f}%"),
            (f"prefill {a.prefill_len} (tokens/s)", f"{res['prefill_4k_tokens_per_s']:.0f}"),
            (f"TTFT, {a.prefill_len}-token prompt (ms)", f"{res['ttft_4k_ms']:.1f}")]
    if a.batch_decode > 0:
        rows += [(f"batch-{a.batch_decode} x {a.batch_ctx} decode (tokens/s)",
                  f"{res['batch_decode_tokens_per_s']:.0f}"),
                 (f"batch-{a.batch_decode} fraction of floor (weights + KV)",
                  f"{100 * res['batch_fraction_of_floor']:.1f}%")]
    w = max(len(k) for k, _ in rows)
    print("| what | value |\n| --- | ---: |", file=sys.stderr)
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |", file=sys.stderr)
    if fallbacks:
        log("fallbacks: " + "; ".join(fallbacks))
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
