"""MAML for the trait head (custom Accelerate loop) vs no adaptation vs plain fine-tuning.

Tasks are personas: replies (frozen MiniLM embeddings) labelled with the persona's traits. In each
fold two personas are held out; the head is pre-trained on the other six (the shared starting
point), MAML meta-trains from it, and on the held-out personas we adapt with k = 1, 5, 10 support
replies and the same steps and learning rate for MAML and fine-tuning, then score query MSE.
Five seeds; mean and standard deviation reported.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/maml.py --config recipes/configs/maml.yaml
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from trl import TrlParser

from personaweave.data import load_persona_dialogues
from personaweave.training.meta_learning import TraitTask, few_shot_mse, group_embeddings, maml_train, pretrain_head


@dataclass
class MamlArguments:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "Support sizes to evaluate."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds."})
    inner_steps: int = field(default=5, metadata={"help": "Adaptation steps (MAML inner loop and fine-tuning)."})
    inner_lr: float = field(default=0.5, metadata={"help": "Adaptation learning rate."})
    meta_lr: float = field(default=1e-3, metadata={"help": "Outer (meta) learning rate."})
    meta_steps: int = field(default=300, metadata={"help": "Meta-training steps."})
    tasks_per_step: int = field(default=8, metadata={"help": "Tasks per meta step."})
    first_order: bool = field(default=False, metadata={"help": "First-order MAML (forced with several processes)."})
    mixed_precision: str = field(default="no", metadata={"help": "Accelerate mixed precision."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Meta steps per optimizer step."})
    episodes: int = field(default=20, metadata={"help": "Support draws per held-out persona, k and seed."})
    output: str = field(default="outputs/maml.json", metadata={"help": "Where to write the results."})


def tasks_from(split) -> dict[str, TraitTask]:
    embeddings = group_embeddings(list(split["response"]), list(split["persona"]))
    traits = {p: t for p, t in zip(split["persona"], split["traits"])}
    return {p: TraitTask(torch.as_tensor(e), torch.tensor(traits[p], dtype=torch.float32))
            for p, e in embeddings.items()}


def main(args: MamlArguments) -> dict:
    data = load_persona_dialogues()
    train_tasks, test_tasks = tasks_from(data["train"]), tasks_from(data["test"])
    personas = sorted(train_tasks)
    folds = [personas[i:i + 2] for i in range(0, len(personas), 2)]
    scores: dict[str, dict[int, list[float]]] = {m: {k: [] for k in args.ks} for m in ("none", "finetune", "maml")}
    adapt_seconds = []
    for seed in args.seeds:
        for held_out in folds:
            train = [train_tasks[p] for p in personas if p not in held_out]
            base = pretrain_head(train, seed=seed)
            meta = maml_train(copy.deepcopy(base), train, k=5, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                              meta_lr=args.meta_lr, meta_steps=args.meta_steps, tasks_per_step=args.tasks_per_step,
                              first_order=args.first_order, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps, seed=seed)
            for name in held_out:
                for k in args.ks:
                    for e in range(args.episodes):
                        draw = 1000 * seed + e
                        scores["none"][k].append(few_shot_mse(base, test_tasks[name], k, 0, 0, random.Random(draw)))
                        scores["finetune"][k].append(few_shot_mse(base, test_tasks[name], k, args.inner_steps,
                                                                  args.inner_lr, random.Random(draw)))
                        start = time.perf_counter()
                        scores["maml"][k].append(few_shot_mse(meta, test_tasks[name], k, args.inner_steps,
                                                              args.inner_lr, random.Random(draw)))
                        adapt_seconds.append(time.perf_counter() - start)
    # spread over seeds: the mean per seed, then mean and std of those
    per_seed = len(folds) * 2 * args.episodes
    report = {"held_out_folds": folds, "inner_steps": args.inner_steps, "inner_lr": args.inner_lr,
              "adapt_seconds_max": round(max(adapt_seconds), 4)}
    for method, by_k in scores.items():
        for k, values in by_k.items():
            seed_means = [float(np.mean(values[i:i + per_seed])) for i in range(0, len(values), per_seed)]
            report[f"{method}_k{k}"] = {"mse": round(float(np.mean(seed_means)), 5),
                                        "std_over_seeds": round(float(np.std(seed_means)), 5)}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=1))
    return report


def make_parser() -> TrlParser:
    return TrlParser((MamlArguments,))


if __name__ == "__main__":
    (maml_args,) = make_parser().parse_args_and_config()
    main(maml_args)
    sys.exit(0)
