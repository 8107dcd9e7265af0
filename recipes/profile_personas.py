"""Train the profile -> soft-vector map on Synthetic-Persona-Chat profiles; compare profile encodings.

Each encoding (`whole`: one MiniLM vector of the joined profile; `per_sentence`: one vector per sentence,
each feeding its own soft token through a shared MLP) gets a fresh, neutral map with the same number of
soft tokens, the same steps, batches and learning rate, with SmolLM2 frozen. Held-out conversations (both
speakers) are never trained on; on their gold turns we report the per-token loss of:
no persona, the profile written in the system prompt, and each trained map (before and after training).
The better map is saved in the shipped checkpoint's format (`load_pretrained_personas(output_dir/best)`).

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/profile_personas.py \\
        --config recipes/configs/profile_personas.yaml
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from personaweave.data.profiles import load_persona_profiles, split_profiles
from personaweave.training.profile_personas import (
    PROFILE_PROMPT,
    encode_profiles,
    encode_turn,
    evaluate_nll,
    make_persona_map,
    save_persona_layer,
    train_persona_map,
)


@dataclass
class ProfilePersonaArguments:
    data: str = field(default="", metadata={"help": "Synthetic-Persona-Chat CSV (profiles + conversations); the "
                                                   "config points at the shared copy."})
    encodings: list[str] = field(default_factory=lambda: ["whole", "per_sentence"],
                                 metadata={"help": "Profile encodings to compare: whole, per_sentence."})
    num_tokens: int = field(default=5, metadata={"help": "Soft tokens per persona (per_sentence: a multiple of "
                                                         "max_sentences)."})
    max_sentences: int = field(default=5, metadata={"help": "Profile sentences kept by per_sentence."})
    inner_size: int = field(default=512, metadata={"help": "Hidden width of the persona MLP."})
    steps: int = field(default=300, metadata={"help": "Training steps per encoding."})
    batch_size: int = field(default=8, metadata={"help": "Turns per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the map."})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast (CPU AMX or GPU)."})
    max_length: int = field(default=192, metadata={"help": "Longest training sequence in tokens."})
    held_out_conversations: int = field(default=100, metadata={"help": "Conversations held out (both speakers)."})
    eval_turns_per_profile: int = field(default=2, metadata={"help": "Gold turns scored per held-out profile."})
    max_train_turns: int = field(default=6000, metadata={"help": "Training turns tokenised (a random subset)."})
    base: str = field(default="smollm2-135m-instruct", metadata={"help": "Base LM (zoo name, folder or Hub id)."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the sampling and the init."})
    output_dir: str = field(default="outputs/profile_personas", metadata={"help": "Results JSON and best map."})


def main(args: ProfilePersonaArguments) -> dict:
    from personaweave.encoders import default_encoder
    from personaweave.zoo import load_base

    torch.manual_seed(args.seed)
    train, held_out = split_profiles(load_persona_profiles(args.data), args.held_out_conversations, seed=args.seed)
    lm, tok = load_base(args.base)
    lm.eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    encoder = default_encoder()
    anchor = lm.get_input_embeddings().weight.detach().float().mean(0)
    rng = random.Random(args.seed)
    train_pairs = [(i, p, r) for i, row in enumerate(train) for p, r in zip(row["prompts"], row["responses"])]
    train_pairs = rng.sample(train_pairs, min(args.max_train_turns, len(train_pairs)))
    eval_pairs = [(i, p, r) for i, row in enumerate(held_out)
                  for p, r in list(zip(row["prompts"], row["responses"]))[:args.eval_turns_per_profile]]
    report: dict = {"args": vars(args), "train_profiles": len(train), "held_out_profiles": len(held_out),
                    "train_turns_available": sum(len(r) for r in train["responses"]), "eval_turns": len(eval_pairs),
                    "results": {}}
    print(f"{len(train)} train / {len(held_out)} held-out profiles, {len(eval_pairs)} held-out turns", flush=True)

    def score(rows, **kwargs):
        start = time.perf_counter()
        out = evaluate_nll(lm, rows, pad_id=pad_id, bf16=args.bf16, **kwargs)
        out["seconds"] = round(time.perf_counter() - start, 1)
        return out

    descriptions = held_out["description"]
    report["results"]["none"] = score([encode_turn(tok, p, r) for _, p, r in eval_pairs])
    report["results"]["prompt"] = score([encode_turn(tok, p, r, system=PROFILE_PROMPT.format(profile=descriptions[i]))
                                         for i, p, r in eval_pairs])
    print(json.dumps(report["results"]), flush=True)
    best = None
    for encoding in args.encodings:
        train_vectors = encode_profiles(train["sentences"], encoder, encoding, args.max_sentences)
        eval_vectors = encode_profiles(held_out["sentences"], encoder, encoding, args.max_sentences)
        layer = make_persona_map(encoding, encoder.dim, lm.config.hidden_size, args.num_tokens, args.inner_size,
                                 args.max_sentences, anchor=anchor)
        slots = layer.num_tokens
        train_rows = [encode_turn(tok, p, r, slots=slots, persona=i) for i, p, r in train_pairs]
        eval_rows = [encode_turn(tok, p, r, slots=slots, persona=i) for i, p, r in eval_pairs]
        untrained = score(eval_rows, layer=layer, vectors=eval_vectors)
        start = time.perf_counter()
        losses = train_persona_map(lm, layer, train_vectors, train_rows, pad_id=pad_id, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.learning_rate, bf16=args.bf16,
                                   max_length=args.max_length, seed=args.seed)
        seconds = time.perf_counter() - start
        trained = score(eval_rows, layer=layer, vectors=eval_vectors)
        # the map must read the profile: the same held-out turns with every persona's vectors shuffled
        shuffled = eval_vectors[torch.randperm(len(eval_vectors), generator=torch.Generator().manual_seed(args.seed))]
        report["results"][encoding] = {**trained, "untrained_loss": untrained["loss"],
                                       "shuffled_profiles_loss": score(eval_rows, layer=layer, vectors=shuffled)["loss"],
                                       "soft_tokens": slots, "train_seconds": round(seconds, 1),
                                       "train_loss_first_25": sum(losses[:25]) / max(len(losses[:25]), 1),
                                       "train_loss_last_25": sum(losses[-25:]) / max(len(losses[-25:]), 1),
                                       "train_turns_seen": args.steps * args.batch_size}
        print(json.dumps({encoding: report["results"][encoding]}), flush=True)
        if best is None or trained["loss"] < report["results"][best[0]]["loss"]:
            best = (encoding, layer)
    if best is not None:
        report["best"] = best[0]
        save_persona_layer(best[1], os.path.join(args.output_dir, "best"), args.base,
                           extra={"encoding": best[0], "max_sentences": args.max_sentences})
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    return report


def make_parser() -> TrlParser:
    return TrlParser((ProfilePersonaArguments,))


if __name__ == "__main__":
    (profile_args,) = make_parser().parse_args_and_config()
    main(profile_args)
    sys.exit(0)
