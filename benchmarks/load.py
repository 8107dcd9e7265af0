"""Load test of `personaweave serve` on loopback: N concurrent simulated users for a fixed time.

Each user holds a multi-turn conversation (send, wait for the reply, send the next turn). The
server runs as a subprocess (the real CLI, the shipped model, SQLite WAL, long-term memory on),
once with dynamic batching and once without; reported per run: p50/p95 latency, requests/s,
completion tokens/s, error count. The last line compares the two runs (ratios, same machine).

    python benchmarks/load.py [--users 16] [--seconds 60] [--max_new_tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from personaweave.testing import free_port  # noqa: E402

PERSONAS = ["pirate", "robot", "butler", "librarian", "coach", "counselor", "grump", "scientist"]
TURNS = ["Hi! How are you today?", "What should I cook tonight?", "Tell me about the sea.",
         "Any advice for a job interview?", "What's your favourite book?", "Why is the sky blue?",
         "I feel a bit tired lately.", "Can you recommend a hobby?", "What do you think of cats?",
         "Thanks, that was nice."]


async def user_loop(client, user: int, stop_at: float, latencies: list, tokens: list, errors: list) -> None:
    turn = 0
    while time.monotonic() < stop_at:
        body = {"model": PERSONAS[user % len(PERSONAS)], "user": f"load-{user}",
                "messages": [{"role": "user", "content": TURNS[turn % len(TURNS)]}]}
        start = time.perf_counter()
        try:
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                errors.append(response.status_code)
            else:
                latencies.append(time.perf_counter() - start)
                tokens.append(response.json()["usage"]["completion_tokens"])
        except Exception as err:  # a refused connection or a timeout counts as an error
            errors.append(type(err).__name__)
        turn += 1


async def run_load(url: str, users: int, seconds: float) -> dict:
    import httpx

    latencies, tokens, errors = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        start = time.monotonic()
        await asyncio.gather(*[user_loop(client, u, start + seconds, latencies, tokens, errors)
                               for u in range(users)])
        elapsed = time.monotonic() - start
    lat = np.asarray(latencies)
    return {"requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
            "seconds": round(elapsed, 1), "p50_s": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p95_s": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "completion_tokens_per_s": round(sum(tokens) / elapsed, 1)}


def start_server(port: int, db: str, batching: bool, max_new_tokens: int, model: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "personaweave.cli", "serve", "--port", str(port), "--db", db,
           "--max-new-tokens", str(max_new_tokens)] + ([] if batching else ["--no-batching"])
    cmd += ["--model", model] if model else []
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--model", help="model folder (default: the shipped checkpoint)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batching in (False, True):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(port, f"sqlite:///{tmp}/{batching}.db", batching, args.max_new_tokens, args.model)
            try:
                wait_ready(url, proc)
                asyncio.run(run_load(url, 2, 3))  # warm-up
                results[batching] = run_load_result = asyncio.run(run_load(url, args.users, args.seconds))
                print(json.dumps({"name": "service_load", "batching": batching, "users": args.users,
                                  "max_new_tokens": args.max_new_tokens, **run_load_result}), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    if results[False]["requests"] and results[True]["requests"]:
        print(json.dumps({"name": "service_load_batching_ratio",
                          "requests_per_s": round(results[True]["requests_per_s"] / results[False]["requests_per_s"], 2),
                          "p50_latency": round(results[True]["p50_s"] / results[False]["p50_s"], 2)}))


if __name__ == "__main__":
    main()
