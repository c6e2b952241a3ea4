"""`pmkv generate` end to end: golden models, a converted real model, sampling flags, bad input."""
import json
import shutil
import subprocess

import pytest

from conftest import GOLDEN_DIR, SOURCE_DIR, generate_json, run_pmkv

GOLDEN_MODELS = ["llama_gqa", "qwen2_bias_tied", "mistral", "llama31_rope"]


@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_golden_greedy_ids(pmkv_bin, model):
    golden = json.loads((GOLDEN_DIR / model / "golden.json").read_text())
    for prompt in golden["prompts"]:
        ids = ",".join(map(str, prompt["prompt_ids"]))
        out = generate_json(pmkv_bin, "--model", GOLDEN_DIR / model, "--prompt-ids", ids,
                            "--max-tokens", len(prompt["greedy_ids"]))
        assert out["prompt_ids"] == prompt["prompt_ids"]
        assert out["output_ids"] == prompt["greedy_ids"], f"{model} {prompt['name']}"
        assert out["text"] is None  # no tokenizer in the golden directories
        assert out["finish_reason"] == "length"
        assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0


def test_stories260k_matches_transformers(pmkv_bin, stories260k):
    ref = json.loads((SOURCE_DIR / "tests" / "fixtures" / "stories260K_reference.json").read_text())
    out = generate_json(pmkv_bin, "--model", stories260k, "--prompt", ref["prompt"],
                        "--max-tokens", len(ref["greedy_ids"]))
    assert out["prompt_ids"] == ref["prompt_ids"]
    assert out["output_ids"] == ref["greedy_ids"]
    assert out["text"] == ref["greedy_text"]


def test_stories260k_streams_text_and_speed(pmkv_bin, stories260k):
    proc = run_pmkv(pmkv_bin, "generate", "--model", stories260k, "--prompt", "Once upon a time",
                    "--max-tokens", 20, "--threads", 1)
    assert proc.stdout.startswith(", there was a little girl")
    assert "prefill:" in proc.stderr and "decode:" in proc.stderr and "tokens/s" in proc.stderr


def test_seeded_sampling_is_reproducible(pmkv_bin, stories260k):
    args = ["--model", stories260k, "--prompt", "Once upon a time", "--max-tokens", 40,
            "--temperature", 1.0, "--top-p", 0.95, "--top-k", 50]
    a = generate_json(pmkv_bin, *args, "--seed", 7)
    b = generate_json(pmkv_bin, *args, "--seed", 7)
    c = generate_json(pmkv_bin, *args, "--seed", 8)
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_stop_string_ends_text_before_it(pmkv_bin, stories260k):
    out = generate_json(pmkv_bin, "--model", stories260k, "--prompt", "Once upon a time",
                        "--max-tokens", 48, "--stop", "Lily")
    assert out["finish_reason"] == "stop"
    assert out["text"] == ", there was a little girl named "


def test_eos_stops_generation(pmkv_bin, stories260k, tmp_path):
    # llama2.c models end a story with BOS (id 1) and never emit EOS (2): greedy from this prompt
    # emits 1 as its 342nd token. Declared as an EOS id in generation_config.json, it ends the
    # sequence with finish_reason "stop" and the id as the last output.
    model = tmp_path / "stories"
    shutil.copytree(stories260k, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 1]
    (model / "generation_config.json").write_text(json.dumps(gen))
    out = generate_json(pmkv_bin, "--model", model, "--prompt", "Once upon a time",
                        "--max-tokens", 500)
    assert out["finish_reason"] == "stop"
    assert len(out["output_ids"]) == 342 and out["output_ids"][-1] == 1
    assert 1 not in out["output_ids"][:-1]
    # ...unless told to ignore it; the context (512) caps the length then.
    out = generate_json(pmkv_bin, "--model", model, "--prompt", "Once upon a time",
                        "--max-tokens", 1000, "--ignore-eos")
    assert out["finish_reason"] == "length"
    assert len(out["output_ids"]) == 512 - 5


