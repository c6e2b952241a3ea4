#!/usr/bin/env python3
"""Convert a llama2.c checkpoint (+ its sentencepiece tokenizer) to a Hugging Face Llama directory.

Usage:
  python tools/llama2c_to_hf.py --checkpoint stories260K.bin --tokenizer tok512.model --out DIR [--dtype f32|bf16|f16]

llama2.c format (legacy "version 0", as written by llama2.c's export):
  header: 7 little-endian int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
          (negative vocab_size => the classifier is NOT shared with the embedding)
  float32 arrays: token_embedding [vocab, dim]; rms_att [L, dim]; wq [L, dim, dim];
          wk [L, kv_dim, dim]; wv [L, kv_dim, dim]; wo [L, dim, dim]; rms_ffn [L, dim];
          w1 [L, hidden, dim]; w2 [L, dim, hidden]; w3 [L, hidden, dim]; rms_final [dim];
          freq_cis_real, freq_cis_imag [seq_len, head_dim/2] each (skipped);
          classifier [vocab, dim] only when unshared.

llama2.c rotates interleaved pairs (2i, 2i+1); Hugging Face Llama rotates halves (i, i + d/2). The rows of
wq and wk are permuted per head exactly like transformers' convert_llama_weights_to_hf.py:
  permute(w, n_heads, dim1, dim2) = w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

Outputs: config.json, generation_config.json, model.safetensors, tokenizer.model, tokenizer_config.json,
special_tokens_map.json. Needs only numpy (and tools/safetensors_np.py beside this file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_np as stnp  # noqa: E402

HEADER_BYTES = 7 * 4


class ConversionError(Exception):
    pass


def read_llama2c(path: str):
    """Returns (cfg dict, dict of float32 arrays in llama2.c layout)."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ConversionError(f"cannot read checkpoint {path}: {e}") from None
    if size < HEADER_BYTES:
        raise ConversionError(f"{path}: {size} bytes is too small for the 28-byte llama2.c header")
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (
            int(v) for v in np.frombuffer(f.read(HEADER_BYTES), dtype="<i4"))
    shared = vocab > 0
    vocab = abs(vocab)
    hdr = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
               vocab_size=vocab, seq_len=seq_len)
    for k, v in hdr.items():
        if v <= 0:
            raise ConversionError(f"{path}: header field {k} = {v} must be positive "
                                  f"(header {hdr}); is this a llama2.c v0 checkpoint?")
    if max(hdr.values()) > 1 << 20:
        raise ConversionError(f"{path}: implausible header {hdr}; is this a llama2.c v0 checkpoint? "
                              "(the newer 'version 1/2' exports start with a magic number and are not supported)")
    if dim % n_heads:
        raise ConversionError(f"{path}: dim {dim} is not divisible by n_heads {n_heads}")
    if n_heads % n_kv_heads:
        raise ConversionError(f"{path}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    head_dim = dim // n_heads
    if head_dim % 2:
        raise ConversionError(f"{path}: head_dim {head_dim} is odd; RoPE needs an even head_dim")
    kv_dim = head_dim * n_kv_heads
    L = n_layers
    layout = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, dim, dim)),
        ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)),
        ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared:
        layout.append(("classifier", (vocab, dim)))
    n_floats = sum(int(np.prod(s)) for _, s in layout)
    expected = HEADER_BYTES + 4 * n_floats
    if size != expected:
        raise ConversionError(
            f"{path}: file is {size} bytes but the header {hdr} ({'shared' if shared else 'unshared'} classifier) "
            f"implies exactly {expected} bytes (28-byte header + {n_floats} float32); "
            "wrong file, truncated download, or a different llama2.c export version")
    data = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
    arrays = {}
    pos = 0
    for name, shape in layout:
        n = int(np.prod(shape))
        arrays[name] = data[pos:pos + n].reshape(shape)
        pos += n
    if not np.isfinite(data).all():
        raise ConversionError(f"{path}: checkpoint contains NaN or Inf values")
    cfg = dict(hdr, shared_classifier=shared, head_dim=head_dim, kv_dim=kv_dim)
    return cfg, arrays


