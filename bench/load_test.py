#!/usr/bin/env python3
"""Load test of a running `pmkv serve` (or any OpenAI-compatible server) with N concurrent
streaming clients (asyncio + the official openai SDK).

Each of --concurrency workers sends streaming /v1/completions requests back to back until
--requests have been sent in all. Reported over the requests:
  TTFT  time from sending the request to the first chunk that carries text (p50 / p99)
  ITL   gaps between consecutive text chunks of one stream (p50 / p99)
  TPOT  (last chunk - first chunk) / (completion tokens - 1), per request (mean)
  throughput: generated tokens / wall time, and requests / wall time.
  server_*_ms_mean: the means of the server's own histograms over the run (pmkv's /metrics:
  time to first token, inter-token latency, request latency), free of client-side delays.
Token counts come from the server's usage (stream_options.include_usage).

Example (stories260K on the CPU):
  ./build/pmkv serve --model /tmp/stories260K --port 8000 &
  .venv/bin/python bench/load_test.py --base-url http://127.0.0.1:8000/v1 --concurrency 16 \
      --requests 64 --max-tokens 128
"""
import argparse
import asyncio
import json
import statistics
import sys
import time

import urllib.request

import openai


def percentile(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def prompt_of(args):
    """The text prompt, or --prompt-ids N token ids (a model without a tokenizer)."""
    if not args.prompt_ids:
        return args.prompt
    return [3 + (i * 7919) % 1000 for i in range(args.prompt_ids)]


async def one_request(client, args, index):
    start = time.perf_counter()
    stamps = []
    usage = None
    stream = await client.completions.create(
        model=args.model, prompt=prompt_of(args), max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=index, stream=True,
        presence_penalty=args.presence_penalty,
        logprobs=args.logprobs if args.logprobs >= 0 else None,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True} if args.ignore_eos else None)
    async for chunk in stream:
        # Without a tokenizer (token-id prompts) the chunks carry tokens but no text.
        if chunk.choices and (chunk.choices[0].text or args.prompt_ids):
            stamps.append(time.perf_counter())
        if chunk.usage:
            usage = chunk.usage
    tokens = usage.completion_tokens if usage else len(stamps)
    return {"ttft": stamps[0] - start if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tpot": (stamps[-1] - stamps[0]) / (tokens - 1) if len(stamps) > 1 and tokens > 1
            else None,
            "tokens": tokens}


async def run(args):
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                                timeout=args.timeout)
    if not args.model:
        args.model = (await client.models.list()).data[0].id
    queue = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    results = []

    async def worker():
        while not queue.empty():
            results.append(await one_request(client, args, queue.get_nowait()))

    # Warm-up: one short request, not counted.
    await client.completions.create(model=args.model, prompt=prompt_of(args), max_tokens=2)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


ENGINE_COUNTERS = ("pmkv_engine_device_wait_seconds_total", "pmkv_engine_idle_seconds_total",
                   "pmkv_steps_total")


def server_histograms(base_url):
    """{name: (sum, count)} of the server's latency histograms (pmkv /metrics), plus the engine
    thread's time counters and the step count as {name: (value, 0)}, or {}."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            name, _, value = line.partition(" ")
            if name.startswith("pmkv_") and name.endswith("_seconds" + suffix):
                out.setdefault(name[: -len(suffix)], [0.0, 0.0])[slot] = float(value)
        name, _, value = line.partition(" ")
        if name in ENGINE_COUNTERS:
            out[name] = [float(value), 0.0]
    out["wall"] = [time.perf_counter(), 0.0]
    return out


def server_means(before, after):
    """Mean of each histogram over the run, in ms (what the server itself measured)."""
    out = {}
    if all(k in before and k in after for k in ENGINE_COUNTERS):
        # Shares of the engine thread's wall time over the run; the rest is host work.
        wall = after["wall"][0] - before["wall"][0]
        wait, idle, steps = (after[k][0] - before[k][0] for k in ENGINE_COUNTERS)
        out["server_device_wait_share"] = round(wait / wall, 3)
        out["server_idle_share"] = round(idle / wall, 3)
        out["server_host_share"] = round(1 - (wait + idle) / wall, 3)
        if steps > 0:
            out["server_ms_per_step"] = round(1e3 * wall / steps, 3)
    for name, (s1, c1) in after.items():
        if name in ENGINE_COUNTERS or name == "wall":
            continue
        s0, c0 = before.get(name, (0.0, 0.0))
        if c1 > c0:
            short = name.removeprefix("pmkv_").removesuffix("_seconds")
            out[f"server_{short}_ms_mean"] = round(1e3 * (s1 - s0) / (c1 - c0), 3)
    return out


def report(results, wall, args):
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": args.concurrency, "requests": len(results), "max_tokens": args.max_tokens,
        "prompt": args.prompt if not args.prompt_ids else f"{args.prompt_ids} token ids",
        "model": args.model, "temperature": args.temperature, "top_p": args.top_p,
        "presence_penalty": args.presence_penalty, "logprobs": args.logprobs,
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "throughput_tokens_per_s": round(tokens / wall, 1),
        "throughput_requests_per_s": round(len(results) / wall, 2),
        "ttft_ms_p50": round(1e3 * percentile(ttft, 50), 2),
        "ttft_ms_p99": round(1e3 * percentile(ttft, 99), 2),
        "itl_ms_p50": round(1e3 * percentile(itl, 50), 3),
        "itl_ms_p99": round(1e3 * percentile(itl, 99), 3),
        "tpot_ms_mean": round(1e3 * statistics.fmean(tpot), 3) if tpot else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default="", help="default: the first of /v1/models")
    p.add_argument("--concurrency", type=int, default=16, help="streams open at once")
    p.add_argument("--requests", type=int, default=0, help="requests in all (default 4 x N)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--prompt-ids", type=int, default=0,
                   help="send a prompt of this many token ids instead (models without a tokenizer)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--logprobs", type=int, default=-1,
                   help="top log-probabilities per token (0: the token's only; -1: none)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens tokens (default on)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    args.requests = args.requests or 4 * args.concurrency
    before = server_histograms(args.base_url)
    results, wall = asyncio.run(run(args))
    out = report(results, wall, args)
    out.update(server_means(before, server_histograms(args.base_url)))
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
