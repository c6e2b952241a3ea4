#!/usr/bin/env python3
"""Does a greedy completion depend on the load beside it? Against a running `pmkv serve`.

For each of --prompts random prompts (--words words from a small vocabulary, --seed), one greedy
/v1/completions request (--max-tokens, ignore_eos) is sent alone, then again 50 ms after
--others greedy requests of one word and --others-tokens tokens were started, so that it is
admitted beside that many decoding sequences: its prompt is then cut into other chunks (the step's
token budget, `scheduler.max_step_tokens`, minus one token a decoding sequence). Reports how many of
the pairs gave the same text, as one JSON line.

Under `guaranteed` admission the pairs agree, with a 16-bit cache and (since 519bb56: prompts
held at 16 bits until their last chunk, steps reading the cache from before their own flushes)
below 16 bits; with `--set kv_cache.hold_prompt=false` the chunking changes which prompt tokens
later chunks read quantized (engine/serving/README.md, Invariants). Example (stories260K, see
bench/RESULTS.md, "KV-cache quality"):
  ./build/pmkv serve --model /tmp/stories260K --port 8000 --set scheduler.max_step_tokens=200 \\
      --set kv_cache.window_tokens=32 --set kv_cache.budget.uniform_bits=2 \\
      --set kv_cache.budget.max_len=420 &
  .venv/bin/python bench/kv_load_dependence.py --base-url http://127.0.0.1:8000 --prompts 6
"""
import argparse
import asyncio
import json
import random

import httpx

WORDS = "once upon a time there was a little girl who liked to play with her dog in the sun".split()


async def complete(client, body):
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    j = r.json()
    return j["choices"][0]["text"], j["usage"]["prompt_tokens"]


async def main(args):
    rng = random.Random(args.seed)
    same, rows = 0, []
    async with httpx.AsyncClient(base_url=args.base_url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for _ in range(args.prompts):
            body = {"model": model, "prompt": " ".join(rng.choice(WORDS) for _ in range(args.words)),
                    "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
            alone, prompt_tokens = await complete(client, body)
            other = {"model": model, "prompt": "once", "max_tokens": args.others_tokens,
                     "temperature": 0.0, "ignore_eos": True}

            async def later():
                await asyncio.sleep(0.05)
                return await complete(client, body)

            results = await asyncio.gather(*(complete(client, other) for _ in range(args.others)),
                                           later())
            loaded = results[-1][0]
            same += loaded == alone
            first = next((i for i, (a, b) in enumerate(zip(alone, loaded)) if a != b),
                         None if alone == loaded else min(len(alone), len(loaded)))
            rows.append({"prompt_tokens": prompt_tokens, "equal": alone == loaded,
                         "first_different_char": first})
    print(json.dumps({"prompts": args.prompts, "equal": same, "words": args.words,
                      "others": args.others, "max_tokens": args.max_tokens, "rows": rows}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--words", type=int, default=250)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--others", type=int, default=37)
    ap.add_argument("--others-tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    asyncio.run(main(ap.parse_args()))
