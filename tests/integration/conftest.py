"""Shared fixtures for the integration tests: they drive the real `pmkv` binary.

PMKV_BIN (set by ctest) points at the binary; PMKV_SOURCE_DIR at the checkout.
"""
import json
import os
import pathlib
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


@pytest.fixture(scope="session")
def stories260k(tmp_path_factory):
    """stories260K (../shared/models) converted to a Hugging Face directory by our converter."""
    src = SHARED_DIR / "models" / "stories260K"
    if not (src / "stories260K.bin").exists():
        pytest.skip(f"{src} is not available")
    out = tmp_path_factory.mktemp("stories260K")
    subprocess.run([sys.executable, str(SOURCE_DIR / "tools" / "llama2c_to_hf.py"),
                    "--checkpoint", str(src / "stories260K.bin"),
                    "--tokenizer", str(src / "tok512.model"), "--out", str(out)],
                   check=True, capture_output=True)
    return out
