#!/usr/bin/env python3
"""Step 4 of tools/refmodel: train the Llama-architecture model of models/pmkv-ref (PyTorch).

    python3 tools/refmodel/train.py --data .refmodel_carry --out OUTDIR [--time-budget 450 | --steps N]

DATA holds what tokenize_corpus.py wrote (train.u16[.xz], heldout.u16[.xz], meta.json,
tokenizer.model). The whole token stream sits on the GPU; every step draws batch_size random
windows of seq_len+1 tokens with a seeded generator (so a run is a pure function of the seed and the
step count, up to GPU non-determinism). Mixed precision: fp32 master weights, bf16 autocast,
fused AdamW, flash attention through F.scaled_dot_product_attention(is_causal=True).

Schedule: linear warm-up, then cosine decay to min_lr_frac * lr. With --time-budget the number of
steps is fixed once, after --probe-steps steps, from the measured step time so that training ends
inside the budget; the log and metrics.json record it, and `--steps N --long-from M` reproduces
the run. The final phase (steps >= long_from) trains on windows of --long-seq-len tokens at the
same number of tokens per step.

At the end: held-out loss by the eval protocol of models/pmkv-ref/README.md (whole held-out
stream, consecutive non-overlapping windows, each from scratch), then export_hf.py writes the
Hugging Face directory OUTDIR/hf (bf16 safetensors, config, tokenizer, chat template).
"""
import argparse
import json
import lzma
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_hf  # noqa: E402


