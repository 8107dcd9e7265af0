"""Personas from a description the layer never saw: persona tokens vs the same description as a prompt.

The eight unseen composed style personas (`personaweave.zoo.load_style_personas("unseen")`, e.g.
"a gloomy chef who relates everything to cooking and food and always ends by asking the user a
question") are added to each model from their description alone (`add_persona(name, description=...)`:
MiniLM embedding -> the model's persona layer -> soft vectors; no fitting) and asked the held-out
user turns of the v2 candidates' test split. In the same run, the prompt baseline writes the same
description into the system prompt of the bare base model. Decoding is the deployed one (greedy,
repetition penalty 1.2), replies are cut back to their last complete sentence, and everything is
scored by the *evaluation* judge over the eight unseen personas (description + held-out anchor lines
of their role and temperament, `eval_anchors_style.json`; chance 1/8), with relevance and fluency.

Per model it also reports how far apart the unseen personas' soft vectors are (mean pairwise
distance relative to the trained personas' spread): a layer that maps every new description onto
nearly the same point cannot be in character.

Few-shot rows (`--few_shot_seeds`): per seed, `few_shot_k` of each unseen persona's example lines
(its role's and temperament's, never the evaluation anchors) are drawn, and the persona is given
(a) as those lines in the system prompt (`few_shot_prompt`, the bare base) and, per model, (b) as
persona tokens fitted to the lines with no description (`add_persona(examples=...)`: from the
model's meta-learned start when it has one, `few_shot_fit`) and (c) the same fit from the bank's mean
vector (`few_shot_plain`); fitting time is reported per persona. A model without a learned start gets one
meta-learned in the run (`--meta_steps` > 0: first-order MAML or Reptile over the trained style personas
it holds, each a task of its example lines, k support + the rest as query; the unseen personas are never
tasks), and its time is reported. With `--few_shot_temperature` that start is a retrieval start (the
bank's described personas weighted by similarity to the lines' embedding, plus an offset; each task's
own persona left out of the retrieval), and `--few_shot_unfitted_row` adds the start without fitting.

    python recipes/unseen_personas.py --config recipes/configs/unseen_personas.yaml
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from trl import TrlParser

from personaweave.chat import chat, prompt_baseline_messages
from personaweave.files import write_json
from personaweave.generation import DECODING
from personaweave.loading import FEW_SHOT_KEYS

sys.path.insert(0, os.path.dirname(__file__))
from few_shot_personas import FEW_SHOT_PROMPT  # noqa: E402
from persona_quality import held_out_candidates, trim_to_sentence  # noqa: E402


@dataclass
class UnseenPersonasArguments:
    models: list[str] = field(default_factory=lambda: ["outputs/sft_persona_v2/final"], metadata={
        "help": "PersonaWeave folders to compare (e.g. the layer trained on 8 personas and the one trained on "
                "8 + 64 style personas), or `shipped` / `shipped:descriptions` for a checkpoint shipped in the "
                "package; each gets a persona_token row."})
    shards: str = field(default="datasets_scripts/shards/v2", metadata={"help": "Where the held-out turns come from."})
    split: str = field(default="test", metadata={"help": "Which split's turns to use."})
    max_turns: int = field(default=32, metadata={"help": "Held-out user turns (x 8 unseen personas)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Reply length limit."})
    batch_size: int = field(default=32, metadata={"help": "Generation batch size."})
    output: str = field(default="outputs/unseen_personas.json", metadata={"help": "The JSON report."})
    few_shot_seeds: list[int] = field(default_factory=list, metadata={
        "help": "Seeds of the few-shot rows (empty: no few-shot rows); each draws its own example lines."})
    few_shot_k: int = field(default=5, metadata={"help": "Example lines per persona in the few-shot rows."})
    meta_steps: int = field(default=0, metadata={
        "help": "Meta steps of a few-shot start learned in the run for models without a learned start "
                "(over the trained style personas they hold; 0: none)."})
    meta_method: str = field(default="fomaml", metadata={"help": "fomaml or reptile."})
    meta_tasks_per_step: int = field(default=4, metadata={"help": "Training personas per meta step."})
    meta_lr: float = field(default=0.05, metadata={"help": "Adam learning rate of the start vector (or offset)."})
    meta_temperature_lr: float = field(default=0.1, metadata={
        "help": "Adam learning rate of the log temperature of a retrieval start."})
    few_shot_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the few-shot fit (config.few_shot_lr) for every few-shot row; None: the model's."})
    few_shot_plain_lrs: list[float] = field(default_factory=list, metadata={
        "help": "Extra plain-start rows fitted at these learning rates (the plain start's own best, beside the "
                "shared one)."})
    few_shot_temperature: Optional[float] = field(default=None, metadata={
        "help": "Starting temperature of a retrieval start meta-learned in the run (the bank's described personas "
                "weighted by similarity to the lines; offset and temperature learned). None: one start vector."})
    few_shot_unfitted_row: bool = field(default=False, metadata={
        "help": "Also a row with the meta-learned start and no fitting steps (what the fit adds)."})


def make_parser() -> TrlParser:
    return TrlParser((UnseenPersonasArguments,))


def soft_vector_spread(model: Any, new: list[str]) -> dict[str, float]:
    """Mean pairwise distance of the new personas' soft vectors, and of the others', and their ratio."""
    import torch

    names = list(model.config.persona_names)
    with torch.no_grad():
        soft = model.persona_soft_vectors().flatten(1).float()
    index = {n: i for i, n in enumerate(names)}
    new_vecs = soft[[index[n] for n in new]]
    old_vecs = soft[[i for n, i in index.items() if n not in new]]

    def spread(x):
        return float(torch.pdist(x).mean()) if len(x) > 1 else float("nan")

    return {"unseen": spread(new_vecs), "trained": spread(old_vecs),
            "ratio": spread(new_vecs) / max(spread(old_vecs), 1e-8)}


def few_shot_lines(personas: list, k: int, seed: int) -> dict[str, list[str]]:
    """`k` example lines per persona, drawn with `seed` (the selection judge's lines, never the anchors)."""
    import random

    rng = random.Random(seed)
    out = {}
    for p in personas:
        if len(p.examples) < k:
            raise ValueError(f"{p.name} has {len(p.examples)} example lines; the few-shot rows need {k}.")
        out[p.name] = rng.sample(list(p.examples), k)
    return out


def has_learned_start(config: Any) -> bool:
    """Whether the model's few-shot start is a learned one (a vector or a retrieval start), not the bank mean."""
    return config.few_shot_init is not None or config.few_shot_temperature is not None


def meta_learned_init(model: Any, tokenizer: Any, args: UnseenPersonasArguments) -> tuple[Any, dict] | None:
    """A few-shot start (`FewShotStart`) meta-learned over the trained style personas `model` holds (None
    if it holds none), with how it was learned."""
    from personaweave.training.meta_learning import meta_learn_persona_init
    from personaweave.zoo import load_style_personas

    tasks = {p.name: p.examples for p in load_style_personas("train") if p.name in model.config.persona_names}
    if not tasks:
        return None
    start = time.time()
    learned = meta_learn_persona_init(model, tokenizer, tasks, k=args.few_shot_k,
                                      n_query=min(map(len, tasks.values())) - args.few_shot_k,
                                      meta_steps=args.meta_steps, tasks_per_step=args.meta_tasks_per_step,
                                      meta_lr=args.meta_lr, method=args.meta_method,
                                      temperature=args.few_shot_temperature,
                                      temperature_lr=args.meta_temperature_lr, seed=0,
                                      log=lambda m: print(m, flush=True))
    return learned, {"tasks": len(tasks), "meta_steps": args.meta_steps, "method": args.meta_method,
                     "start": "retrieval" if args.few_shot_temperature is not None else "vector",
                     "temperature": learned.temperature, "vector_norm": round(float(learned.vector.norm()), 4),
                     "seconds": round(time.time() - start, 1), "vector": learned.vector.tolist()}


def main(args: UnseenPersonasArguments) -> dict[str, Any]:
    import torch

    from personaweave.evaluation.judges import EvaluationJudge
    from personaweave.generation import generate_replies
    from personaweave.loading import load_model
    from personaweave.zoo import load_style_personas

    torch.manual_seed(0)
    _, turns = held_out_candidates(args.shards, args.split, args.max_turns)
    unseen = load_style_personas("unseen")
    names = [p.name for p in unseen]
    prompts = [t for _ in names for t in turns]
    targets = [n for n in names for _ in turns]
    table: dict[str, Any] = {}
    judge = None
    for index, folder in enumerate(args.models):
        shipped, _, checkpoint = folder.partition(":")  # "shipped" or "shipped:descriptions"
        model, tokenizer, _ = (load_model(None, with_adapters=False, checkpoint=checkpoint or "default")
                               if shipped == "shipped" else load_model(folder, with_adapters=False))
        clash = sorted(set(names) & set(model.config.persona_names))
        if clash:
            raise SystemExit(f"error: {folder} was trained with {clash}: they are not unseen for it.")
        if judge is None:
            judge = EvaluationJudge.from_style_personas(unseen, base_model=model.language_model, tokenizer=tokenizer)

        def generate(conversations, model=model, tokenizer=tokenizer):
            out = generate_replies(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, **DECODING)
            return [trim_to_sentence(t) for t in out.texts]

        rows = {}
        if index == 0:  # the base LM is frozen in every persona stage: one prompt baseline serves all models
            start = time.time()
            rows["prompt_baseline"] = (generate([prompt_baseline_messages(p.description, t)
                                                 for p in unseen for t in turns]), time.time() - start, None)
        if args.few_shot_lr is not None:
            model.config.few_shot_lr = args.few_shot_lr
        for seed in args.few_shot_seeds:
            lines = few_shot_lines(unseen, args.few_shot_k, seed)
            if index == 0:
                start = time.time()
                rows[f"few_shot_prompt:seed{seed}"] = (generate(
                    [[{"role": "system", "content": FEW_SHOT_PROMPT.format(lines="\n".join(f'"{x}"' for x in lines[n]))},
                      {"role": "user", "content": t}] for n, t in zip(targets, prompts)]), time.time() - start, None)
            config = model.config
            if seed == args.few_shot_seeds[0] and not has_learned_start(config) and args.meta_steps > 0:
                meta = meta_learned_init(model, tokenizer, args)
                if meta is not None:
                    meta[0].apply(config)
                    table[f"meta_init:{folder}"] = meta[1]
            saved = {key: getattr(config, key) for key in FEW_SHOT_KEYS}
            starts = {}  # row -> the few-shot settings it runs with
            if has_learned_start(config):
                starts["few_shot_fit"] = saved
                if args.few_shot_unfitted_row:
                    starts["few_shot_start"] = {**saved, "few_shot_steps": 0}
            plain = {**saved, "few_shot_init": None, "few_shot_offset": None, "few_shot_temperature": None}
            starts["few_shot_plain"] = plain
            for lr in args.few_shot_plain_lrs:
                starts[f"few_shot_plain_lr{lr}"] = {**plain, "few_shot_lr": lr}
            for label, values in starts.items():
                for key, value in values.items():
                    setattr(config, key, value)
                fit_start = time.time()
                for n in names:
                    model.add_persona(f"{n}.fs", examples=lines[n], tokenizer=tokenizer)
                fit_seconds = (time.time() - fit_start) / len(names)
                start = time.time()
                texts = generate([chat(f"{n}.fs", t, model=model) for n, t in zip(targets, prompts)])
                rows[f"{label}:{folder}:seed{seed}"] = (texts, time.time() - start, {"fit_seconds_per_persona":
                                                                                     round(fit_seconds, 2)})
                for n in names:
                    model.remove_persona(f"{n}.fs")
            for key, value in saved.items():
                setattr(config, key, value)
        for p in unseen:
            model.add_persona(p.name, description=p.description, traits=p.traits, tokenizer=tokenizer)
        start = time.time()
        texts = generate([chat(n, t, model=model) for n, t in zip(targets, prompts)])
        rows[f"persona_token:{folder}"] = (texts, time.time() - start, soft_vector_spread(model, names))
        for row, (texts, seconds, spread) in rows.items():
            verdicts = judge.judge(prompts, texts, targets)
            table[row] = {"evaluation_judge": verdicts.summary(),
                          "per_persona_accuracy": {n: float(sum(p == n for p, t in zip(verdicts.predicted, targets)
                                                                if t == n) / len(turns)) for n in names},
                          "trained_personas": None if spread is None or "fit_seconds_per_persona" in spread
                          else len(model.config.persona_names) - len(names),
                          ("few_shot" if spread and "fit_seconds_per_persona" in spread else "soft_vector_spread"): spread,
                          "seconds": round(seconds, 1),
                          "examples": [{"persona": n, "user": t, "reply": r}
                                       for n, t, r in list(zip(targets, prompts, texts))[:: max(1, len(texts) // 8)]]}
            ev = table[row]["evaluation_judge"]
            print(f"{row:48} acc {ev['persona_accuracy']:.3f}  rel {ev['relevance']:.3f}  flu {ev['fluency']:.3f}",
                  flush=True)
        del model
    report = {"turns": len(turns), "personas": names, "chance": 1 / len(names), "decoding": DECODING,
              "max_new_tokens": args.max_new_tokens, "rows": table}
    write_json(report, args.output)
    return report


if __name__ == "__main__":
    (script_args,) = make_parser().parse_args_and_config()
    main(script_args)
