"""Persona reward model: a sequence classifier (num_labels=1) on the policy's base LM (SmolLM2) and
its tokenizer (without persona tokens: the persona is stated in words), trained with TRL's
`RewardTrainer` on persona preference pairs.

Each pair: the persona stated in a system turn and a user turn; with `pair_source: persona_swap`,
chosen = that persona's reply, rejected = another persona's reply to the same user turn
(`persona_preference_pairs`); with `pair_source: best_worst` (the v2 dataset), chosen / rejected =
the selection judge's best / worst of N sampled replies of that persona (`load_persona_preferences`),
plus the persona-swap pairs of the v2 replies when `mix_persona_swap` is set. Reported:
pairwise accuracy (score(chosen) > score(rejected)) on pairs built from the held-out test split,
overall, per persona and per kind of pair (`per_source`), written to `final/eval.json` and the model
card; with `report_validation`, on the validation split's pairs too (where settings are compared).

Usage:
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/reward_model.py \
        --config recipes/configs/reward_model.yaml
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer, TrlParser

from personaweave.data import load_persona_dialogues, load_persona_preferences, persona_preference_pairs
from personaweave.files import save_folder_atomically


@dataclass
class RewardModelArguments:
    base: Optional[str] = field(default=None, metadata={"help": "Base LM folder (default: shipped SmolLM2)."})
    dataset_dir: Optional[str] = field(default=None, metadata={"help": "Persona dialogues (default: shipped)."})
    max_train_pairs: Optional[int] = field(default=None, metadata={"help": "Cap on training pairs."})
    max_eval_pairs: Optional[int] = field(default=None, metadata={"help": "Cap on held-out pairs."})
    pair_source: str = field(default="persona_swap", metadata={
        "help": "'persona_swap' (another persona's reply is rejected) or 'best_worst' (v2 best-of-N pairs)."})
    mix_persona_swap: bool = field(default=False, metadata={
        "help": "With best_worst: add the persona-swap pairs built from the same dataset's replies."})
    train_top_layers: Optional[int] = field(default=None, metadata={
        "help": "Train only the top N decoder layers, the final norm and the score head (None: all)."})
    evaluate_only: Optional[str] = field(default=None, metadata={
        "help": "A trained reward model folder: report its accuracy on this config's held-out pairs; no training."})
    report_validation: bool = field(default=False, metadata={
        "help": "Also report accuracy on the validation split's pairs (where settings are compared; test only reports)."})


def load_base(base: Optional[str]) -> tuple[Any, Any]:
    from personaweave.zoo import smollm2_folder

    location, extra = (base, {}) if base else smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    model = AutoModelForSequenceClassification.from_pretrained(location, num_labels=1, **extra)
    return model, tokenizer


def freeze_below(model: Any, top_layers: Optional[int]) -> None:
    """Freeze all but the top decoder layers, final norm and score head (cheaper backward on CPU)."""
    if top_layers is None:
        return
    backbone = getattr(model, model.base_model_prefix)
    layers = backbone.layers
    if not 0 < top_layers <= len(layers):
        raise ValueError(f"train_top_layers must be in 1..{len(layers)}, got {top_layers}.")
    model.requires_grad_(False)
    for module in [*layers[-top_layers:], backbone.norm, model.score]:
        module.requires_grad_(True)


def best_worst_pairs(data_dir: str, split: str):
    """The v2 (best, worst) pairs in TRL's conversational preference format, persona stated in words."""
    data = load_persona_preferences(split, data_dir)
    return data.map(lambda r: {"persona": r["persona"],
                               "prompt": [{"role": "system", "content": f"You are {r['description']}."},
                                          {"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]},
                    remove_columns=data.column_names)


def pairs(script: RewardModelArguments, split: str, cap: Optional[int], seed: int):
    from datasets import concatenate_datasets

    if script.pair_source not in ("persona_swap", "best_worst"):
        raise SystemExit(f"Unknown pair_source {script.pair_source!r}: use 'persona_swap' or 'best_worst'.")
    parts = []
    if script.pair_source == "best_worst":
        if not script.dataset_dir:
            raise SystemExit("pair_source best_worst needs dataset_dir (the v2 dataset folder).")
        best_worst = best_worst_pairs(script.dataset_dir, split)
        parts.append(best_worst.add_column("source", ["best_worst"] * len(best_worst)))
    if script.pair_source == "persona_swap" or script.mix_persona_swap:
        swap = persona_preference_pairs(load_persona_dialogues(split, data_dir=script.dataset_dir), seed=seed)
        swap = swap.select_columns(["persona", "prompt", "chosen", "rejected"])
        parts.append(swap.add_column("source", ["persona_swap"] * len(swap)))
    parts = [part.cast(parts[0].features) for part in parts]  # parquet strings vs in-memory strings
    data = concatenate_datasets(parts).shuffle(seed=seed)
    return data.select(range(min(cap, len(data)))) if cap else data


@torch.no_grad()
def pairwise_accuracy(model: Any, tokenizer: Any, data, batch_size: int = 16, max_length: int = 512
                      ) -> dict[str, Any]:
    """Share of pairs whose chosen reply scores above the rejected one, overall, per persona and (when
    the pairs have a `source` column) per kind of pair. Pairs longer than `max_length` tokens are left out,
    as RewardTrainer leaves them out of training (truncating would cut the reply's end, where the score is read)."""
    model.eval()
    length = lambda row, column: len(tokenizer.apply_chat_template(row["prompt"] + row[column]))  # noqa: E731
    data = data.filter(lambda row: max(length(row, "chosen"), length(row, "rejected")) <= max_length)
    if not len(data):
        raise ValueError(f"No held-out pair fits in max_length={max_length} tokens.")

    def scores(column: str) -> np.ndarray:
        out = []
        for i in range(0, len(data), batch_size):
            rows = data[i:i + batch_size]
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(rows["prompt"], rows[column])]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out.append(model(**enc.to(model.device)).logits[:, 0].float().cpu().numpy())
        return np.concatenate(out)

    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        wins = scores("chosen") > scores("rejected")
    finally:
        tokenizer.padding_side = side
    personas = np.asarray(data["persona"])
    report = {"pairwise_accuracy": float(wins.mean()), "num_pairs": int(len(wins)),
              "per_persona": {p: float(wins[personas == p].mean()) for p in sorted(set(personas))}}
    if "source" in data.column_names:
        sources = np.asarray(data["source"])
        report["per_source"] = {s: {"pairwise_accuracy": float(wins[sources == s].mean()),
                                    "num_pairs": int((sources == s).sum())} for s in sorted(set(sources))}
    return report


CARD = """---
library_name: transformers
pipeline_tag: text-classification
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [personaweave, reward-model, trl]
license: apache-2.0
---
# PersonaWeave persona reward model

A `{arch}` with one output (`num_labels=1`) trained with TRL's `RewardTrainer` on persona
preference pairs from the PersonaWeave persona dialogues, the persona stated in a system turn: {pairs}.

Pairwise accuracy on {num_pairs} held-out pairs (test split): **{acc:.1%}**.

| persona | pairwise accuracy |
|---|---|
{rows}

| kind of pair | pairwise accuracy |
|---|---|
{source_rows}

Score a reply: apply the chat template to `[system, user, assistant]` messages and read `logits[0, 0]`;
higher = more in character for the stated persona. Trained {steps} steps; see `eval.json`.
"""


PAIR_DESCRIPTIONS = {
    "persona_swap": "chosen = that persona's reply, rejected = another persona's reply to the same user turn",
    "best_worst": "chosen / rejected = the selection judge's best / worst of N sampled replies of that persona",
}


def describe_pairs(script: RewardModelArguments) -> str:
    """The card's sentence on what the pairs were (one kind, or best/worst plus persona-swap pairs)."""
    kinds = [script.pair_source] + (["persona_swap"] if script.mix_persona_swap else [])
    return "; and ".join(PAIR_DESCRIPTIONS[kind] for kind in kinds)


def evaluate_only(script: RewardModelArguments, args: RewardConfig) -> dict[str, Any]:
    """Accuracy of an already trained reward model on this config's test (and validation) pairs."""
    tokenizer = AutoTokenizer.from_pretrained(script.evaluate_only)
    model = AutoModelForSequenceClassification.from_pretrained(script.evaluate_only)
    report = {"model": script.evaluate_only,
              **pairwise_accuracy(model, tokenizer, pairs(script, "test", script.max_eval_pairs, args.seed),
                                  max_length=args.max_length)}
    if script.report_validation:
        report["validation"] = pairwise_accuracy(model, tokenizer, pairs(script, "validation", None, args.seed),
                                                 max_length=args.max_length)
    print(json.dumps(report, indent=1))
    return report


def main(script: RewardModelArguments, args: RewardConfig) -> dict[str, Any]:
    if script.evaluate_only:
        return evaluate_only(script, args)
    model, tokenizer = load_base(script.base)
    if args.pad_token:  # RewardConfig's own option; the YAML sets one distinct from EOS
        tokenizer.pad_token = args.pad_token
    model.config.pad_token_id = tokenizer.pad_token_id
    freeze_below(model, script.train_top_layers)
    train = pairs(script, "train", script.max_train_pairs, args.seed)
    held_out = pairs(script, "test", script.max_eval_pairs, args.seed)
    validation = pairs(script, "validation", None, args.seed) if script.report_validation else None
    before = pairwise_accuracy(model, tokenizer, held_out, max_length=args.max_length)
    columns = ["prompt", "chosen", "rejected"]
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=train.select_columns(columns))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    report = {"pair_source": script.pair_source + ("+persona_swap" if script.mix_persona_swap else ""),
              "untrained": before["pairwise_accuracy"],
              **pairwise_accuracy(model, tokenizer, held_out, max_length=args.max_length),
              "train_pairs": len(trainer.train_dataset), "steps": trainer.state.global_step}
    if validation is not None:  # where settings are chosen; the test split only reports
        report["validation"] = pairwise_accuracy(model, tokenizer, validation, max_length=args.max_length)
    final = os.path.join(args.output_dir, "final")
    if args.process_index == 0:
        save_folder_atomically(model, tokenizer, final)
        rows = "\n".join(f"| {p} | {a:.1%} |" for p, a in report["per_persona"].items())
        with open(os.path.join(final, "README.md"), "w", encoding="utf-8") as handle:
            source_rows = "\n".join(f"| {k} | {v['pairwise_accuracy']:.1%} ({v['num_pairs']} pairs) |"
                                     for k, v in report.get("per_source", {}).items())
            handle.write(CARD.format(arch=type(model).__name__, pairs=describe_pairs(script),
                                     num_pairs=report["num_pairs"], acc=report["pairwise_accuracy"], rows=rows,
                                     source_rows=source_rows, steps=report["steps"]))
        with open(os.path.join(final, "eval.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=1))
    return report


def make_parser() -> TrlParser:
    return TrlParser((RewardModelArguments, RewardConfig))


if __name__ == "__main__":
    script_args, reward_args = make_parser().parse_args_and_config()
    main(script_args, reward_args)
    sys.exit(0)
