"""Does `personaweave serve --dtype bfloat16` change what the service says? float32 vs bfloat16.

The shipped model answers held-out test turns (the v2 candidates' test split) as each of its
personas, greedy with the service's repetition penalty, through the service's own continuous batcher;
once in float32 and once in bfloat16. Reported: persona accuracy under the evaluation judge
(`EvaluationJudge.from_default_personas()`, never used for training) for both, how many replies are
identical, how many leading tokens agree, and the decode time of each.

    python benchmarks/serve_dtype.py [--turns 24] [--max_new_tokens 32] [--max_batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=24)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument("--shards", default="datasets_scripts/shards/v2")
    parser.add_argument("--out", default="benchmarks/results/serve_dtype.json")
    args = parser.parse_args()

    import torch
    from persona_quality import held_out_candidates

    from personaweave.chat import chat
    from personaweave.evaluation.judges import EvaluationJudge
    from personaweave.loading import load_model
    from personaweave.serving.app import REPETITION_PENALTY
    from personaweave.serving.batching import ContinuousBatcher, Generation

    _, turns = held_out_candidates(args.shards, "test", args.turns)
    model, tok, _ = load_model(with_adapters=False)
    model.eval()
    judge = EvaluationJudge.from_default_personas()
    names = [n for n in model.config.persona_names if n in judge.names]
    targets = [n for n in names for _ in turns]
    prompts = [t for _ in names for t in turns]
    ids = [tok(tok.apply_chat_template(chat(n, t, model=model), add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"] for n, t in zip(targets, prompts)]

    runs = {}
    for dtype in ("float32", "bfloat16"):
        model.to(getattr(torch, dtype))
        batcher = ContinuousBatcher(model, max_batch=args.max_batch, max_queue=len(ids))

        async def run(batcher: ContinuousBatcher):
            return await asyncio.gather(*[batcher.submit(Generation(prompt=p, max_new_tokens=args.max_new_tokens,
                                                                    repetition_penalty=REPETITION_PENALTY))
                                          for p in ids])

        start = time.perf_counter()
        gens = asyncio.run(run(batcher))
        seconds = time.perf_counter() - start
        replies = [tok.decode(g.tokens, skip_special_tokens=True).strip() for g in gens]
        verdicts = judge.judge(prompts, replies, targets)
        runs[dtype] = {"tokens": [g.tokens for g in gens], "replies": replies, "seconds": round(seconds, 1),
                       "completion_tokens": sum(len(g.tokens) for g in gens),
                       "persona_accuracy": verdicts.summary()["persona_accuracy"],
                       "persona_prob": verdicts.summary()["persona_prob"],
                       "relevance": verdicts.summary()["relevance"]}
        print(json.dumps({"name": "serve_dtype", "dtype": dtype, "replies": len(replies),
                          **{k: v for k, v in runs[dtype].items() if k not in ("tokens", "replies")}}), flush=True)

    full, low = runs["float32"]["tokens"], runs["bfloat16"]["tokens"]
    same = sum(a == b for a, b in zip(full, low))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(full, low)]
    summary = {"name": "serve_dtype_agreement", "replies": len(full), "turns": len(turns), "personas": len(names),
               "identical_replies": same, "identical_share": round(same / len(full), 3),
               "mean_agreeing_leading_tokens": round(sum(prefix) / len(prefix), 1),
               "persona_accuracy": {k: round(v["persona_accuracy"], 3) for k, v in runs.items()},
               "seconds": {k: v["seconds"] for k, v in runs.items()}}
    print(json.dumps(summary), flush=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "prompts": prompts, "personas": targets,
                   "replies": {k: v["replies"] for k, v in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
