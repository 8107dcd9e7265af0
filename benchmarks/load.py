"""Load test of `personaweave serve` on loopback: N concurrent simulated users for a fixed time.

Each user holds a multi-turn conversation (send, wait for the reply, send the next turn). The
server runs as a subprocess (the real CLI, the shipped model, SQLite WAL, long-term memory on),
once per configuration; reported per run: p50/p95 latency, requests/s, completion tokens/s, error
count. The last lines compare each configuration with the first (ratios, same machine, same run).

A configuration is `NAME[@CODE_DIR]:SERVE ARGS`: the server's extra arguments, and optionally a
folder holding another version of the code (e.g. `git archive OLD | tar -x -C /tmp/old`), which the
server then runs from instead of this checkout. `--rounds 2` runs the configurations in turn twice
(A B A B), so a slow drift of the machine's load does not favour one of them.
Default: `--config no-batching:--no-batching --config batching:`.

With `--malformed_every 10`, every 10th request of each user is malformed (a lone surrogate, a
tiny temperature, a NaN blend weight, n=3, a prompt over the context window, in turn): those must
get a 4xx, and the good requests must not fail. `--api_key` runs the server with a key.

    python benchmarks/load.py [--users 16] [--seconds 60] [--max_new_tokens 32] [--malformed_every 10]
                              [--only batching|no-batching] [--api_key KEY] [--rounds 1]
                              [--config "old@/tmp/old:" --config "new:--dtype bfloat16"]
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


MALFORMED = [
    ('{"model": "%s", "user": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "surrogate"),
    ('{"model": "%s", "user": "%s", "temperature": 1e-40, "messages": [{"role": "user", "content": "hi"}]}',
     "tiny temperature"),
    ('{"model": "blend:%s=nan", "user": "%s", "messages": [{"role": "user", "content": "hi"}]}', "nan blend"),
    ('{"model": "%s", "user": "%s", "n": 3, "messages": [{"role": "user", "content": "hi"}]}', "n=3"),
    (None, "over the window"),  # 24 long client-side messages (no user): more tokens than the window
]


def over_the_window(persona: str) -> str:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "Why is that so? " * 240} for i in range(24)]
    return json.dumps({"model": persona, "messages": turns + [{"role": "user", "content": "And then?"}]})


async def malformed(client, user: int, turn: int, bad: dict) -> None:
    raw, kind = MALFORMED[turn % len(MALFORMED)]
    persona = PERSONAS[user % len(PERSONAS)]
    payload = over_the_window(persona) if raw is None else raw % (persona, f"load-{user}")
    response = await client.post("/v1/chat/completions", content=payload.encode(),
                                 headers={"content-type": "application/json"})
    bad["sent"] = bad.get("sent", 0) + 1
    if not 400 <= response.status_code < 500:
        bad.setdefault("unexpected", []).append(f"{kind}: {response.status_code}")


async def user_loop(client, user: int, stop_at: float, latencies: list, tokens: list, errors: list,
                    malformed_every: int = 0, bad: dict | None = None) -> None:
    turn = 0
    while time.monotonic() < stop_at:
        if malformed_every and turn % malformed_every == user % malformed_every:  # users spread their bad ones
            try:
                await malformed(client, user, turn // malformed_every, bad)
            except Exception as err:
                bad.setdefault("unexpected", []).append(type(err).__name__)
            turn += 1
            continue
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


async def run_load(url: str, users: int, seconds: float, malformed_every: int = 0, api_key: str | None = None
                   ) -> dict:
    import httpx

    latencies, tokens, errors, bad = [], [], [], {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:
        start = time.monotonic()
        await asyncio.gather(*[user_loop(client, u, start + seconds, latencies, tokens, errors, malformed_every, bad)
                               for u in range(users)])
        elapsed = time.monotonic() - start
    lat = np.asarray(latencies)
    extra = {"malformed_sent": bad.get("sent", 0), "malformed_not_4xx": bad.get("unexpected", [])[:10]} \
        if malformed_every else {}
    return {**extra, "requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
            "seconds": round(elapsed, 1), "p50_s": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p95_s": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "completion_tokens_per_s": round(sum(tokens) / elapsed, 1)}


def start_server(port: int, db: str, extra: list[str], max_new_tokens: int, model: str | None,
                 api_key: str | None = None, code: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "personaweave.cli", "serve", "--port", str(port), "--db", db,
           "--max-new-tokens", str(max_new_tokens)] + extra
    cmd += ["--model", model] if model else []
    cmd += ["--api-key", api_key] if api_key else []
    env = dict(os.environ)
    if code:  # another version of the code: it comes first on the path (before the editable install)
        env["PYTHONPATH"] = os.path.abspath(code) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(db.replace("sqlite:///", "") + ".log", "w")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env,
                            cwd=os.path.abspath(code) if code else None)
    proc.log_path = log.name
    return proc


def parse_config(text: str) -> tuple[str, str | None, list[str]]:
    """`NAME[@CODE_DIR]:ARGS` -> (name, code folder or None, serve arguments)."""
    head, _, args = text.partition(":")
    name, _, code = head.partition("@")
    return name, code or None, args.split()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(proc.log_path) as log:
                raise RuntimeError(f"server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code in (200, 404):  # up (404: a server before /health)
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
    parser.add_argument("--malformed_every", type=int, default=0, help="every Nth request is malformed (0: none)")
    parser.add_argument("--only", choices=["batching", "no-batching"], help="run one of the default configurations")
    parser.add_argument("--config", action="append", metavar="NAME[@CODE_DIR]:ARGS",
                        help="a server configuration (repeatable; see the docstring)")
    parser.add_argument("--rounds", type=int, default=1, help="run the configurations in turn this many times")
    parser.add_argument("--api_key", help="start the server with this API key and send it")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    configs = [parse_config(c) for c in args.config] if args.config else \
        [parse_config(c) for c in ("no-batching:--no-batching", "batching:") if not args.only or c.startswith(
            args.only + ":")]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, code, extra in configs:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                proc = start_server(port, f"sqlite:///{tmp}/{name}-{round_}.db", extra, args.max_new_tokens,
                                    args.model, args.api_key, code)
                try:
                    wait_ready(url, proc)
                    asyncio.run(run_load(url, 2, 3, api_key=args.api_key))  # warm-up
                    result = asyncio.run(run_load(url, args.users, args.seconds, args.malformed_every, args.api_key))
                    results[name].append(result)
                    emit({"name": "service_load", "config": name, "code": code or "this checkout", "serve_args": extra,
                          "round": round_, "users": args.users, "max_new_tokens": args.max_new_tokens,
                          "malformed_every": args.malformed_every, **result})
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
    first = configs[0][0]
    base = sum(r["completion_tokens_per_s"] for r in results[first])
    for name, _, _ in configs[1:]:
        total = sum(r["completion_tokens_per_s"] for r in results[name])
        if base and total:
            emit({"name": "service_load_ratio", "config": name, "versus": first, "rounds": args.rounds,
                  "completion_tokens_per_s": round(total / base, 2),
                  "requests_per_s": round(sum(r["requests_per_s"] for r in results[name])
                                          / max(1e-9, sum(r["requests_per_s"] for r in results[first])), 2)})


if __name__ == "__main__":
    main()
