#!/usr/bin/env python3
"""Independent numpy (float64) oracle for the golden fixtures.

Recomputes the logits of the golden prompts from the saved bf16 safetensors with a plain numpy
implementation of the Llama/Mistral/Qwen2 forward pass (embedding, RMSNorm, RoPE rotate-half with default
or llama3 scaling, GQA causal attention with optional sliding window, q/k/v biases, SwiGLU, lm_head or tied
embedding) and compares them with the recorded transformers float32 logits. Also re-derives the greedy
continuations (argmax, no EOS stop) and compares the ids.

Usage:
  python tools/check_golden_numpy.py                      # every model and prompt under tests/fixtures/golden
  python tools/check_golden_numpy.py --model llama_gqa --prompt p0 --no-greedy
  python tools/check_golden_numpy.py --stories ../shared/models/stories260K   # converter check (see below)

--stories DIR runs tools/llama2c_to_hf.py on DIR/stories260K.bin into a temp dir, then compares a llama2.c
style forward (interleaved RoPE on the raw .bin weights) with this module's HF-layout forward on the
converted directory (this validates the wq/wk permutation), and checks the greedy continuation of
"Once upon a time" against tests/fixtures/stories260K_reference.json when present.

Exit status 0 when every compared logit is within --tol (default 1e-3) and all greedy ids match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import safetensors_np as stnp  # noqa: E402

REPO = os.path.dirname(HERE)
GOLDEN = os.path.join(REPO, "tests", "fixtures", "golden")


# ----------------------------------------------------------------------------------------------- config
def rope_settings(cfg: dict):
    """(theta, scaling dict or None) from either the rope_parameters or the rope_theta/rope_scaling form."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        if "rope_theta" not in rp and all(isinstance(v, dict) for v in rp.values()):
            raise ValueError("per-layer-type rope_parameters are not supported by this oracle")
        theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rtype = rp.get("rope_type", rp.get("type", "default"))
        return theta, (None if rtype == "default" else dict(rp, rope_type=rtype))
    theta = float(cfg.get("rope_theta", 10000.0))
    rs = cfg.get("rope_scaling")
    if rs:
        rtype = rs.get("rope_type", rs.get("type", "default"))
        return theta, (None if rtype == "default" else dict(rs, rope_type=rtype))
    return theta, None


def inv_freq(cfg: dict) -> np.ndarray:
    hd = head_dim(cfg)
    theta, scaling = rope_settings(cfg)
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if scaling is None:
        return inv
    if scaling["rope_type"] != "llama3":
        raise ValueError(f"rope type {scaling['rope_type']} not implemented in the oracle")
    factor = float(scaling["factor"])
    lo_f = float(scaling["low_freq_factor"])
    hi_f = float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    lo_wl, hi_wl = old / lo_f, old / hi_f
    wl = 2 * math.pi / inv
    out = np.where(wl > lo_wl, inv / factor, inv)
    smooth = (old / wl - lo_f) / (hi_f - lo_f)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < hi_wl) & ~(wl > lo_wl)
    return np.where(medium, smoothed, out)


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def sliding_window(cfg: dict):
    mt = cfg.get("model_type")
    if mt == "mistral":
        return cfg.get("sliding_window")
    if mt == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError("qwen2 use_sliding_window=true is not implemented in the oracle")
    return None


