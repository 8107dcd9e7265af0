"""Few-shot personas from five lines: meta-learned start vs plain start vs description vs few-shot prompt.

Personas are Synthetic-Persona-Chat speakers (profile + their turns). The start vector for
`add_persona(name, examples=lines)` is meta-learned (first-order MAML by default) over the training
profiles' turns; evaluation uses held-out profiles (the same conversation split as
recipes/profile_personas.py, so a map trained there has not seen them either). For each held-out persona
and seed, k support lines are drawn and n_query other lines are scored (per-token loss of the lines given
the conditioning):

- `none`: an empty system turn;
- `few_shot_prompt`: the k lines written in the system prompt as examples of how the persona speaks;
- `description`: persona tokens from the profile text (zero-shot, no fitting);
- `plain_init`: persona tokens fitted to the k lines from the mean training-profile vector;
- `meta_init`: the same fit from the meta-learned start (what `add_persona(examples=...)` does once
  `config.few_shot_init` holds it); its wall time is the adaptation time.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/few_shot_personas.py \\
        --config recipes/configs/few_shot_personas.yaml
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from trl import TrlParser

from personaweave.data.profiles import load_persona_profiles, split_profiles
from personaweave.training.meta_learning import lines_batch, meta_learn_persona_init, sample_support_query

FEW_SHOT_PROMPT = "You are a person who talks like this:\n{lines}\nStay in character."


@dataclass
class FewShotArguments:
    data: str = field(default="", metadata={"help": "Synthetic-Persona-Chat CSV; the config points at the shared copy."})
    persona_layer: str = field(default="", metadata={"help": "A persona-layer folder from recipes/profile_personas.py "
                                                             "(…/best); empty: the shipped trained personas."})
    held_out_conversations: int = field(default=100, metadata={"help": "Held-out conversations (as profile_personas)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the conversation split (as profile_personas)."})
    k: int = field(default=5, metadata={"help": "Support lines per persona."})
    n_query: int = field(default=5, metadata={"help": "Query lines scored per persona and seed."})
    inner_steps: int = field(default=5, metadata={"help": "Adam steps of the fit (config.few_shot_steps)."})
    inner_lr: float = field(default=0.08, metadata={"help": "Learning rate of the fit (config.few_shot_lr)."})
    meta_method: str = field(default="fomaml", metadata={"help": "fomaml or reptile."})
    meta_steps: int = field(default=20, metadata={"help": "Meta steps."})
    tasks_per_step: int = field(default=2, metadata={"help": "Training personas per meta step."})
    meta_lr: float = field(default=0.05, metadata={"help": "Adam learning rate of the start vector."})
    eval_personas: int = field(default=10, metadata={"help": "Held-out personas evaluated."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the support/query draws."})
    meta_seed: int = field(default=0, metadata={"help": "Seed of the meta-training task draws (one meta run)."})
    output: str = field(default="outputs/few_shot_personas.json", metadata={"help": "Results JSON."})


def load(args: FewShotArguments):
    """(model, tokenizer, description encoder) for the chosen persona layer."""
    from personaweave.encoders import default_encoder
    from personaweave.loading import load_model, load_pretrained_personas
    from personaweave.training.profile_personas import ProfileSentenceEncoder

    if not args.persona_layer:
        model, tok, _ = load_model(with_adapters=False)
        return model, tok, default_encoder()
    model, tok, _ = load_pretrained_personas(args.persona_layer, with_adapters=False)
    with open(os.path.join(args.persona_layer, "persona_config.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    encoder = default_encoder()
    if meta.get("encoding") == "per_sentence":
        encoder = ProfileSentenceEncoder(encoder, meta.get("max_sentences", 5))
    return model, tok, encoder


def main(args: FewShotArguments) -> dict:
    torch.manual_seed(0)
    train, held_out = split_profiles(load_persona_profiles(args.data), args.held_out_conversations,
                                     seed=args.split_seed)
    model, tok, encoder = load(args)
    model.eval()
    model.config.few_shot_steps, model.config.few_shot_lr = args.inner_steps, args.inner_lr
    need = args.k + args.n_query
    train_tasks = [r for r in train["responses"] if len(r) >= need]
    rows = [r for r in held_out if len(r["responses"]) >= need]
    rows = random.Random(args.split_seed).sample(rows, min(args.eval_personas, len(rows)))
    plain = torch.as_tensor(np.asarray(encoder.encode(train["description"]))).float().mean(0)

    scores: dict[str, list[list[float]]] = {c: [] for c in ("none", "few_shot_prompt", "description", "plain_init",
                                                            "meta_init")}
    report: dict = {"args": vars(args), "train_tasks": len(train_tasks), "eval_personas": len(rows),
                    "layer": args.persona_layer or "shipped", "adapt_seconds": [], "adapt_cpu_seconds": []}
    start = time.perf_counter()
    meta = meta_learn_persona_init(model, tok, train_tasks, k=args.k, n_query=args.n_query, meta_steps=args.meta_steps,
                                   tasks_per_step=args.tasks_per_step, meta_lr=args.meta_lr, method=args.meta_method,
                                   init=plain, seed=args.meta_seed, log=lambda m: print(m, flush=True)).vector
    report["meta"] = {"seconds": round(time.perf_counter() - start, 1), "moved": float((meta - plain).norm()),
                      "plain_norm": float(plain.norm()), "init": meta.tolist()}
    for seed in args.seeds:
        rng = random.Random(1000 + seed)
        per_seed = {c: [] for c in scores}
        for i, row in enumerate(rows):
            support, query = sample_support_query(row["responses"], args.k, args.n_query, rng)
            with torch.no_grad():
                per_seed["none"].append(float(model(**lines_batch(model, tok, "", query)).loss))
                prompt = FEW_SHOT_PROMPT.format(lines="\n".join(f'"{s}"' for s in support))
                per_seed["few_shot_prompt"].append(float(model(**lines_batch(model, tok, prompt, query)).loss))
            name = f"heldout-{seed}-{i}"
            model.add_persona(name + "-d", row["description"], tokenizer=tok, encoder=encoder)
            with torch.no_grad():
                per_seed["description"].append(float(model.persona_loss(
                    name + "-d", model.persona_vectors[-1], model.few_shot_batch(name + "-d", query, tok))))
            model.remove_persona(name + "-d")
            for condition, init in (("plain_init", plain), ("meta_init", meta)):
                model.config.few_shot_init = init.tolist()
                t0, c0 = time.perf_counter(), time.process_time()
                model.add_persona(name, examples=support, tokenizer=tok)  # the public path, timed
                if condition == "meta_init":
                    report["adapt_seconds"].append(time.perf_counter() - t0)
                    report["adapt_cpu_seconds"].append(time.process_time() - c0)
                with torch.no_grad():
                    per_seed[condition].append(float(model.persona_loss(
                        name, model.persona_vectors[-1], model.few_shot_batch(name, query, tok))))
                model.remove_persona(name)
            print(json.dumps({"seed": seed, "persona": i, **{c: round(v[-1], 4) for c, v in per_seed.items()}}),
                  flush=True)
        for c in scores:
            scores[c].append(per_seed[c])
    model.config.few_shot_init = None
    report["query_loss"] = {c: {"mean": float(np.mean(v)), "std_over_seeds": float(np.std([np.mean(s) for s in v]))}
                            for c, v in scores.items()}
    report["meta_beats_plain_fraction"] = float(np.mean(np.array(scores["meta_init"]) < np.array(scores["plain_init"])))
    report["adapt_seconds_mean"] = float(np.mean(report["adapt_seconds"]))
    report["adapt_seconds_max"] = float(np.max(report["adapt_seconds"]))
    report["adapt_cpu_seconds_mean"] = float(np.mean(report["adapt_cpu_seconds"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: report[k] for k in ("query_loss", "meta_beats_plain_fraction", "adapt_seconds_mean",
                                             "adapt_seconds_max", "adapt_cpu_seconds_mean")}, indent=1))
    return report


def make_parser() -> TrlParser:
    return TrlParser((FewShotArguments,))


if __name__ == "__main__":
    (few_shot_args,) = make_parser().parse_args_and_config()
    main(few_shot_args)
    sys.exit(0)
