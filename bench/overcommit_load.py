#!/usr/bin/env python3
"""A KV pool too small for its load: wall time, steps and preemptions of one burst of requests.

Starts `pmkv serve` (the integration tests' helpers) with a pool for about two and a half chains
of 512 tokens, `--admission`, and any further `--set` arguments; sends one burst of requests at
once, without streaming or hang-ups; prints one JSON line with the wall time, the server's
counters over the burst and the completion lengths. `--mix`:
  test: tests/integration/test_serve_load.py's 28 requests (completions and chat, n 1-2, 8-400
        tokens, stop strings, penalties, seeds; most long ones ignore EOS: the worst case for
        overcommit, nearly every chain runs to its end);
  early: 60 seeded completions (temperature 0.8) of 12 random words, max_tokens 400, that stop at
        their first newline (stories260K: 52 / 67 / 109 tokens at p10 / p50 / p90): what
        overcommit is for, requests that end long before their max_tokens.

  .venv/bin/python bench/overcommit_load.py --model /tmp/stories-chatml --admission overcommit \\
      -- --set kv_cache.bit_ladder=[16] --set kv_cache.floor_bits=16

--model: a Hugging Face directory with a chat template (the tests' stories260K + ChatML copy).
"""
import argparse
import asyncio
import json
import os
import pathlib
import random
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

import httpx  # noqa: E402

from conftest import metrics, running_server  # noqa: E402
from test_serve_load import WORDS, full_length_bytes, request_mix  # noqa: E402

COUNTERS = ("pmkv_preemptions_total", "pmkv_steps_total", "pmkv_kv_demotions_total",
            "pmkv_generation_tokens_total")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pmkv", default=str(HERE.parent / "build" / "pmkv"))
    ap.add_argument("--model", required=True, type=pathlib.Path)
    ap.add_argument("--admission", default="overcommit", choices=["overcommit", "guaranteed"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--mix", default="test", choices=["test", "early"])
    ap.add_argument("extra", nargs="*", help="more `pmkv serve` arguments (after --)")
    args = ap.parse_args()
    serve = ("--set", "engine.max_model_len=512", *args.extra)
    pool = full_length_bytes(args.pmkv, args.model, *serve) * 5 // 2
    with running_server(args.pmkv, args.model, *serve, "--set", f"kv_cache.memory={pool}",
                        "--set", f"scheduler.admission={args.admission}") as server:
        async def burst():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                if args.mix == "test":
                    mix = [(path, {**body, "stream": False})
                           for path, body, _ in request_mix(model, args.seed, 28)]
                else:
                    rng = random.Random(args.seed)
                    mix = [("/v1/completions",
                            {"model": model, "max_tokens": 400, "temperature": 0.8, "seed": i,
                             "stop": ["\n"],
                             "prompt": " ".join(rng.choice(WORDS) for _ in range(12))})
                           for i in range(60)]
                before = metrics(server.base_url)
                t0 = time.monotonic()
                replies = await asyncio.gather(*(client.post(p, json=b) for p, b in mix))
                wall = time.monotonic() - t0
                after = metrics(server.base_url)
                assert all(r.status_code == 200 for r in replies)
                lens = sorted(r.json()["usage"]["completion_tokens"] for r in replies)
                return wall, {k: after[k] - before[k] for k in COUNTERS}, lens

        wall, delta, lens = asyncio.run(burst())
    pct = {f"completion_p{q}": lens[min(len(lens) - 1, len(lens) * q // 100)] for q in (10, 50, 90)}
    print(json.dumps({"admission": args.admission, "mix": args.mix, "serve_args": list(args.extra),
                      "pool_bytes": pool, "wall_s": round(wall, 3), **delta, **pct}))


if __name__ == "__main__":
    os.environ.setdefault("PMKV_SOURCE_DIR", str(HERE.parent))
    main()