def permute_rope(w: np.ndarray, n_heads: int, dim1: int, dim2: int) -> np.ndarray:
    """HF's permute: interleaved pairs -> rotate-half, per head (rows only)."""
    if w.shape != (dim1, dim2):
        raise ConversionError(f"permute: expected shape {(dim1, dim2)}, got {w.shape}")
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(dim1, dim2)


def convert_tensors(cfg: dict, a: dict) -> dict:
    """Returns HF-named float32 tensors."""
    dim, kv_dim = cfg["dim"], cfg["kv_dim"]
    out = {"model.embed_tokens.weight": a["token_embedding"], "model.norm.weight": a["rms_final"]}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = a["rms_att"][i]
        out[p + "post_attention_layernorm.weight"] = a["rms_ffn"][i]
        out[p + "self_attn.q_proj.weight"] = permute_rope(a["wq"][i], cfg["n_heads"], dim, dim)
        out[p + "self_attn.k_proj.weight"] = permute_rope(a["wk"][i], cfg["n_kv_heads"], kv_dim, dim)
        out[p + "self_attn.v_proj.weight"] = a["wv"][i]
        out[p + "self_attn.o_proj.weight"] = a["wo"][i]
        out[p + "mlp.gate_proj.weight"] = a["w1"][i]
        out[p + "mlp.down_proj.weight"] = a["w2"][i]
        out[p + "mlp.up_proj.weight"] = a["w3"][i]
    if not cfg["shared_classifier"]:
        out["lm_head.weight"] = a["classifier"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def hf_config(cfg: dict, dtype: str) -> dict:
    torch_dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg["dim"],
        "intermediate_size": cfg["hidden_dim"],
        "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg["n_kv_heads"],
        "head_dim": cfg["head_dim"],
        "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": cfg["seq_len"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": bool(cfg["shared_classifier"]),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }


def write_hf_dir(checkpoint: str, tokenizer: str, out_dir: str, dtype: str = "f32") -> dict:
    if dtype not in ("f32", "bf16", "f16"):
        raise ConversionError(f"--dtype must be f32, bf16 or f16 (got {dtype!r})")
    if not os.path.isfile(tokenizer):
        raise ConversionError(f"tokenizer {tokenizer} does not exist")
    with open(tokenizer, "rb") as f:
        tok_head = f.read(2)
    # a sentencepiece ModelProto starts with field 1 (pieces), wire type 2: tag byte 0x0a
    if tok_head[:1] != b"\x0a":
        raise ConversionError(f"{tokenizer} does not look like a sentencepiece .model file "
                              "(pass tok512.model, not the llama2.c tok512.bin)")
    cfg, arrays = read_llama2c(checkpoint)
    tensors = convert_tensors(cfg, arrays)
    if dtype == "bf16":
        to_write = {k: stnp.Bf16.from_float(v) for k, v in tensors.items()}
    elif dtype == "f16":
        big = {k: float(np.abs(v).max()) for k, v in tensors.items() if np.abs(v).max() > 65504}
        if big:
            raise ConversionError(f"values exceed the float16 range in {sorted(big)}")
        to_write = {k: v.astype(np.float16) for k, v in tensors.items()}
    else:
        to_write = tensors
    os.makedirs(out_dir, exist_ok=True)
    stnp.save(os.path.join(out_dir, "model.safetensors"), to_write, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype), f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "max_length": cfg["seq_len"]}, f, indent=2)
        f.write("\n")
    shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.model"))
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": cfg["seq_len"],
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
        f.write("\n")
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="llama2.c .bin checkpoint (v0 export)")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model (copied as tokenizer.model)")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="weight dtype (default f32)")
    args = ap.parse_args(argv)
    try:
        cfg = write_hf_dir(args.checkpoint, args.tokenizer, args.out, args.dtype)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: dim={cfg['dim']} hidden={cfg['hidden_dim']} layers={cfg['n_layers']} "
          f"heads={cfg['n_heads']} kv_heads={cfg['n_kv_heads']} vocab={cfg['vocab_size']} seq_len={cfg['seq_len']} "
          f"tied={cfg['shared_classifier']} dtype={args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
