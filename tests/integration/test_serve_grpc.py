"""`pmkv serve` over gRPC with grpcio (stubs generated from proto/ at test time): Generate
(streaming, cancellation, errors), Tokenize, GetKvStats, UpdateBudgets, health, API key."""
import importlib
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import (ASYNC_STEPS, ON_CUDA, SOURCE_DIR, TEST_MODEL, http_request, metrics,
                      stop_string_of)

PROTO_DIR = SOURCE_DIR / "proto"


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """(pmkv_pb2, pmkv_pb2_grpc) generated with grpc_tools.protoc into a temporary directory."""
    from grpc_tools import protoc
    out = tmp_path_factory.mktemp("stubs")
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}",
            str(PROTO_DIR / "pmkv" / "v1" / "pmkv.proto")]
    assert protoc.main(args) == 0
    sys.path.insert(0, str(out))
    try:
        return (importlib.import_module("pmkv.v1.pmkv_pb2"),
                importlib.import_module("pmkv.v1.pmkv_pb2_grpc"))
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(pb, channel):
    return pb[1].PmkvStub(channel)


def generate(stub, pb, **kw):
    return list(stub.Generate(pb[0].GenerateRequest(**kw), timeout=60))


def test_generate_streams_the_same_text_as_http(server, stub, pb):
    m = pb[0]
    responses = generate(stub, pb, text="Once upon a time",
                         sampling=m.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert len(responses) > 1  # streamed, not one message
    text = "".join(r.text for r in responses)
    assert text == "".join(t.text for r in responses for t in r.tokens)
    assert responses[-1].finish_reason == m.FINISH_REASON_LENGTH
    assert all(r.finish_reason == m.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    prompt = stub.Tokenize(m.TokenizeRequest(text="Once upon a time")).ids
    assert responses[-1].completion_tokens == 20 and responses[-1].prompt_tokens == len(prompt)
    status, _, body = http_request(server.base_url, "POST", "/v1/completions",
                                   '{"prompt": "Once upon a time", "max_tokens": 20, '
                                   '"temperature": 0, "ignore_eos": true}')
    import json
    assert json.loads(body)["choices"][0]["text"] == text


def test_generate_token_ids_chat_stop_and_logprobs(stub, pb):
    m = pb[0]
    prompt = list(stub.Tokenize(m.TokenizeRequest(text="Once upon a time")).ids)
    full = "".join(r.text for r in generate(
        stub, pb, token_ids=m.TokenIds(ids=prompt),
        sampling=m.SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)))
    stop, expected = stop_string_of(full)
    if not TEST_MODEL:  # stories260K's text, as transformers writes it
        stop, expected = "Lily", ", there was a little girl named "
        assert full.startswith(expected + stop)
    ids = generate(stub, pb, token_ids=m.TokenIds(ids=prompt),
                   sampling=m.SamplingParams(temperature=0, max_tokens=48, stop=[stop],
                                             ignore_eos=True),
                   logprobs=2)
    assert "".join(r.text for r in ids) == expected
    assert ids[-1].finish_reason == m.FINISH_REASON_STOP
    tokens = [t for r in ids for t in r.tokens]
    assert all(t.HasField("logprob") and len(t.top_logprobs) == 2 for t in tokens)
    chat = generate(stub, pb, chat=m.ChatMessages(messages=[m.ChatMessage(role="user",
                                                                          content="Hi")]),
                    sampling=m.SamplingParams(max_tokens=4, seed=3, ignore_eos=True))
    assert chat[-1].completion_tokens == 4


def test_generate_bad_input_is_invalid_argument(stub, pb, served):
    m = pb[0]
    cases = [
        (m.GenerateRequest(), "prompt is required"),
        (m.GenerateRequest(token_ids=m.TokenIds(ids=[1, served["vocab"] + 5])),
         "outside the vocabulary"),
        (m.GenerateRequest(text="x", sampling=m.SamplingParams(top_p=2)), "top_p"),
        (m.GenerateRequest(text="x", sampling=m.SamplingParams(max_tokens=100000)), "context"),
        (m.GenerateRequest(text="Once upon a time " * served["context"]), "tokens long"),
        (m.GenerateRequest(text="x", logprobs=50), "logprobs"),
        (m.GenerateRequest(chat=m.ChatMessages()), "empty"),
    ]
    for req, fragment in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in e.value.details(), e.value.details()
    assert generate(stub, pb, text="Hi", sampling=m.SamplingParams(max_tokens=2))


def test_cancelled_generate_frees_its_pages(stub, pb, served):
    m = pb[0]
    # Long (up to 2048 tokens): the generation must still run when GetKvStats is asked (450
    # tokens of the small reference model could finish before that on a loaded 2-core machine).
    call = stub.Generate(m.GenerateRequest(
        text="Once upon a time",
        sampling=m.SamplingParams(max_tokens=min(served["context"] - 32, 2048), ignore_eos=True)))
    first = next(call)
    assert first.tokens

    def pages_used():
        return stub.GetKvStats(m.GetKvStatsRequest()).pages_used

    def wait_until(cond, what):  # 20 s at most
        deadline = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    # Stats are published after each engine step, so a streamed token can reach us before the
    # snapshot of its step: wait for the snapshot that shows the running sequence's pages.
    wait_until(lambda: pages_used() > 0, "a running generation shows no KV pages")
    call.cancel()
    wait_until(lambda: pages_used() == 0, "pages not freed after cancel")


def test_tokenize(stub, pb, served):
    m = pb[0]
    r = stub.Tokenize(m.TokenizeRequest(text="Once upon a time"))
    if not TEST_MODEL:
        assert list(r.ids) == [1, 403, 407, 261, 378]
    assert r.pieces[0] == "<s>" and r.max_model_len == served["context"]
    bare = stub.Tokenize(m.TokenizeRequest(text="Once upon a time", add_special_tokens=False))
    assert list(bare.ids) == list(r.ids)[1:]
    chat = stub.Tokenize(m.TokenizeRequest(chat=m.ChatMessages(
        messages=[m.ChatMessage(role="user", content="Hi")])))
    # "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", as text (not in the vocabulary)
    assert len(chat.ids) > 10 and "".join(chat.pieces).count("im") == 3


def test_kv_stats_and_budgets(stub, pb, served, server):
    m = pb[0]
    before = metrics(server.base_url)["pmkv_discarded_tokens_total"]
    s = stub.GetKvStats(m.GetKvStatsRequest())
    after = metrics(server.base_url)["pmkv_discarded_tokens_total"]
    assert s.async_steps == ASYNC_STEPS
    assert before <= s.discarded_tokens_total <= after  # the counter /metrics shows
    assert (s.device_wait_seconds_total > 0) == ON_CUDA and s.idle_seconds_total > 0
    assert s.pages_total > 0 and s.page_bytes > 0
    assert s.bytes_total == s.pages_total * s.page_bytes
    assert [b.bits for b in s.by_bits] == [16, 8, 4, 2]
    assert len(s.layers) == served["layers"] and s.budgets_source == "none"
    assert s.key_scales_source == "none" and s.budget_chain_tokens == 0
    r = stub.UpdateBudgets(m.UpdateBudgetsRequest(uniform_bytes=4 * s.page_bytes))
    assert list(r.per_layer_bytes) == [4 * s.page_bytes] * served["layers"]
    # Four pages a layer: the sink's and three window pages, far from a full context.
    assert 0 < r.budget_chain_tokens < served["context"]
    generate(stub, pb, text="Hi", sampling=m.SamplingParams(max_tokens=2))  # a step applies it
    s = stub.GetKvStats(m.GetKvStatsRequest())
    assert s.budget_chain_tokens == r.budget_chain_tokens
    assert metrics(server.base_url)["pmkv_kv_budget_chain_tokens"] == r.budget_chain_tokens
    assert s.budgets_source == "runtime"
    assert all(layer.budget_bytes == 4 * s.page_bytes for layer in s.layers)
    with pytest.raises(grpc.RpcError) as e:
        stub.UpdateBudgets(m.UpdateBudgetsRequest(per_layer=m.PerLayerBudgets(bytes=[1, 2])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.UpdateBudgets(m.UpdateBudgetsRequest())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # An "unlimited" budget holds a full context; it once sized a scratch pool by its bytes
    # (INT64_MAX: an UNKNOWN status; 2^62: seconds of CPU and gigabytes).
    for huge in (2**63 - 1, 2**62):
        r = stub.UpdateBudgets(m.UpdateBudgetsRequest(uniform_bytes=huge), timeout=5)
        assert r.budget_chain_tokens == served["context"]
    r = stub.UpdateBudgets(m.UpdateBudgetsRequest(clear=True))
    assert list(r.per_layer_bytes) == [] and r.budget_chain_tokens == 0
    generate(stub, pb, text="Hi", sampling=m.SamplingParams(max_tokens=2))
    assert stub.GetKvStats(m.GetKvStatsRequest()).budget_chain_tokens == 0


def test_health(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pmkv.v1.Pmkv"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_api_key(llama2_server, pb):
    m, g = pb
    with grpc.insecure_channel(llama2_server.grpc_target) as ch:
        stub = g.PmkvStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(m.TokenizeRequest(text="x"))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Tokenize(m.TokenizeRequest(text="x"),
                           metadata=[("authorization", "Bearer sekret")])
        assert ok.ids
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
            health_pb2.HealthCheckResponse.SERVING
