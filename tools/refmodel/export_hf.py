#!/usr/bin/env python3
"""Step 5 of tools/refmodel: write a Hugging Face Llama directory for models/pmkv-ref.

Called by train.py at the end of training (export(state_dict, config, tokenizer, out_dir)); can also
be run alone on a checkpoint saved with torch.save({"config": c, "model": state_dict}, path):

    python3 tools/refmodel/export_hf.py --checkpoint ckpt.pt --tokenizer tokenizer.model --out DIR

Writes config.json (LlamaConfig, transformers 5.x keys plus the classic rope_theta so 4.x reads it
too), model.safetensors (bf16; tied embeddings: only model.embed_tokens.weight is stored, as
save_pretrained does), tokenizer.model, tokenizer_config.json (ChatML chat_template) and
generation_config.json. Needs only torch (the safetensors file is written by hand).
"""
import argparse
import json
import shutil
import struct
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
IM_START, IM_END = 3, 4  # user-defined symbols of the sentencepiece model (train_tokenizer.sh)


def write_safetensors(tensors: dict, path: Path, metadata=None):
    """Minimal safetensors writer: tensors are written in sorted name order, header padded to 8."""
    header = {}
    blobs = []
    off = 0
    dt = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        raw = t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes()
        header[name] = {"dtype": dt[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def hf_config(c):
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": c["bos_token_id"],
        "dtype": "bfloat16",
        "eos_token_id": c["eos_token_id"],
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initializer_range": c["initializer_range"],
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_parameters": {"rope_theta": float(c["rope_theta"]), "rope_type": "default"},
        "rope_scaling": None,
        "rope_theta": float(c["rope_theta"]),
        "tie_word_embeddings": True,
        "transformers_version": "5.17.0",
        "use_cache": True,
        "vocab_size": c["vocab_size"],
    }


def tokenizer_config(c):
    def tok(content, special=True):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": special}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {"0": tok("<unk>"), "1": tok("<s>"), "2": tok("</s>"),
                                 str(IM_START): tok("<|im_start|>"), str(IM_END): tok("<|im_end|>")},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": c["max_position_embeddings"],
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def generation_config(c):
    # pmkv reads eos_token_id from here (</s> and <|im_end|> both stop); the sampling values are
    # what suits this small model in transformers' generate (pmkv's CLI defaults to greedy).
    return {"bos_token_id": c["bos_token_id"], "eos_token_id": [c["eos_token_id"], IM_END], "do_sample": True,
            "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "transformers_version": "5.17.0"}


def export(state_dict, c, tokenizer_model, out: Path):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16) for k, v in state_dict.items() if k != "lm_head.weight"}
    write_safetensors(tensors, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(c), indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(c), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(c), indent=2) + "\n")
    shutil.copy(tokenizer_model, out / "tokenizer.model")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ck = torch.load(a.checkpoint, map_location="cpu")
    export(ck["model"], ck["config"], a.tokenizer, Path(a.out))


if __name__ == "__main__":
    main()
