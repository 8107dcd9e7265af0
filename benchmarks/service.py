"""Service throughput: N concurrent users (one turn each, the personas in turn), without batching, with
continuous batching, and with continuous batching plus each persona's LoRA sub-personality (the users'
adapters mixed in one batch, as `serve` runs by default).

    python benchmarks/service.py [--users 8] [--max_new_tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def burst(app, users: int, personas: list[str]) -> float:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*[client.post("/v1/chat/completions", json={
            "model": personas[i % len(personas)], "user": f"user{i}",
            "messages": [{"role": "user", "content": f"Tell me something about topic number {i}."}]})
            for i in range(users)])
        elapsed = time.perf_counter() - start
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()

    from personaweave.loading import has_shipped_checkpoint, load_pretrained_personas
    from personaweave.serving import PersonaService, Storage, create_app

    peft = None
    if has_shipped_checkpoint():
        model, tok, _ = load_pretrained_personas(with_adapters=False)
        lora_model, _, peft = load_pretrained_personas()  # a second copy: peft puts the LoRA layers in its master
    else:
        from personaweave import from_base

        model, tok = from_base(personas="default")
    personas = model.config.persona_names
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batching, lora in (("one_at_a_time", False, False), ("batched", True, False),
                                     ("batched_lora", True, True)):
            if lora and peft is None:
                continue
            service = PersonaService(lora_model if lora else model, tok, Storage(f"sqlite:///{tmp}/{name}.db"), memory=None,
                                     max_new_tokens=args.max_new_tokens, batching=batching,
                                     peft=peft if lora else None)
            app = create_app(service)
            asyncio.run(burst(app, 2, personas))  # warm-up
            service.batcher.batch_sizes.clear()
            seconds = asyncio.run(burst(app, args.users, personas))
            results[name] = seconds
            print(json.dumps({"name": "service_burst", "condition": name, "batching": batching,
                              "sub_personalities": sorted(service.sub_personalities), "users": args.users,
                              "seconds": round(seconds, 2), "requests_per_s": round(args.users / seconds, 2),
                              "batch_sizes": list(service.batcher.batch_sizes)}), flush=True)
    print(json.dumps({"name": "service_batching_speedup", "ratio": round(results["one_at_a_time"] / results["batched"], 2)}))
    if "batched_lora" in results:
        print(json.dumps({"name": "service_lora_slowdown", "ratio": round(results["batched_lora"] / results["batched"], 2)}))


if __name__ == "__main__":
    main()
