"""`pmkv calibrate` end to end on stories260K, and its outputs in force in generate and serve."""
import json

import grpc
import pytest

from conftest import SOURCE_DIR, Server, generate_json, run_pmkv
from test_serve_grpc import pb  # noqa: F401  (the generated-stubs fixture)

TEXT = SOURCE_DIR / "bench" / "data" / "stories260K_samples.txt"
SAMPLE = ["--samples", 2, "--seq-len", 128, "--effective-len", 512, "--threads", 1, "--seed", 5]


@pytest.fixture(scope="module")
def calibrated(pmkv_bin, stories260k, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    sens = d / "sens.json"
    out = json.loads(run_pmkv(pmkv_bin, "calibrate", "sensitivity", "--model", stories260k,
                              "--text", TEXT, "--bits", "4,2", *SAMPLE, "--out", sens).stdout)
    again = json.loads(run_pmkv(pmkv_bin, "calibrate", "sensitivity", "--model", stories260k,
                                "--text", TEXT, "--bits", "4,2", *SAMPLE,
                                "--out", d / "sens2.json").stdout)
    assert out["k"] == again["k"] and out["v"] == again["v"]  # deterministic for a seed
    budgets = d / "budgets.yaml"
    # kv width 4 x 8 = 32; memory for 3 bits per layer on average over 5 layers at 512 tokens
    mem_mb = 3 * 5 * 32 * 2 * 512 / 8 / 2**20
    alloc = json.loads(run_pmkv(pmkv_bin, "calibrate", "allocate", "--sensitivity", sens,
                                "--memory-mb", mem_mb, "--bits", "4,2", "--kv-width", 32,
                                "--max-len", 512, "--head-dim", 8, "--out", budgets).stdout)
    keymax = d / "keymax.safetensors"
    run_pmkv(pmkv_bin, "calibrate", "max-keys", "--model", stories260k, "--text", TEXT, *SAMPLE,
             "--out", keymax)
    scales = d / "scales.safetensors"
    rep = json.loads(run_pmkv(pmkv_bin, "calibrate", "rep-scales", "--model", stories260k,
                              "--text", TEXT, "--max-keys", keymax, "--grid", 4, *SAMPLE,
                              "--out", scales).stdout)
    return {"sens": out, "alloc": alloc, "budgets": budgets, "scales": scales, "rep": rep,
            "dir": d}


def test_sensitivity_shape_and_order(calibrated):
    s = calibrated["sens"]
    assert s["bits"] == [4, 2] and len(s["k"]["2"]) == 5 and s["stretch"] == 4
    assert sum(s["k"]["2"]) > sum(s["k"]["4"]) > 0


def test_allocate_fits_and_mixes_bits(calibrated):
    a = calibrated["alloc"]
    assert a["total_bytes"] <= a["memory_bytes"]
    assert sorted(set(a["bits"])) == [2, 4]  # 3 bits on average: some layers at each
    text = calibrated["budgets"].read_text()
    assert "max_len: 512" in text and text.count("{layer:") == 5


def test_rep_scales_never_worse(calibrated):
    r = calibrated["rep"]
    assert len(r["alpha"]) == 5
    assert all(s <= p for s, p in zip(r["mse_scaled"], r["mse_plain"]))


def test_generate_with_calibrated_budgets_and_scales(pmkv_bin, stories260k, calibrated):
    cfg = calibrated["dir"] / "kv.yaml"
    cfg.write_text(f"kv_cache:\n  window_tokens: 32\n  budget: {{file: {calibrated['budgets']}}}\n"
                   f"  key_scales: {calibrated['scales']}\n")
    out = generate_json(pmkv_bin, "--model", stories260k, "--prompt", "Once upon a time",
                        "--max-tokens", 300, "--ignore-eos", "--kv-config", cfg)
    budgets = [layer["budget_bytes"] for layer in out["kv"]["layers"]]
    bits = calibrated["alloc"]["bits"]
    # a layer allocated 4 bits gets a larger page budget than one at 2 bits
    assert len(set(budgets)) == 2
    assert all((b4 > b2) for b4, b2 in [(budgets[i], budgets[j]) for i in range(5) for j in range(5)
                                       if bits[i] == 4 and bits[j] == 2])
    for layer in out["kv"]["layers"]:
        assert layer["bytes"] <= layer["budget_bytes"]


def test_serve_reports_calibration_in_force(pmkv_bin, stories260k, calibrated, pb):  # noqa: F811
    s = Server(pmkv_bin, stories260k, "--set", "kv_cache.memory=32M", "--set", "engine.threads=1",
               "--set", "kv_cache.window_tokens=32",
               "--set", f"kv_cache.budget.file={calibrated['budgets']}",
               "--set", f"kv_cache.key_scales={calibrated['scales']}")
    try:
        with grpc.insecure_channel(s.grpc_target) as ch:
            st = pb[1].PmkvStub(ch).GetKvStats(pb[0].GetKvStatsRequest(), timeout=30)
        assert st.budgets_source == f"file:{calibrated['budgets']}"
        assert st.key_scales_source == f"file:{calibrated['scales']}"
    finally:
        assert s.stop() == 0