# ---------------------------------------------------------------------------------------------- forward
def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_half(x, cos, sin):
    """x [T, H, D]; rotate-half layout (HF)."""
    d2 = x.shape[-1] // 2
    rot = np.concatenate([-x[..., d2:], x[..., :d2]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def rope_interleaved(x, cos_h, sin_h):
    """x [T, H, D]; llama2.c layout: pairs (2i, 2i+1) rotated by angle i."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos_h[:, None, :], sin_h[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def attention(q, k, v, window=None, window_mode="lt"):
    """q [T, H, D], k/v [T, KV, D]; causal, GQA, optional sliding window."""
    T, H, D = q.shape
    KV = k.shape[1]
    g = H // KV
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j < window) if window_mode == "lt" else (i - j <= window)
    out = np.empty((T, H, v.shape[-1]))
    for h in range(H):
        s = q[:, h, :] @ k[:, h // g, :].T / math.sqrt(D)
        s = np.where(allowed, s, -np.inf)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h, :] = p @ v[:, h // g, :]
    return out


def silu(x):
    return x / (1 + np.exp(-x))


def forward_hf(w: dict, cfg: dict, ids, window_mode="lt", interleaved=False) -> np.ndarray:
    """Logits [T, vocab] in float64 for HF-layout weights (w: name -> float64 array)."""
    ids = np.asarray(ids)
    T = len(ids)
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
    eps = float(cfg["rms_norm_eps"])
    freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq(cfg)[None, :]
    if interleaved:
        cos_h, sin_h = np.cos(freqs), np.sin(freqs)
        rope = lambda x: rope_interleaved(x, cos_h, sin_h)  # noqa: E731
    else:
        cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
        rope = lambda x: rope_half(x, cos, sin)  # noqa: E731
    window = sliding_window(cfg)
    x = w["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)

        def proj(name):
            y = h @ w[p + f"self_attn.{name}.weight"].T
            b = w.get(p + f"self_attn.{name}.bias")
            return y if b is None else y + b

        q = rope(proj("q_proj").reshape(T, H, D))
        k = rope(proj("k_proj").reshape(T, KV, D))
        v = proj("v_proj").reshape(T, KV, D)
        a = attention(q, k, v, window, window_mode).reshape(T, H * D)
        o = a @ w[p + "self_attn.o_proj.weight"].T
        ob = w.get(p + "self_attn.o_proj.bias")
        x = x + (o if ob is None else o + ob)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        m = silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + m @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight")
    if head is None:
        if not cfg.get("tie_word_embeddings", True):
            raise ValueError("lm_head.weight missing and tie_word_embeddings is false")
        head = w["model.embed_tokens.weight"]
    return x @ head.T


def greedy(w, cfg, prompt, n, window_mode="lt"):
    seq = list(prompt)
    out, margins = [], []
    for _ in range(n):
        lg = forward_hf(w, cfg, seq, window_mode)[-1]
        top = np.argsort(lg)[::-1][:2]
        margins.append(float(lg[top[0]] - lg[top[1]]))
        out.append(int(top[0]))
        seq.append(int(top[0]))
    return out, margins


def load_hf_dir(d: str):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.astype(np.float64) for k, v in stnp.load_model_dir(d).items()}
    return cfg, w


# ---------------------------------------------------------------------------------------------- checks
def check_golden(golden_dir, models, prompts_wanted, do_greedy, tol) -> bool:
    ok = True
    for name in models:
        d = os.path.join(golden_dir, name)
        with open(os.path.join(d, "golden.json")) as f:
            g = json.load(f)
        cfg, w = load_hf_dir(d)
        ref = stnp.load(os.path.join(d, g["logits_file"]))
        modes = ["lt", "le"] if sliding_window(cfg) is not None else ["lt"]
        for pr in g["prompts"]:
            if prompts_wanted and pr["name"] not in prompts_wanted:
                continue
            ids = pr["prompt_ids"]
            r = ref[pr["name"]].astype(np.float64)
            diffs = {}
            for mode in modes:
                lg = forward_hf(w, cfg, ids, mode)
                diffs[mode] = float(np.abs(lg - r).max())
            diff = diffs["lt"]
            extra = "" if len(modes) == 1 else f"  (window i-j<W: {diffs['lt']:.3g}, i-j<=W: {diffs['le']:.3g})"
            status = "ok" if diff <= tol else "FAIL"
            ok &= diff <= tol
            line = (f"{name:16s} {pr['name']:3s} len={len(ids):5d} max|logit diff|={diff:.3e} "
                    f"(max|logit|={np.abs(r).max():.2f}) {status}{extra}")
            if do_greedy:
                gids, margins = greedy(w, cfg, ids, len(pr["greedy_ids"]))
                same = gids == pr["greedy_ids"]
                ok &= same
                line += f"  greedy {'match' if same else 'MISMATCH'} (numpy min margin {min(margins):.4f})"
            print(line, flush=True)
    return ok


def check_stories(stories_dir: str, tol: float) -> bool:
    import llama2c_to_hf as conv
    ckpt = os.path.join(stories_dir, "stories260K.bin")
    tokm = os.path.join(stories_dir, "tok512.model")
    ok = True
    with tempfile.TemporaryDirectory() as td:
        conv.write_hf_dir(ckpt, tokm, td, "f32")
        cfg, w = load_hf_dir(td)
    lcfg, a = conv.read_llama2c(ckpt)
    # llama2.c-layout weights under HF names, without the permutation, run with interleaved RoPE
    raw = {"model.embed_tokens.weight": a["token_embedding"], "model.norm.weight": a["rms_final"]}
    for l in range(lcfg["n_layers"]):
        p = f"model.layers.{l}."
        raw.update({p + "input_layernorm.weight": a["rms_att"][l], p + "post_attention_layernorm.weight": a["rms_ffn"][l],
                    p + "self_attn.q_proj.weight": a["wq"][l], p + "self_attn.k_proj.weight": a["wk"][l],
                    p + "self_attn.v_proj.weight": a["wv"][l], p + "self_attn.o_proj.weight": a["wo"][l],
                    p + "mlp.gate_proj.weight": a["w1"][l], p + "mlp.down_proj.weight": a["w2"][l],
                    p + "mlp.up_proj.weight": a["w3"][l]})
    raw = {k: v.astype(np.float64) for k, v in raw.items()}
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokm)
    prompt = "Once upon a time"
    ids = [1] + sp.encode(prompt)
    rng = np.random.default_rng(0)
    probe = [1] + list(rng.integers(3, cfg["vocab_size"], 40))
    for label, seq in (("prompt", ids), ("random40", probe)):
        d = float(np.abs(forward_hf(w, cfg, seq) - forward_hf(raw, cfg, seq, interleaved=True)).max())
        print(f"stories260K converter: HF-layout vs llama2.c-layout logits on {label}: max diff {d:.3e}")
        ok &= d < 1e-9
    gids, margins = greedy(w, cfg, ids, 48)
    print(f"stories260K numpy greedy ids: {gids}")
    print(f"stories260K numpy greedy text: {prompt}{sp.decode(gids)!r} (min margin {min(margins):.4f})")
    refp = os.path.join(REPO, "tests", "fixtures", "stories260K_reference.json")
    if os.path.exists(refp):
        with open(refp) as f:
            ref = json.load(f)
        same_prompt = ref["prompt_ids"] == ids
        same = ref["greedy_ids"] == gids
        lg = forward_hf(w, cfg, ids)[-1]
        top5 = ref["last_logits_top5"]
        d5 = max(abs(lg[i] - v) for i, v in top5)
        print(f"vs {os.path.relpath(refp, REPO)}: prompt ids {'match' if same_prompt else 'MISMATCH'}, "
              f"greedy ids {'match' if same else 'MISMATCH'}, top5 last-logit max diff {d5:.3e}")
        ok &= same and same_prompt and d5 <= tol
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="numpy float64 oracle for tests/fixtures/golden")
    ap.add_argument("--model", action="append", help="model folder name (repeatable); default: all")
    ap.add_argument("--prompt", action="append", help="prompt name (repeatable); default: all")
    ap.add_argument("--no-greedy", action="store_true", help="skip re-deriving the greedy continuations")
    ap.add_argument("--tol", type=float, default=1e-3, help="max abs logit difference allowed")
    ap.add_argument("--golden", default=GOLDEN, help="golden fixtures folder (default tests/fixtures/golden)")
    ap.add_argument("--stories", metavar="DIR", help="check the llama2.c converter on DIR/stories260K.bin")
    args = ap.parse_args(argv)
    ok = True
    if args.stories:
        ok &= check_stories(args.stories, args.tol)
    if not args.stories or args.model:
        models = args.model or sorted(m for m in os.listdir(args.golden)
                                      if os.path.exists(os.path.join(args.golden, m, "golden.json")))
        if not models:
            print(f"no golden.json under {args.golden}")
            ok = False
        ok &= check_golden(args.golden, models, args.prompt, not args.no_greedy, args.tol)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
