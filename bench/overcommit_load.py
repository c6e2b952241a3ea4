#!/usr/bin/env python3
"""A KV pool too small for its load: wall time, steps and preemptions of one burst of requests.

Starts `pmkv serve` (the integration tests' helpers) with a pool for about two and a half chains
of 512 tokens, `--admission`, and any further `--set` arguments; sends the mix of
tests/integration/test_serve_load.py (28 requests: completions and chat, n 1-2, 8-400 tokens,
stop strings, penalties, seeds) at once, without streaming or hang-ups; prints one JSON line with
the wall time and the server's counters over the burst.

  .venv/bin/python bench/overcommit_load.py --model /tmp/stories-chatml --admission overcommit \\
      -- --set kv_cache.bit_ladder=[16] --set kv_cache.floor_bits=16

--model: a Hugging Face directory with a chat template (the tests' stories260K + ChatML copy).
"""
import argparse
import asyncio
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

import httpx  # noqa: E402

from conftest import metrics, running_server  # noqa: E402
from test_serve_load import full_length_bytes, request_mix  # noqa: E402

COUNTERS = ("pmkv_preemptions_total", "pmkv_steps_total", "pmkv_kv_demotions_total",
            "pmkv_generation_tokens_total")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pmkv", default=str(HERE.parent / "build" / "pmkv"))
    ap.add_argument("--model", required=True, type=pathlib.Path)
    ap.add_argument("--admission", default="overcommit", choices=["overcommit", "guaranteed"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("extra", nargs="*", help="more `pmkv serve` arguments (after --)")
    args = ap.parse_args()
    serve = ("--set", "engine.max_model_len=512", *args.extra)
    pool = full_length_bytes(args.pmkv, args.model, *serve) * 5 // 2
    with running_server(args.pmkv, args.model, *serve, "--set", f"kv_cache.memory={pool}",
                        "--set", f"scheduler.admission={args.admission}") as server:
        async def burst():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                mix = [(path, {**body, "stream": False})
                       for path, body, _ in request_mix(model, args.seed, 28)]
                before = metrics(server.base_url)
                t0 = time.monotonic()
                replies = await asyncio.gather(*(client.post(p, json=b) for p, b in mix))
                wall = time.monotonic() - t0
                after = metrics(server.base_url)
                assert all(r.status_code == 200 for r in replies)
                return wall, {k: after[k] - before[k] for k in COUNTERS}

        wall, delta = asyncio.run(burst())
    print(json.dumps({"admission": args.admission, "serve_args": list(args.extra),
                      "pool_bytes": pool, "wall_s": round(wall, 3), **delta}))


if __name__ == "__main__":
    os.environ.setdefault("PMKV_SOURCE_DIR", str(HERE.parent))
    main()
