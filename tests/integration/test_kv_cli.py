"""The mixed-precision KV cache through the CLI: generate --kv-config, eval --kv-config."""
import json

import pytest

from conftest import generate_json, run_pmkv


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def sample_text(pmkv_bin, stories260k, tmp_path_factory):
    """~2,000 tokens of the model's own seeded samples: text it models well."""
    out = []
    for seed in range(4):
        d = generate_json(pmkv_bin, "--model", stories260k, "--prompt", "Once upon a time",
                          "--max-tokens", 400, "--temperature", 1.0, "--seed", seed,
                          "--ignore-eos")
        out.append("Once upon a time" + d["text"])
    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text("\n".join(out))
    return p


def test_generate_reports_kv_and_respects_budget(pmkv_bin, stories260k, tmp_path):
    cfg = _write(tmp_path, "kv.yaml", "kv_cache:\n  policy: block\n  window_tokens: 32\n"
                                      "  budget: {uniform_bits: 2, max_len: 256}\n")
    out = generate_json(pmkv_bin, "--model", stories260k, "--prompt", "Once upon a time",
                        "--max-tokens", 250, "--ignore-eos", "--kv-config", cfg)
    kv = out["kv"]
    assert len(kv["layers"]) == 5
    assert kv["demotions"] > 0
    assert kv["pool_pages_used_peak"] > 0
    for layer in kv["layers"]:
        assert layer["bytes"] <= layer["budget_bytes"]
        bits = layer["tokens_by_bits"]
        assert set(bits) == {"16", "8", "4", "2"}
        assert sum(bits.values()) == 5 + 250 - 1  # the last token is sampled, not cached
        assert bits["2"] > 0


def test_generate_without_budget_keeps_16_bits(pmkv_bin, stories260k):
    out = generate_json(pmkv_bin, "--model", stories260k, "--prompt", "Once upon a time",
                        "--max-tokens", 40)
    for layer in out["kv"]["layers"]:
        assert layer["budget_bytes"] is None
        assert layer["tokens_by_bits"]["16"] == 5 + 40 - 1
    assert out["kv"]["demotions"] == 0


def test_floor_action_finishes_with_length(pmkv_bin, stories260k, tmp_path):
    # A budget of 3 pages per layer: sink + body + window pages fill it soon even at 2 bits.
    cfg = _write(tmp_path, "kv.yaml", "kv_cache:\n  window_tokens: 32\n"
                                      "  budget: {per_layer_bytes: 73728}\n")
    out = generate_json(pmkv_bin, "--model", stories260k, "--prompt", "Once upon a time",
                        "--max-tokens", 400, "--ignore-eos", "--kv-config", cfg)
    assert out["finish_reason"] == "length"
    assert len(out["output_ids"]) < 400


def test_eval_16bit_config_agrees_exactly(pmkv_bin, stories260k, sample_text, tmp_path):
    cfg = _write(tmp_path, "kv16.yaml", "kv_cache: {init_bits: 16, window_tokens: 32}\n")
    out = json.loads(run_pmkv(pmkv_bin, "eval", "--model", stories260k, "--text", sample_text,
                              "--window", 256, "--chunk", 16, "--threads", 1,
                              "--kv-config", cfg).stdout)
    assert out["greedy_agreement"] == 1.0
    assert out["perplexity"] == pytest.approx(out["reference_16bit"]["perplexity"], rel=1e-6)
    assert 1.0 < out["perplexity"] < 20.0


def test_eval_2bit_budget_degrades_gracefully(pmkv_bin, stories260k, sample_text, tmp_path):
    results = {}
    for policy in ("block", "oldest_first"):
        cfg = _write(tmp_path, f"{policy}.yaml",
                     f"kv_cache:\n  policy: {policy}\n  window_tokens: 32\n"
                     "  budget: {uniform_bits: 2, max_len: 256}\n")
        out = json.loads(run_pmkv(pmkv_bin, "eval", "--model", stories260k, "--text",
                                  sample_text, "--window", 256, "--chunk", 16, "--threads", 1,
                                  "--kv-config", cfg).stdout)
        assert out["result"]["demotions"] > 0
        assert out["result"]["kv_bytes_per_window_end"] < \
            out["reference_16bit"]["kv_bytes_per_window_end"] / 2
        assert 0.3 < out["greedy_agreement"] < 1.0
        assert out["perplexity"] > out["reference_16bit"]["perplexity"]
        results[policy] = out
    # equal memory for both policies
    assert results["block"]["result"]["kv_bytes_per_window_end"] == \
        results["oldest_first"]["result"]["kv_bytes_per_window_end"]


@pytest.mark.parametrize("yaml_text,key", [
    ("kv_cache: {policy: newest}\n", "kv_cache.policy"),
    ("kv_cache: {bogus: 1}\n", "kv_cache.bogus"),
    ("kv_cache: {init_bits: 3}\n", "kv_cache.init_bits"),
    ("kv_cache: {budget: {uniform_bits: 2}}\n", "kv_cache.budget.max_len"),
    ("kv_cache: {window_tokens: 20}\n", "kv_cache.window_tokens"),
])
def test_bad_kv_config_names_key(pmkv_bin, stories260k, tmp_path, yaml_text, key):
    cfg = _write(tmp_path, "bad.yaml", yaml_text)
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--model", stories260k, "--prompt-ids", "1",
                    "--kv-config", cfg, check=False)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
