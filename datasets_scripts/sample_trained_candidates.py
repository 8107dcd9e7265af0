"""Expert iteration: N sampled replies per (user turn, persona) from the *trained* model.

The second round of the v2 data (issue: persona quality). The candidates of
`generate_candidates.py` come from the prompted base model; these come from a trained PersonaWeave
folder speaking through its persona tokens (and, with `--adapter lora`, the persona's LoRA
sub-personality; `--adapter dpo` the shared DPO adapter). The shards have the same layout, index and
turns as the round-1 shards (read from their `turns.json`), plus an `origin` column, so that

    python datasets_scripts/build_persona_dialogues_v2.py --shards datasets_scripts/shards/v2 \
        datasets_scripts/shards/v2_round2 --out personaweave/data/persona_dialogues_v2

lets the selection judge pick the best reply over both rounds for every (turn, persona).
Resumable like round 1: existing shards are skipped, each shard is written to a temp file and renamed.

    python datasets_scripts/sample_trained_candidates.py --model outputs/v2_all \
        --round1 datasets_scripts/shards/v2 --out datasets_scripts/shards/v2_round2 --splits train
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from generate_candidates import sample_replies  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained PersonaWeave folder (with LoRA sub-personalities)")
    parser.add_argument("--round1", default="datasets_scripts/shards/v2", help="round-1 shards (their turns.json)")
    parser.add_argument("--out", default="datasets_scripts/shards/v2_round2")
    parser.add_argument("--adapter", default="lora", choices=["lora", "dpo", "none"])
    parser.add_argument("--num_samples", type=int, default=6)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--repetition_penalty", type=float, default=1.2)
    parser.add_argument("--splits", nargs="+", default=["train"], help="only shards holding turns of these splits")
    parser.add_argument("--only_existing", action="store_true",
                        help="only shards whose round-1 file exists (so both rounds cover the same turns)")
    parser.add_argument("--max_shards", type=int, default=None, help="stop after this many new shards")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch_size", type=int, default=16, help="(turn, persona) pairs per generate call")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_samples < 1 or not 0 < args.temperature < 100:
        raise SystemExit("error: --num_samples must be >= 1 and --temperature in (0, 100)")

    import pandas as pd

    from personaweave.chat import chat
    from personaweave.loading import load_model
    from personaweave.sub_personalities import master_only, set_sub_personality, sub_personalities
    from personaweave.zoo import load_default_personas

    manifest_path = os.path.join(args.round1, "turns.json")
    if not os.path.exists(manifest_path):
        raise SystemExit(f"error: no turns.json in {args.round1} (run generate_candidates.py first)")
    manifest = json.load(open(manifest_path, encoding="utf-8"))
    turns, per_shard = manifest["turns"], manifest["settings"]["turns_per_shard"]
    model, tokenizer, peft = load_model(args.model)
    model.to(getattr(torch, args.dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    known = sub_personalities(peft) if peft is not None else []
    names = [n for n in model.config.persona_names if not n.startswith("blend_")]
    if args.adapter == "lora" and (missing := [n for n in names if n not in known]):
        raise SystemExit(f"error: {args.model} has no LoRA sub-personality for {missing}")
    if args.adapter == "dpo" and "dpo" not in known:
        raise SystemExit(f"error: {args.model} has no 'dpo' adapter")
    descriptions = {p.name: p.description for p in load_default_personas()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "turns.json"), "w", encoding="utf-8") as handle:
        json.dump({**manifest, "round2": {k: v for k, v in vars(args).items() if k not in ("out", "max_shards", "threads")}},
                  handle, indent=1)

    shards = [turns[i:i + per_shard] for i in range(0, len(turns), per_shard)]
    wanted = set(args.splits)
    done_new = 0
    origin = f"trained:{os.path.basename(os.path.normpath(args.model))}:{args.adapter}"
    for index, shard in enumerate(shards):
        path = os.path.join(args.out, f"shard-{index:05d}.parquet")
        if os.path.exists(path) or not any(t["split"] in wanted for t in shard):
            continue
        round1 = os.path.join(args.round1, f"shard-{index:05d}.parquet")
        if args.only_existing and not os.path.exists(round1):
            continue
        if args.max_shards is not None and done_new >= args.max_shards:
            break
        start, rows, new_tokens = time.time(), [], 0
        for p_index, name in enumerate(names):
            if args.adapter == "lora":
                set_sub_personality(peft, name)
            elif args.adapter == "dpo":
                set_sub_personality(peft, "dpo")
            runner = model if args.adapter == "none" or peft is None else peft
            for first in range(0, len(shard), args.batch_size):
                chunk = shard[first:first + args.batch_size]
                context = master_only(peft) if args.adapter == "none" else contextlib.nullcontext()
                with context:
                    samples = sample_replies(runner, tokenizer, [chat(name, t["prompt"], model=model) for t in chunk],
                                             args.num_samples, args.max_new_tokens, args.temperature, args.top_p,
                                             args.repetition_penalty,
                                             seed=args.seed * 100003 + index * 101 + p_index * 7 + first)
                for turn, replies in zip(chunk, samples):
                    for j, (reply, length) in enumerate(replies):
                        new_tokens += length
                        rows.append({"shard": index, "prompt": turn["prompt"], "source": turn["source"],
                                     "split": turn["split"], "persona": name, "description": descriptions.get(name, ""),
                                     "sample": j, "reply": reply, "new_tokens": length,
                                     "dtype": args.dtype, "origin": origin})
        seconds = time.time() - start
        tmp = path + ".tmp"
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        done_new += 1
        print(json.dumps({"shard": index, "rows": len(rows), "new_tokens": new_tokens, "seconds": round(seconds, 1),
                          "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1), "origin": origin}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
