"""Bounded state: N distinct blends and N adaptive users through the service (issue 17).

In-process (ASGI client, SQLite in a temporary folder), the tiny test model by default or the shipped
one with `--shipped`. Every 100 requests of each kind: the persona bank's size, the tokenizer's
size, the process's RSS and the mean latency of those 100 requests. With the LRU pool the first
three stay flat and the latency does not grow with the number of blends or users seen.

    python benchmarks/bounded_state.py [--n 1000] [--pool_size 32] [--shipped]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--pool_size", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=2)
    parser.add_argument("--shipped", action="store_true", help="the shipped model instead of the tiny test model")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()

    import httpx

    from personaweave.serving import PersonaService, Storage, create_app
    from personaweave.serving.adaptation.engine import TraitAdaptationEngine
    from personaweave.serving.memory import Memory
    from personaweave.testing import tiny_persona_model

    if args.shipped:
        from personaweave.loading import load_model

        model, tok, _ = load_model(with_adapters=False)
        memory = Memory()
    else:
        model, tok = tiny_persona_model()
        memory = None
    model.eval()
    names = [n for n in model.config.persona_names][:2]

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        service = PersonaService(model, tok, Storage(f"sqlite:///{tmp}/b.sqlite"), memory=memory,
                                 max_new_tokens=args.max_tokens, adapter=TraitAdaptationEngine(model, tok),
                                 pool_size=args.pool_size)
        app = create_app(service)

        async def run():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
                for kind in ("blend", "auto"):
                    latencies = []
                    for i in range(args.n):
                        spec = f"blend:{names[0]}={i + 1},{names[1]}=1" if kind == "blend" else "auto"
                        start = time.perf_counter()
                        r = await client.post("/v1/chat/completions", json={
                            "model": spec, "user": f"{kind}-{i}", "max_tokens": args.max_tokens,
                            "messages": [{"role": "user", "content": "hello what should i read ?"}]})
                        latencies.append(time.perf_counter() - start)
                        assert r.status_code == 200, r.text
                        if (i + 1) % 100 == 0 or i == 0:
                            recent = latencies[-100:]
                            emit({"name": "bounded_state", "kind": kind, "requests": i + 1,
                                  "bank": len(model.config.personas), "tokenizer": len(tok),
                                  "embedding_rows": model.get_input_embeddings().weight.shape[0],
                                  "pool_used": len(service.pool.entries), "evictions": service.pool.evictions,
                                  "user_locks": len(service.user_locks), "rss_mb": round(rss_mb(), 1),
                                  "ms_per_request": round(1000 * sum(recent) / len(recent), 1)})

        asyncio.run(run())


if __name__ == "__main__":
    main()