def test_stop_token_id(pmkv_bin, stories260k):
    ref = json.loads((SOURCE_DIR / "tests" / "fixtures" / "stories260K_reference.json").read_text())
    # The 5th greedy token, given as a stop token: generation ends right there.
    stop_id = ref["greedy_ids"][4]
    out = generate_json(pmkv_bin, "--model", stories260k, "--prompt", ref["prompt"],
                        "--max-tokens", 48, "--stop-token-id", stop_id)
    assert out["finish_reason"] == "stop"
    assert out["output_ids"] == ref["greedy_ids"][:5]


def _broken_copy(tmp_path, model="llama_gqa"):
    dst = tmp_path / model
    shutil.copytree(GOLDEN_DIR / model, dst)
    return dst


@pytest.mark.parametrize("args,rc,message", [
    (["--prompt-ids", "1,2", "--temperature", "-1"], 2, "temperature"),
    (["--prompt-ids", "1,2", "--top-p", "0"], 2, "top_p"),
    (["--prompt-ids", "1,x"], 2, "--prompt-ids"),
    (["--prompt-ids", "1,99999"], 2, "99999"),
    (["--prompt-ids", "1,2", "--max-tokens", "0"], 2, "max_tokens"),
    (["--prompt-ids", "1,2", "--bogus", "1"], 2, "--bogus"),
    (["--prompt", "hello"], 2, "tokenizer"),
    (["--prompt-ids", "1", "--prompt", "x"], 2, "exactly one"),
    (["--prompt-ids", "1,2", "--device", "gpu"], 2, "--device: 'gpu' is not one of auto, cpu, cuda"),
    (["--prompt-ids", "1,2", "--load-format", "gguf"], 2, "--load-format"),
    (["--prompt-ids", "1,2", "--device", "cpu", "--load-format", "dummy"], 2,
     "only the cuda device supports random weights"),
])
def test_bad_arguments_are_clear_errors(pmkv_bin, args, rc, message):
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", GOLDEN_DIR / "llama_gqa", *args,
                    check=False)
    assert proc.returncode == rc, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""


def test_prompt_longer_than_context(pmkv_bin, stories260k):
    ids = ",".join(["1"] + ["403"] * 600)
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", stories260k, "--prompt-ids", ids,
                    check=False)
    assert proc.returncode == 2
    assert "context" in proc.stderr


def test_missing_model_dir(pmkv_bin, tmp_path):
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", tmp_path / "nope",
                    "--prompt-ids", "1", check=False)
    assert proc.returncode == 1
    assert str(tmp_path / "nope") in proc.stderr


def test_malformed_config_names_file_and_key(pmkv_bin, tmp_path):
    d = _broken_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = "eight"
    (d / "config.json").write_text(json.dumps(cfg))
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", d, "--prompt-ids", "1",
                    check=False)
    assert proc.returncode == 1
    assert "config.json" in proc.stderr and "num_attention_heads" in proc.stderr


def test_truncated_weights_name_file(pmkv_bin, tmp_path):
    d = _broken_copy(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", d, "--prompt-ids", "1",
                    check=False)
    assert proc.returncode == 1
    assert "model.safetensors" in proc.stderr


def test_wrong_shape_names_tensor(pmkv_bin, tmp_path):
    d = _broken_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", d, "--prompt-ids", "1",
                    check=False)
    assert proc.returncode == 1
    assert "mlp.gate_proj.weight" in proc.stderr and "shape" in proc.stderr


def _has_gpu():
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(_has_gpu(), reason="checks the error a machine without a GPU gives")
def test_device_cuda_without_a_gpu_is_a_clear_error(pmkv_bin):
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", GOLDEN_DIR / "llama_gqa_d64",
                    "--prompt-ids", "1,2", "--device", "cuda", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "device cuda:" in proc.stderr and "--device cpu" in proc.stderr
    assert proc.stdout == ""


def test_device_auto_falls_back_to_cpu_and_says_so(pmkv_bin):
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", GOLDEN_DIR / "llama_gqa_d64",
                    "--prompt-ids", "1,2", "--max-tokens", "3", "--device", "cpu")
    assert json.loads(proc.stdout)["device"] == "cpu"
