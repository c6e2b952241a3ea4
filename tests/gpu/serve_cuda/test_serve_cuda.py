"""`pmkv serve` on the CUDA backend, end to end over HTTP (the device machine has no `openai`
package; requests are raw HTTP like the integration tests' http_request). The model is the
reference model's shape and tokenizer (models/pmkv-ref: config.json, tokenizer.model) with random
weights (model.load_format: dummy), because its 54 MB of weights cannot travel to the device
machine with the binaries; every code path past the weights is the real one: tokenizer, chat
template, scheduler, CUDA forward, device sampling (with logprobs), streaming,
KV accounting, shutdown.

Run by run.sh (ctest gpu_serve): PMKV_BIN = the pmkv binary, PMKV_SOURCE_DIR = the checkout.
"""
import importlib.util
import json
import os
import pathlib
import shutil
import threading

import pytest

SOURCE_DIR = pathlib.Path(os.environ.get("PMKV_SOURCE_DIR", pathlib.Path(__file__).parents[3]))
_spec = importlib.util.spec_from_file_location(
    "pmkv_integration", SOURCE_DIR / "tests" / "integration" / "conftest.py")
integ = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(integ)


def start_server(tmp_path_factory, *extra):
    src = SOURCE_DIR / "models" / "pmkv-ref"
    model = tmp_path_factory.mktemp("m") / "pmkv-ref-dummy"
    model.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json",
                 "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, model / name)
    pmkv = os.environ.get("PMKV_BIN", str(SOURCE_DIR / "build" / "pmkv"))
    return integ.Server(pmkv, model, "--set", "model.load_format=dummy", "--set",
                        "engine.device=cuda", "--set", "kv_cache.memory=64M", "--set",
                        "server.shutdown_grace_s=5", *extra, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory)
    yield s
    code = s.stop()
    assert code == 0, s.log()[-4000:]


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory):
    """A progressive KV cache: a 16-token window and a uniform 4-bit budget sized for 160 tokens,
    so that generations of 240 tokens (about 2.7 bits a token) flush and demote pages to 8, 4 and
    2 bits without reaching the 2-bit floor."""
    s = start_server(tmp_path_factory, "--set", "kv_cache.window_tokens=16", "--set",
                     "kv_cache.budget.uniform_bits=4", "--set", "kv_cache.budget.max_len=160")
    yield s
    code = s.stop()
    assert code == 0, s.log()[-4000:]


def post(server, path, body):
    status, headers, raw = integ.http_request(server.base_url, "POST", path, json.dumps(body))
    return status, headers, raw


def complete(server, **fields):
    body = {"model": "pmkv-ref-dummy", "prompt": "Once upon a time", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True, **fields}
    status, _, raw = post(server, "/v1/completions", body)
    assert status == 200, raw
    return json.loads(raw)


def test_runs_on_the_gpu(server):
    log = server.log()
    assert "cuda: " in log and "dummy" in log, log[-3000:]
    assert "(bf16, cuda)" in log, log[-3000:]


def test_metrics_show_the_device_waits(server):
    complete(server)
    m = integ.metrics(server.base_url)
    # The engine thread blocked on the GPU for the steps' tokens, and idled between requests.
    assert m["pmkv_engine_device_wait_seconds_total"] > 0
    assert m["pmkv_engine_idle_seconds_total"] > 0


