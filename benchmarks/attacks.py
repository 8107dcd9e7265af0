"""Issue 17's attacks against a live `personaweave serve` (two API keys, SQLite, loopback).

One JSON line per attack with `ok` (the server behaved) and what was seen; the last line counts.

    python benchmarks/attacks.py [--model DIR] [--pool-size 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from personaweave.testing import free_port  # noqa: E402

KEY_A, KEY_B = "attack-key-a-0123456789abcdef", "attack-key-b-0123456789abcdef"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


def body(content="Hello, how are you?", **kw):
    return {"model": "pirate", "messages": [{"role": "user", "content": content}], **kw}


async def attacks(url: str, results: list) -> None:
    import httpx

    def report(name, ok, **seen):
        results.append(ok)
        print(json.dumps({"attack": name, "ok": bool(ok), **seen}), flush=True)

    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        codes = [(await c.get("/v1/users/alice")).status_code, (await c.delete("/v1/users/alice")).status_code,
                 (await c.post("/v1/chat/completions", json=body(user="alice"))).status_code]
        report("no key: read, delete, chat", codes == [401] * 3, status=codes)

        await c.post("/v1/chat/completions", json=body("my secret: the vault code is 1234", user="alice"), headers=A)
        seen = [(await c.get("/v1/users/alice", headers=B)).status_code,
                (await c.delete("/v1/users/alice", headers=B)).status_code,
                (await c.post("/v1/feedback", json={"user": "alice", "rating": "down"}, headers=B)).status_code]
        mine = (await c.get("/v1/users/alice", headers=A)).json()
        report("key B reads/deletes/rates key A's alice", seen[:2] == [404, 404] and mine["turns"] == 2
               and "feedback" not in mine["state"], status=seen, a_turns=mine["turns"])

        start = time.perf_counter()
        streams = await asyncio.gather(*[c.post("/v1/chat/completions", headers=A, json=body(
            user=f"s{i}", stream=True, temperature=1e-40)) for i in range(6)])
        after = await c.post("/v1/chat/completions", json=body(user="after"), headers=A, timeout=60)
        report("6 streams with temperature=1e-40, then a chat", after.status_code == 200 and all(
            400 <= s.status_code < 500 for s in streams), stream_status=sorted({s.status_code for s in streams}),
            chat_after=after.status_code, seconds=round(time.perf_counter() - start, 1))

        mixed = await asyncio.gather(*[c.post("/v1/chat/completions", json=body(user=f"g{i}"), headers=A)
                                       for i in range(4)],
                                     c.post("/v1/chat/completions", json=body(user="bad", temperature=1e-40), headers=A))
        codes = [r.status_code for r in mixed]
        report("4 good + 1 bad in one batch", codes[:4] == [200] * 4 and codes[4] == 422, status=codes)

        raw = [('{"model": "pirate", "messages": [{"role": "user", "content": "x \\ud800"}]}', "surrogate"),
               ('{"model": "pirate", "stream": true, "messages": [{"role": "user", "content": "x \\ud800"}]}',
                "surrogate, streamed"),
               ('{"model": "blend:pirate=nan,robot=1", "messages": [{"role": "user", "content": "x"}]}', "nan blend"),
               ('{"model": "blend:pirate=inf", "messages": [{"role": "user", "content": "x"}]}', "inf blend"),
               ('{"model": "pirate", "n": 3, "messages": [{"role": "user", "content": "x"}]}', "n=3")]
        for payload, name in raw:
            r = await c.post("/v1/chat/completions", content=payload.encode(), headers={**A, "content-type":
                                                                                          "application/json"})
            report(name, 400 <= r.status_code < 500 and "error" in r.json(), status=r.status_code,
                   message=r.json()["error"]["message"][:90])

        long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "Why is that so? " * 240}
                     for i in range(24)] + [{"role": "user", "content": "And then?"}]
        start = time.perf_counter()
        r = await c.post("/v1/chat/completions", json={"model": "pirate", "messages": long_chat}, headers=A)
        report("prompt over the context window", r.status_code == 400, status=r.status_code,
               message=r.json()["error"]["message"][:120], seconds=round(time.perf_counter() - start, 2))

        before = len((await c.get("/v1/models", headers=A)).json()["data"])
        for i in range(40):
            await c.post("/v1/chat/completions", json=body(model=f"blend:pirate={i + 1},butler=1", max_tokens=1),
                         headers=A)
        listed = [m["id"] for m in (await c.get("/v1/models", headers=A)).json()["data"]]
        after_models = len(listed)
        r80 = (await c.post("/v1/chat/completions", json=body(model="blend:pirate=0.004,butler=0.001"),
                            headers=A)).json()["system_fingerprint"]
        r50 = (await c.post("/v1/chat/completions", json=body(model="blend:pirate=0.001,butler=0.001"),
                            headers=A)).json()["system_fingerprint"]
        metrics = (await c.get("/metrics", headers=A)).text
        bank = next(line for line in metrics.splitlines() if line.startswith("personaweave_bank_size"))
        report("40 blends: bounded bank; 80/20 != 50/50", after_models - before <= args.pool_size and r80 != r50,
               models_before=before, models_after=after_models, bank=bank, blend_80_20=r80, blend_50_50=r50)
        report("/v1/models offers no internal pool slot", not any(m.startswith("pool-") for m in listed)
               and after_models == before, models=listed)

        for i in range(3):  # key A's users rate the A/B experiment; key B must not see them
            await c.post("/v1/chat/completions", json=body(model="ab", user=f"ab{i}", max_tokens=1), headers=A)
            await c.post("/v1/feedback", json={"user": f"ab{i}", "rating": "up"}, headers=A)
        seen_a = (await c.get("/v1/experiments/persona-ab", headers=A)).json()
        seen_b = (await c.get("/v1/experiments/persona-ab", headers=B)).json()
        report("A/B report per key", sum(seen_a["ratings"].values()) == 3 and sum(seen_b["ratings"].values()) == 0,
               ratings_a=seen_a["ratings"], ratings_b=seen_b["ratings"])

        await c.post("/v1/chat/completions", json=body(user="team/alice"), headers=A)
        codes = [(await c.get("/v1/users/team/alice", headers=A)).status_code,
                 (await c.delete("/v1/users/team/alice", headers=A)).status_code]
        report("user id with '/'", codes == [200, 200], status=codes)


def main() -> None:
    global args
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the shipped checkpoint)")
    parser.add_argument("--pool-size", type=int, default=8)
    args = parser.parse_args()
    import httpx

    results: list = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "personaweave.cli", "serve", "--port", str(port), "--db",
               f"sqlite:///{tmp}/a.db", "--max-new-tokens", "8", "--api-key", KEY_A, "--api-key", KEY_B,
               "--pool-size", str(args.pool_size), "--ab-test", "pirate=0.5", "butler=0.5"] + (
            ["--model", args.model] if args.model else [])
        refused = subprocess.run(cmd[:3] + ["serve", "--host", "0.0.0.0", "--port", str(port)], capture_output=True,
                                 text=True, timeout=120, env={**os.environ, "PERSONAWEAVE_API_KEYS": ""})
        results.append(refused.returncode != 0)
        print(json.dumps({"attack": "serve on 0.0.0.0 without keys", "ok": refused.returncode != 0,
                          "stderr": refused.stderr.strip().splitlines()[-1][:120]}), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            asyncio.run(attacks(url, results))
        finally:
            start = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
                stopped = True
            except subprocess.TimeoutExpired:
                proc.kill()
                stopped = False
            results.append(stopped)
            print(json.dumps({"attack": "SIGTERM stops the server", "ok": stopped,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    print(json.dumps({"passed": sum(results), "of": len(results)}))


if __name__ == "__main__":
    main()
