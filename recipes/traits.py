"""Train the ten-trait model (MiniLM + heads) with `Trainer`.

Data: the persona dialogues (each reply labelled with its persona's ten traits) and, when
given (`essays_csv` in the config), the real Big-Five essays (five traits, high/low -> 1/0;
the other five are NaN and masked out of the loss). Evaluation through the trait metrics
`evaluate` module: MAE, Pearson per trait, share within 0.1; on the essays, per-trait binary
accuracy next to the published baselines.

Usage:
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/traits.py --config recipes/configs/traits.yaml
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments
from trl import TrlParser

from personaweave import PersonaTraitModel
from personaweave.data import load_persona_dialogues
from personaweave.evaluation.metrics import load_trait_metrics
from personaweave.files import save_folder_atomically
from personaweave.models.personas import TRAITS
from personaweave.zoo import minilm_path

ESSAY_COLUMNS = {"cEXT": "extraversion", "cNEU": "neuroticism", "cAGR": "agreeableness",
                 "cCON": "conscientiousness", "cOPN": "openness"}
PUBLISHED = {"extraversion": 58.09, "neuroticism": 59.38, "agreeableness": 56.71, "conscientiousness": 57.30,
             "openness": 62.68}  # Majumder et al. 2017, 10-fold CV on the full essays set


@dataclass
class TraitArguments:
    encoder: Optional[str] = field(default=None, metadata={"help": "Encoder folder (default: the shipped MiniLM)."})
    dataset_dir: Optional[str] = field(default=None, metadata={"help": "Persona dialogues (default: shipped)."})
    essays_csv: Optional[str] = field(default=None, metadata={
        "help": "Big-Five essays CSV (set in recipes/configs/traits.yaml); skipped when unset or absent."})
    essays_test_share: float = field(default=0.2, metadata={"help": "Share of essays held out for accuracy."})
    max_rows_per_persona: Optional[int] = field(default=None, metadata={"help": "Cap train rows per persona."})
    max_length: int = field(default=128, metadata={"help": "Token limit per text."})
    train_encoder: bool = field(default=True, metadata={
        "help": "False: keep MiniLM frozen, embed every text once and fit the heads only (what ships in "
                "personaweave/data/traits/, written to <output_dir>/heads); uses learning_rate and num_train_epochs."})


def essay_rows(path: Optional[str], test_share: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not path or not os.path.isfile(path):
        print(f"no essays at {path}: training on the persona dialogues only")
        return [], []
    with open(path, encoding="utf-8") as handle:
        rows = []
        for r in csv.DictReader(handle):
            labels = [float("nan")] * len(TRAITS)
            for column, trait in ESSAY_COLUMNS.items():
                labels[TRAITS.index(trait)] = 1.0 if r[column].strip().lower() in {"high", "y", "1"} else 0.0
            rows.append({"text": r["text"], "labels": labels})
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * test_share)
    return rows[cut:], rows[:cut]


def dialogue_rows(split, cap: Optional[int]) -> list[dict]:
    counts: dict[str, int] = {}
    rows = []
    for r in split:
        counts[r["persona"]] = counts.get(r["persona"], 0) + 1
        if cap is None or counts[r["persona"]] <= cap:
            rows.append({"text": r["response"], "labels": list(r["traits"])})
    return rows


def predict(model, tokenizer, texts, batch_size=64) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).traits.numpy())
    return np.concatenate(out)


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(model.pool(enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


def fit_heads(model, tokenizer, rows: list[dict], args: TraitArguments, training_args: TrainingArguments) -> None:
    """The trait head on frozen mean-pooled embeddings: full-batch AdamW, the model's masked MSE."""
    torch.manual_seed(training_args.seed)
    x = embed(model, tokenizer, [r["text"] for r in rows], args.max_length)
    y = torch.tensor([r["labels"] for r in rows], dtype=torch.float32)
    known = torch.isfinite(y)
    head = model.trait_head
    optimizer = torch.optim.AdamW(head.parameters(), lr=training_args.learning_rate,
                                  weight_decay=training_args.weight_decay)
    steps = int(training_args.num_train_epochs)
    for step in range(steps):
        loss = ((torch.sigmoid(head(x)) - y.nan_to_num()) ** 2)[known].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, training_args.logging_steps) == 0 or step == steps - 1:
            print(f"step {step}: masked MSE {float(loss):.4f}")


def main(args: TraitArguments, training_args: TrainingArguments) -> dict:
    from datasets import Dataset

    model = PersonaTraitModel.from_encoder(args.encoder or minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(args.encoder or minilm_path())
    data = load_persona_dialogues(data_dir=args.dataset_dir)
    essays_train, essays_test = essay_rows(args.essays_csv, args.essays_test_share, training_args.seed)
    train_rows = dialogue_rows(data["train"], args.max_rows_per_persona) + essays_train
    if not args.train_encoder:
        return heads_only(model, tokenizer, data, train_rows, essays_test, args, training_args)

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        enc["labels"] = batch["labels"]
        return enc

    train = Dataset.from_list(train_rows).shuffle(seed=training_args.seed)
    train = train.map(encode, batched=True, remove_columns=["text"])
    training_args.remove_unused_columns = False
    trainer = Trainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    model.eval()
    report = evaluate(model, tokenizer, data, essays_test)
    final = os.path.join(training_args.output_dir, "final")
    if training_args.process_index == 0:
        save_folder_atomically(model, tokenizer, final)
        with open(os.path.join(final, "eval.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=1))
    return report


def heads_only(model, tokenizer, data, train_rows, essays_test, args, training_args) -> dict:
    from personaweave.traits.pretrained import save_trait_heads

    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.eval()
    fit_heads(model, tokenizer, train_rows, args, training_args)
    report = evaluate(model, tokenizer, data, essays_test)
    train_traits = np.array([r["labels"] for r in dialogue_rows(data["train"], args.max_rows_per_persona)])
    report["dialogue_test_constant_baseline_mae"] = round(float(np.abs(
        np.asarray(data["test"]["traits"]) - train_traits.mean(0)).mean()), 4)
    save_trait_heads(model, os.path.join(training_args.output_dir, "heads"), report)
    print(json.dumps(report, indent=1))
    return report


def evaluate(model, tokenizer, data, essays_test) -> dict:
    metric = load_trait_metrics()
    test = data["test"]
    report = {"dialogue_test": metric.compute(predictions=predict(model, tokenizer, list(test["response"])),
                                              references=list(test["traits"]))}
    if essays_test:
        pred = predict(model, tokenizer, [r["text"] for r in essays_test])
        ref = np.array([r["labels"] for r in essays_test])
        report["essays_binary_accuracy"] = {
            trait: {"ours": round(100 * float(((pred[:, TRAITS.index(trait)] > 0.5) ==
                                               (ref[:, TRAITS.index(trait)] > 0.5)).mean()), 1),
                    "majority": round(100 * float(max(ref[:, TRAITS.index(trait)].mean(),
                                                      1 - ref[:, TRAITS.index(trait)].mean())), 1),
                    "published": PUBLISHED[trait]}
            for trait in ESSAY_COLUMNS.values()}
        report["essays_test_size"] = len(essays_test)
    return report


def make_parser() -> TrlParser:
    return TrlParser((TraitArguments, TrainingArguments))


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
    sys.exit(0)