def test_greedy_completion_is_deterministic(server):
    a = complete(server)
    b = complete(server)
    assert a["choices"][0]["finish_reason"] == "length"
    assert a["usage"]["completion_tokens"] == 16
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_seeded_sampling_repeats_and_differs_by_seed(server):
    runs = [complete(server, temperature=1.0, top_p=0.9, top_k=50, seed=s)["choices"][0]["text"]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_penalties_run_on_the_device(server):
    r = complete(server, temperature=0.8, seed=3, repetition_penalty=1.3, frequency_penalty=0.5,
                 presence_penalty=0.5, min_p=0.05)
    assert r["usage"]["completion_tokens"] == 16


def test_logprobs_come_with_device_sampling(server):
    r = complete(server, logprobs=2)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 16
    assert all(len(t) == 2 for t in lp["top_logprobs"])
    # Greedy: the chosen token is the most likely one, and asking changes no token.
    for tok, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert tok == pytest.approx(max(top.values()), abs=1e-6)
    assert r["choices"][0]["text"] == complete(server)["choices"][0]["text"]
    # Seeded sampling draws the same tokens with and without log-probabilities (both sample on
    # the device); the values are the raw logits' (pmkv_test_gpu_backend compares them by id).
    fields = {"temperature": 1.0, "top_k": 40, "seed": 11, "presence_penalty": 0.3}
    plain = complete(server, **fields)["choices"][0]["text"]
    r = complete(server, logprobs=5, **fields)
    assert r["choices"][0]["text"] == plain
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 16
    for tok, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) >= 1 and -1e4 < tok <= max(top.values()) + 1e-6


def test_streaming(server):
    body = {"model": "pmkv-ref-dummy", "prompt": "Once upon a time", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True, "stream": True}
    status, headers, raw = post(server, "/v1/completions", body)
    assert status == 200
    events = [l[len("data: "):] for l in raw.decode().splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                   if json.loads(e)["choices"])
    assert text == complete(server, max_tokens=8)["choices"][0]["text"]


def test_chat_and_concurrency(server):
    results = [None] * 12

    def one(i):
        status, _, raw = post(server, "/v1/chat/completions", {
            "model": "pmkv-ref-dummy", "max_tokens": 12 + i, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": f"Tell story number {i}."}]})
        results[i] = (status, raw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for status, raw in results:
        assert status == 200, raw
        assert json.loads(raw)["choices"][0]["message"]["role"] == "assistant"


def test_bad_input_is_a_400_and_nothing_leaks(server):
    status, _, raw = post(server, "/v1/completions", {"model": "pmkv-ref-dummy",
                                                      "prompt": "x", "max_tokens": -1})
    assert status == 400
    assert "error" in json.loads(raw)
    m = integ.wait_for_idle_kv(server.base_url)
    assert m["pmkv_kv_pool_pages_used"] == 0


def test_progressive_budget_under_load(budget_server):
    """Eight greedy completions of 240 tokens at once under the 4-bit budget: while the batch
    decodes, the window flushes and pages demote, and the layers hold 16-, 8-, 4- and 2-bit pages
    (one decode attention launch each, on parallel branches). The bit-widths a sequence's pages
    take depend only on token counts and budgets (the KV manager, host code), so they are those of
    the same requests on the CPU backend, whose /metrics showed 8-, 4- and 2-bit tokens live
    together; here the whole run takes well under the 100 ms between /metrics' per-bit snapshots.
    Every request gets all its tokens, demotions and flushes happened, and every page comes back."""
    url = budget_server.base_url
    before = integ.metrics(url)
    results = [None] * 8

    def one(i):
        results[i] = post(budget_server, "/v1/completions", {
            "model": "pmkv-ref-dummy", "prompt": f"Story {i}: once upon a time",
            "max_tokens": 240, "temperature": 0, "ignore_eos": True})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for status, _, raw in results:
        assert status == 200, raw
        r = json.loads(raw)
        assert r["usage"]["completion_tokens"] == 240
        assert r["choices"][0]["finish_reason"] == "length"
    m = integ.wait_for_idle_kv(url)
    assert m["pmkv_kv_demotions_total"] > before["pmkv_kv_demotions_total"]
    assert m["pmkv_kv_flushes_total"] > before["pmkv_kv_flushes_total"]
    assert m["pmkv_kv_pool_pages_used"] == 0
    # Alone, twice: the same greedy text over the same mixed-bit pages.
    body = {"model": "pmkv-ref-dummy", "prompt": "Story 3: once upon a time", "max_tokens": 240,
            "temperature": 0, "ignore_eos": True}
    texts = []
    for _ in range(2):
        status, _, raw = post(budget_server, "/v1/completions", body)
        assert status == 200, raw
        texts.append(json.loads(raw)["choices"][0]["text"])
    assert texts[0] == texts[1]