# ----------------------------------------------------------------------------- model (HF Llama names)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(seq_len, head_dim, theta, device):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    emb = torch.cat((freqs, freqs), dim=-1)  # HF Llama layout: rotate_half over the two halves
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        d = c["hidden_size"]
        self.q_proj = nn.Linear(d, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        if rep > 1:
            k = k[:, :, None].expand(B, self.nkv, rep, T, self.hd).reshape(B, self.nh, T, self.hd)
            v = v[:, :, None].expand(B, self.nkv, rep, T, self.hd).reshape(B, self.nh, T, self.hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, f = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class Llama(nn.Module):
    """LlamaForCausalLM with tied embeddings; parameter names equal Hugging Face's."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = Inner(c)
        cos, sin = rope_cache(c["max_position_embeddings"], c["head_dim"], c["rope_theta"], "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.c["initializer_range"]
        for n, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * self.c["num_hidden_layers"]) if n.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, 0.0, s)

    def forward(self, idx):
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            x = layer(x, self.cos, self.sin)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight)  # tied lm_head


# ----------------------------------------------------------------------------- data

def load_u16(data: Path, split):
    raw = data / f"{split}.u16"
    if raw.exists():
        return np.fromfile(raw, dtype="<u2")
    with lzma.open(data / f"{split}.u16.xz") as f:
        return np.frombuffer(f.read(), dtype="<u2")


@torch.no_grad()
def eval_protocol(model, ids, window, device, batch=16, max_windows=None):
    """Eval protocol: consecutive non-overlapping windows of `window` tokens (the last one
    shorter), each from scratch; the first token of a window is not predicted. Returns
    (total nll, predicted tokens)."""
    model.eval()
    n = ids.numel()
    starts = list(range(0, n, window))
    if max_windows:
        starts = starts[:max_windows]
    full = [s for s in starts if s + window <= n]
    nll, cnt = 0.0, 0
    for i in range(0, len(full), batch):
        x = torch.stack([ids[s:s + window] for s in full[i:i + batch]]).to(device).long()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        cnt += x[:, 1:].numel()
    for s in starts:
        if s + window > n and n - s >= 2:
            x = ids[s:n][None].to(device).long()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x[:, :-1])
            nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
            cnt += x.size(1) - 1
    model.train()
    return nll, cnt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    # model
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=1280)
    ap.add_argument("--max-pos", type=int, default=4096)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    # optimisation
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step at --seq-len")
    ap.add_argument("--long-seq-len", type=int, default=4096)
    ap.add_argument("--long-frac", type=float, default=0.1, help="fraction of steps at --long-seq-len (0: none)")
    ap.add_argument("--long-from", type=int, help="first step at --long-seq-len (default from --long-frac)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--steps", type=int, help="total steps (default: from --time-budget)")
    ap.add_argument("--time-budget", type=float, default=450.0, help="seconds of training when --steps is not given")
    ap.add_argument("--probe-steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-windows", type=int, default=24, help="held-out windows for the periodic eval")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true", default=True)
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((args.data / "meta.json").read_text())
    c = dict(vocab_size=meta["vocab_size"], hidden_size=args.hidden, num_hidden_layers=args.layers,
             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
             intermediate_size=args.ffn, max_position_embeddings=args.max_pos, rope_theta=args.rope_theta,
             rms_norm_eps=1e-5, initializer_range=0.02, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=True)

    train_np = load_u16(args.data, "train")
    held_np = load_u16(args.data, "heldout")
    train = torch.from_numpy(train_np.astype(np.int32)).to(device)
    held = torch.from_numpy(held_np.astype(np.int32))
    print(f"data: train {train.numel():,} tokens, held-out {held.numel():,} tokens, loaded in {time.time() - t_start:.1f}s", flush=True)

    model = Llama(c).to(device)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {nparams:,} parameters ({nparams - c['vocab_size'] * c['hidden_size']:,} without the embedding)", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    tokens_per_step = args.batch * args.seq_len

    def batch_at(seq_len):
        bs = tokens_per_step // seq_len
        starts = torch.randint(0, train.numel() - seq_len - 1, (bs,), device=device, generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1, device=device)[None]
        x = train[idx].long()
        return x[:, :-1], x[:, 1:]

    total = args.steps
    long_from = args.long_from

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        T = total if total else 10 ** 9
        p = min(1.0, (step - args.warmup) / max(1, T - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    log = []
    metrics = {"config": c, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "parameters": nparams, "train_tokens_available": int(train.numel()),
               "heldout_tokens": int(held.numel()), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
    model.train()
    t_train = time.time()
    t_probe = None
    recent = []
    step = 0
    tokens_seen = 0
    while True:
        if total is not None and step >= total:
            break
        seq = args.long_seq_len if (long_from is not None and step >= long_from and args.long_frac > 0) else args.seq_len
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch_at(seq)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        if step % 10 == 0 or step <= 3:
            recent.append(loss.item())
            recent = recent[-10:]
        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_probe = (time.time(), step)
        if total is None and step == args.probe_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.time() - t_probe[0]) / (step - t_probe[1])
            remaining = args.time_budget - (time.time() - t_train)
            # a step of the long phase costs more (attention grows with the window): estimate 1.2x
            lf = args.long_frac
            per = dt * ((1 - lf) + 1.2 * lf)
            total = step + max(1, int(remaining / per))
            if lf > 0 and long_from is None:
                long_from = int(round(total * (1 - lf)))
            print(f"probe: {dt * 1000:.1f} ms/step, {tokens_per_step / dt:,.0f} tokens/s at seq {args.seq_len}; "
                  f"total steps {total}, long phase (seq {args.long_seq_len}) from step {long_from}", flush=True)
            metrics["probe_tokens_per_s"] = tokens_per_step / dt
        elif total is not None and long_from is None and args.long_frac > 0:
            long_from = int(round(total * (1 - args.long_frac)))
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t_train
            rec = {"step": step, "loss": loss.item(), "lr": lr_at(step - 1), "gnorm": gnorm.item(), "seq": seq,
                   "tokens": tokens_seen, "elapsed_s": round(el, 1), "tokens_per_s": round(tokens_seen / max(el, 1e-9))}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if step % args.eval_every == 0:
            nll, cnt = eval_protocol(model, held, args.seq_len, device, max_windows=args.eval_windows)
            print(json.dumps({"step": step, "heldout_loss_partial": nll / cnt, "windows": args.eval_windows}), flush=True)
            log.append({"step": step, "heldout_loss_partial": nll / cnt})
        if args.steps is None and time.time() - t_train > args.time_budget * 1.1:
            print(f"time budget exceeded by 10% at step {step}: stopping", flush=True)
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    # final train loss: mean over the last 20 steps' batches is noisy; re-measure on 32 fresh batches
    model.eval()
    with torch.no_grad():
        tl = []
        for _ in range(8):
            x, y = batch_at(args.seq_len)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
            tl.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)).item())
    train_loss = float(np.mean(tl))
    nll, cnt = eval_protocol(model, held, args.seq_len, device)
    held_loss = nll / cnt
    metrics.update({"steps": step, "long_from": long_from, "tokens_seen": tokens_seen, "train_seconds": round(train_s, 1),
                    "tokens_per_s": tokens_seen / train_s, "final_train_loss": train_loss,
                    "final_train_ppl": math.exp(train_loss), "heldout_loss": held_loss,
                    "heldout_ppl": math.exp(held_loss), "heldout_predicted_tokens": cnt,
                    "epochs": tokens_seen / train.numel()})
    print(json.dumps({k: metrics[k] for k in ("steps", "long_from", "tokens_seen", "train_seconds", "tokens_per_s",
                                              "final_train_loss", "heldout_loss", "heldout_ppl", "epochs")}), flush=True)
    # export
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    export_hf.export(sd, c, args.data / "tokenizer.model", args.out / "hf")
    metrics["log"] = log
    metrics["total_seconds"] = round(time.time() - t_start, 1)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"exported to {args.out / 'hf'}; total {metrics['total_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
