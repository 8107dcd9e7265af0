"""The persona classifier: MiniLM + a classification head trained on (reply -> persona)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

# --- the persona classifier --------------------------------------------------------------------


@dataclass
class PersonaClassifier:
    model: Any
    tokenizer: Any

    @property
    def labels(self) -> list[str]:
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @classmethod
    def from_pretrained(cls, path: str) -> PersonaClassifier:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        return cls(AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=128, padding=True,
                                 return_tensors="pt")
            out.append(torch.softmax(self.model(**enc).logits, -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))


def train_persona_classifier(train, validation, output_dir: str, base: Optional[str] = None, epochs: float = 3,
                             seed: int = 0) -> tuple[PersonaClassifier, dict[str, float]]:
    """Fine-tune MiniLM + a classification head on (response -> persona) with `Trainer`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from personaweave.files import save_folder_atomically
    from personaweave.zoo import minilm_path

    base = base or minilm_path()
    labels = sorted(set(train["persona"]))
    label2id = {name: i for i, name in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)

    def encode(batch):
        enc = tokenizer(batch["response"], truncation=True, max_length=128)
        enc["labels"] = [label2id[p] for p in batch["persona"]]
        return enc

    columns = train.column_names
    train_enc = train.map(encode, batched=True, remove_columns=columns)
    val_enc = validation.filter(lambda r: r["persona"] in label2id).map(encode, batched=True, remove_columns=columns)
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "trainer"), num_train_epochs=epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, learning_rate=5e-5, warmup_ratio=0.1, weight_decay=0.01,
        eval_strategy="epoch", save_strategy="no", logging_steps=20, report_to="none", seed=seed, use_cpu=not
        torch.cuda.is_available(), disable_tqdm=False,
    )

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=train_enc, eval_dataset=val_enc,
                      processing_class=tokenizer, compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    save_folder_atomically(model, tokenizer, output_dir)
    return PersonaClassifier(model, tokenizer), metrics


def classifier_accuracy(classifier: PersonaClassifier, texts: Sequence[str], personas: Sequence[str]) -> float:
    pred = classifier.predict_proba(texts).argmax(-1)
    labels = classifier.labels
    return float(np.mean([labels[i] == p for i, p in zip(pred, personas)]))


def get_classifier(classifier_dir: str, data, log=print) -> tuple[PersonaClassifier, dict[str, float]]:
    """Load the persona classifier, training it first when the folder does not hold one yet."""
    if os.path.isfile(os.path.join(classifier_dir, "config.json")):
        classifier = PersonaClassifier.from_pretrained(classifier_dir)
        metrics: dict[str, float] = {}
    else:
        log(f"training the persona classifier into {classifier_dir}")
        classifier, metrics = train_persona_classifier(data["train"], data["validation"], classifier_dir)
    metrics["test_accuracy_on_dataset_replies"] = classifier_accuracy(
        classifier, data["test"]["response"], data["test"]["persona"])
    return classifier, metrics
