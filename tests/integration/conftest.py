"""Shared fixtures for the integration tests: they drive the real `pmkv` binary.

PMKV_BIN (set by ctest) points at the binary; PMKV_SOURCE_DIR at the checkout.
"""
import contextlib
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

SOURCE_DIR = pathlib.Path(os.environ.get("PMKV_SOURCE_DIR", pathlib.Path(__file__).parents[2]))
SHARED_DIR = SOURCE_DIR.parent / "shared"
GOLDEN_DIR = SOURCE_DIR / "tests" / "fixtures" / "golden"


@pytest.fixture(scope="session")
def pmkv_bin():
    path = os.environ.get("PMKV_BIN", str(SOURCE_DIR / "build" / "pmkv"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"pmkv binary not found at {path} (set PMKV_BIN)")
    return path


def run_pmkv(pmkv_bin, *args, check=True, timeout=300):
    proc = subprocess.run([pmkv_bin, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"pmkv {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stderr}")
    return proc


def generate_json(pmkv_bin, *args):
    proc = run_pmkv(pmkv_bin, "generate", "--json", "--threads", "1", *args)
    return json.loads(proc.stdout)


# The serving tests run against stories260K on the CPU by default. PMKV_TEST_MODEL (a Hugging Face
# model directory) serves another model instead, and PMKV_TEST_SERVE_ARGS adds `pmkv serve`
# arguments, e.g. the CUDA run on the device machine (tests/gpu/serve_cuda/run.sh): the reference
# model's shape with `--set engine.device=cuda --set model.load_format=dummy`. Tests whose
# expectations are stories260K's own (transformers' greedy text, its 512-token context) carry the
# `stories260k_only` mark and are skipped then.
TEST_MODEL = os.environ.get("PMKV_TEST_MODEL")
SERVE_EXTRA = tuple(shlex.split(os.environ.get("PMKV_TEST_SERVE_ARGS", "")))
# Whether a sequence's logits are the same bits alone and in any batch (the CPU backend's are).
BATCH_INVARIANT = "engine.device=cuda" not in " ".join(SERVE_EXTRA)
# Whether the server runs on the CUDA backend (its engine thread then blocks on the device).
ON_CUDA = "engine.device=cuda" in " ".join(SERVE_EXTRA)
# Whether the server runs its steps ahead (engine.async_steps: on, or auto with the CUDA backend).
ASYNC_STEPS = ("engine.async_steps=on" in " ".join(SERVE_EXTRA) or
               ("engine.device=cuda" in " ".join(SERVE_EXTRA) and
                "engine.async_steps=off" not in " ".join(SERVE_EXTRA)))


def pytest_configure(config):
    config.addinivalue_line("markers", "stories260k_only: expectations specific to stories260K")


def pytest_collection_modifyitems(config, items):
    if not TEST_MODEL:
        return
    skip = pytest.mark.skip(reason=f"stories260K-specific; serving {TEST_MODEL}")
    for item in items:
        if "stories260k_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories260k(tmp_path_factory):
    """The served model: stories260K (../shared/models) converted to a Hugging Face directory by
    our converter, or a copy of PMKV_TEST_MODEL (without weights when the server loads dummy ones)."""
    if TEST_MODEL:
        import shutil
        out = tmp_path_factory.mktemp("model") / pathlib.Path(TEST_MODEL).name
        shutil.copytree(TEST_MODEL, out, ignore=shutil.ignore_patterns("*.safetensors"))
        if "load_format=dummy" not in " ".join(SERVE_EXTRA):  # the weights, linked, not copied
            for w in pathlib.Path(TEST_MODEL).glob("*.safetensors"):
                (out / w.name).symlink_to(w.resolve())
        return out
    src = SHARED_DIR / "models" / "stories260K"
    if not (src / "stories260K.bin").exists():
        pytest.skip(f"{src} is not available")
    out = tmp_path_factory.mktemp("stories260K")
    subprocess.run([sys.executable, str(SOURCE_DIR / "tools" / "llama2c_to_hf.py"),
                    "--checkpoint", str(src / "stories260K.bin"),
                    "--tokenizer", str(src / "tok512.model"), "--out", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def served(stories260k):
    """Facts of the served model the tests check against: layers, vocabulary, context."""
    cfg = json.loads((stories260k / "config.json").read_text())
    return {"layers": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"],
            "context": cfg["max_position_embeddings"]}


def stop_string_of(text):
    """A stop string taken from the middle of a greedy continuation (4 characters, not blank) and
    the text a request with it must return: everything before its first occurrence."""
    for k in range(len(text) // 3, len(text) - 4):
        stop = text[k:k + 4]
        if stop.strip() and "\ufffd" not in stop:
            return stop, text[:text.find(stop)]
    raise AssertionError(f"no stop string in {text!r}")


# ---- pmkv serve ---------------------------------------------------------------------------------

CHAT_TEMPLATES = SOURCE_DIR / "tests" / "fixtures" / "chat_templates"


class Server:
    """A running `pmkv serve`; its log is drained into `lines` by a thread (never blocks)."""

    def __init__(self, pmkv_bin, model_dir, *extra, timeout=60, preexec_fn=None):
        import re
        import threading
        import time
        self.proc = subprocess.Popen(
            [pmkv_bin, "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
             "--grpc-port", "0", *map(str, extra)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, preexec_fn=preexec_fn)
        self.lines = []
        self.http_port = self.grpc_port = None
        ready = threading.Event()
        pattern = re.compile(r"pmkv: (HTTP|gRPC) listening on [^\s:]+:(\d+)")

        def drain():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = pattern.search(line)
                if m and m.group(1) == "HTTP":
                    self.http_port = int(m.group(2))
                elif m:
                    self.grpc_port = int(m.group(2))
                if self.http_port and self.grpc_port:
                    ready.set()
            ready.set()

        self.thread = threading.Thread(target=drain, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1) and time.monotonic() < deadline:
            pass
        if not (self.http_port and self.grpc_port):
            self.proc.kill()
            raise AssertionError("pmkv serve did not start:\n" + "".join(self.lines))
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"

    def log(self):
        return "".join(self.lines)

    def stop(self, timeout=60):
        """SIGTERM, then the exit code (0 expected)."""
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("pmkv serve did not stop on SIGTERM:\n" + self.log()[-4000:])
        self.thread.join(timeout=5)
        return code


def model_with_template(base, out, template_file):
    """A copy of a model directory whose tokenizer_config.json has the given chat template."""
    import shutil
    shutil.copytree(base, out, symlinks=True)  # linked weights stay links
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if template_file is None:
        cfg.pop("chat_template", None)
    else:
        cfg["chat_template"] = (CHAT_TEMPLATES / template_file).read_text(encoding="utf-8")
    cfg_path.write_text(json.dumps(cfg))
    return out


# Small and quick on 2 cores: one backend thread, a KV pool for ~8 full-length (512-token) chains.
SERVE_ARGS = ("--set", "kv_cache.memory=32M", "--set", "engine.threads=1",
              "--set", "server.max_body_bytes=1M", "--set", "server.max_n=8",
              "--set", "server.shutdown_grace_s=5")


@contextlib.contextmanager
def running_server(pmkv_bin, model_dir, *extra):
    server = Server(pmkv_bin, model_dir, *SERVE_ARGS, *SERVE_EXTRA, *extra)
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"pmkv serve exited {code}:\n{server.log()[-4000:]}"


@pytest.fixture(scope="session")
def chatml_model(stories260k, tmp_path_factory):
    return model_with_template(stories260k, tmp_path_factory.mktemp("m") / "stories-chatml",
                               "chatml.jinja")


@pytest.fixture(scope="session")
def server(pmkv_bin, chatml_model):
    """`pmkv serve` of stories260K with a ChatML chat template, for the whole session."""
    with running_server(pmkv_bin, chatml_model) as s:
        yield s


@pytest.fixture(scope="session")
def llama2_server(pmkv_bin, stories260k, tmp_path_factory):
    """stories260K with the Llama-2 chat template, behind an API key ("sekret")."""
    model = model_with_template(stories260k, tmp_path_factory.mktemp("m") / "stories-llama2",
                                "llama2.jinja")
    with running_server(pmkv_bin, model, "--set", "server.api_key=sekret") as s:
        yield s


@pytest.fixture(scope="session")
def unsupported_server(pmkv_bin, stories260k, tmp_path_factory):
    """stories260K with a chat template pmkv does not render (Alpaca-style)."""
    model = model_with_template(stories260k, tmp_path_factory.mktemp("m") / "stories-alpaca",
                                "alpaca_unsupported.jinja")
    with running_server(pmkv_bin, model) as s:
        yield s


def http_request(base_url, method, path, body=None, headers=None, timeout=60):
    """(status, headers, body bytes) of one raw HTTP request (no client-side validation)."""
    import urllib.error
    import urllib.request
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metrics(base_url):
    """The /metrics scrape parsed with prometheus_client: {sample name + labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families
    status, _, body = http_request(base_url, "GET", "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def wait_for_idle_kv(base_url, timeout=20):
    """Polls /metrics until no KV page is in use and nothing runs; returns the last scrape."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url)
        if m["pmkv_kv_pool_pages_used"] == 0 and m["pmkv_requests_running"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV pages still in use after {timeout} s: "
                                 f"{m['pmkv_kv_pool_pages_used']}, running "
                                 f"{m['pmkv_requests_running']}")
        time.sleep(0.05)
