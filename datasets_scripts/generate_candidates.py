"""Best-of-N candidates for the persona dialogue dataset v2: N sampled replies per (user turn, persona).

Each (user turn, persona) gets `--num_samples` replies from the prompted base model (persona
description in the system prompt, temperature 0.9). Nothing is judged here: the selection judge
picks the best (and the worst, for preference pairs) later, in `build_persona_dialogues_v2.py`,
so judging can change without regenerating.

Work is cut into shards of `--turns_per_shard` user turns x all personas x N samples, written as
parquet (temp file, then rename). A run skips shards that already exist, so an interrupted run
resumes where it stopped; commit finished shards as they arrive. Held-out (test) turns come first,
so the best-of-N ceiling can be measured before the training turns are done.

Usage:
    python datasets_scripts/generate_candidates.py --out datasets_scripts/shards/v2          # all shards
    python datasets_scripts/generate_candidates.py --out /tmp/c --num_turns 16 --max_shards 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from build_persona_dialogues import (  # noqa: E402
    SHARED,
    SHIPPABLE_SOURCES,
    SYSTEM_TEMPLATE,
    collect_turns,
    pick_turns,
    split_of,
)

SPLIT_ORDER = {"test": 0, "validation": 1, "train": 2}


def ordered_turns(num_turns: int, sources: list[str], shared: str, seed: int, val_share: float,
                  test_share: float) -> list[dict]:
    """The turns with their split, held-out (test) first, then validation, then train; stable."""
    turns = pick_turns(collect_turns(sources, shared), num_turns, seed)
    rows = [{"prompt": t.text, "source": t.source, "split": split_of(t.text, seed, val_share, test_share)}
            for t in turns]
    return sorted(rows, key=lambda r: SPLIT_ORDER[r["split"]])  # stable: keeps pick order within a split


@torch.no_grad()
def sample_replies(model, tokenizer, conversations: list[list[dict[str, str]]], num_samples: int, max_new_tokens: int,
                   temperature: float, top_p: float, repetition_penalty: float, seed: int) -> list[list[tuple[str, int]]]:
    """`num_samples` sampled (reply, new tokens) for each chat-format conversation, in one batched generate call."""
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=True, temperature=temperature, top_p=top_p,
                         repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                         num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    lengths = (new != tokenizer.pad_token_id).sum(dim=1).tolist()
    replies = [re.sub(r"\s+", " ", d).strip() for d in decoded]
    return [[(replies[i * num_samples + j], lengths[i * num_samples + j]) for j in range(num_samples)]
            for i in range(len(conversations))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datasets_scripts/shards/v2")
    parser.add_argument("--num_turns", type=int, default=960)
    parser.add_argument("--turns_per_shard", type=int, default=16)
    parser.add_argument("--num_samples", type=int, default=6)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--repetition_penalty", type=float, default=1.2)
    parser.add_argument("--val_share", type=float, default=0.12)
    parser.add_argument("--test_share", type=float, default=0.12)
    parser.add_argument("--sources", nargs="+", default=list(SHIPPABLE_SOURCES))
    parser.add_argument("--shared_data", default=SHARED)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_shards", type=int, default=None, help="stop after this many new shards")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 where the CPU has AMX or AVX-512 BF16 (~1.7x faster there), else float32 "
                             "(emulated bfloat16 is ~50x slower); each row records the dtype it was sampled in")
    parser.add_argument("--pairs_per_call", type=int, default=16,
                        help="(turn, persona) pairs per generate call; x num_samples sequences per batch")
    parser.add_argument("--personas", default="default", choices=["default", "style"],
                        help="persona set (personaweave.zoo.load_persona_set): the eight defaults or the 64 "
                             "composed style personas of issue 15 (recorded in turns.json for the builder)")
    parser.add_argument("--first_shard", type=int, default=0,
                        help="skip shards before this index: a second process started with a later first shard "
                             "works on other shards than the first one (both skip finished shards)")
    parser.add_argument("--splits", nargs="+", default=["test", "validation", "train"],
                        help="shards holding turns of these splits, in this order of priority")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        from personaweave.generation import cpu_has_fast_bfloat16

        args.dtype = "bfloat16" if torch.cuda.is_available() or cpu_has_fast_bfloat16() else "float32"

    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personaweave.zoo import load_persona_set, smollm2_folder

    turns = ordered_turns(args.num_turns, args.sources, args.shared_data, args.seed, args.val_share, args.test_share)
    os.makedirs(args.out, exist_ok=True)
    manifest = {"turns": turns, "settings": {k: v for k, v in vars(args).items()
                                             if k not in ("out", "max_shards", "splits", "threads", "first_shard")}}
    with open(os.path.join(args.out, "turns.json"), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    location, extra = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(location, **extra, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    personas = load_persona_set(args.personas)

    shards = [turns[i:i + args.turns_per_shard] for i in range(0, len(turns), args.turns_per_shard)]
    # Shard indices stay those of the full, ordered turn list (so resuming finds the same shards);
    # `--splits` only chooses which shards go first.
    rank = {split: r for r, split in enumerate(args.splits)}
    order = sorted((i for i, shard in enumerate(shards)
                    if i >= args.first_shard and any(t["split"] in rank for t in shard)),
                   key=lambda i: (min(rank.get(t["split"], len(rank)) for t in shards[i]), i))
    done_new = 0
    for index in order:
        shard = shards[index]
        path = os.path.join(args.out, f"shard-{index:05d}.parquet")
        if os.path.exists(path):
            continue
        if args.max_shards is not None and done_new >= args.max_shards:
            break
        start, rows, new_tokens = time.time(), [], 0
        pairs = [(turn, p_index, persona) for p_index, persona in enumerate(personas) for turn in shard]
        for call, first in enumerate(range(0, len(pairs), args.pairs_per_call)):
            chunk = pairs[first:first + args.pairs_per_call]
            conversations = [[{"role": "system", "content": SYSTEM_TEMPLATE.format(description=persona.description)},
                              {"role": "user", "content": turn["prompt"]}] for turn, _, persona in chunk]
            samples = sample_replies(model, tokenizer, conversations, args.num_samples, args.max_new_tokens,
                                     args.temperature, args.top_p, args.repetition_penalty,
                                     seed=args.seed * 100003 + index * 101 + call)
            for (turn, _, persona), replies in zip(chunk, samples):
                for sample_index, (reply, length) in enumerate(replies):
                    new_tokens += length
                    rows.append({"shard": index, "prompt": turn["prompt"], "source": turn["source"],
                                 "split": turn["split"], "persona": persona.name, "description": persona.description,
                                 "sample": sample_index, "reply": reply, "new_tokens": length,
                                 "dtype": args.dtype})
        seconds = time.time() - start
        frame = pd.DataFrame(rows)
        tmp = path + ".tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        done_new += 1
        print(json.dumps({"shard": index, "of": len(shards), "rows": len(rows), "new_tokens": new_tokens,
                          "seconds": round(seconds, 1), "tokens_per_s": round(new_tokens / seconds, 1),
                          "split": shard[0]["split"], "dtype": args.dtype}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
