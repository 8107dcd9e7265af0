"""Evaluation harness: does each persona speak in character, and is the base model's ability kept?

- persona accuracy: a MiniLM persona classifier (`AutoModelForSequenceClassification`, trained
  with `Trainer` on the train split's replies) labels each generated reply;
- similarity: max cosine (MiniLM) between a reply and its persona's example responses;
- distinct-1/2 and mean length of the replies;
- perplexity without persona tokens on neutral held-out text (the test split's user turns).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2}


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

    from .saving import save_folder_atomically
    from .zoo import minilm_path

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


# --- text metrics ------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the replies (Li et al. 2016)."""
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / len(grams) if grams else 0.0


def example_similarity(encoder: Any, replies: Sequence[str], examples: Sequence[str]) -> np.ndarray:
    """For each reply, the max cosine to the persona's example responses."""
    if not replies:
        return np.zeros(0)
    r, e = encoder.encode(list(replies)), encoder.encode(list(examples))
    return (np.asarray(r) @ np.asarray(e).T).max(1)


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
               vocab_limit: Optional[int] = None) -> float:
    """Token-level perplexity of plain text (no persona tokens, no chat template).

    `vocab_limit` keeps only the first logits: the bare base's vocabulary, before persona tokens
    were appended to it.
    """
    total, count = 0.0, 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=128)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            logits = logits[..., :vocab_limit] if vocab_limit else logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    finally:
        tokenizer.padding_side = side
    return math.exp(total / max(count, 1))


# --- generation under each condition -----------------------------------------------------------


@torch.no_grad()
def replies_for(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], seed: int = 0,
                max_new_tokens: int = 56, batch_size: int = 16) -> list[str]:
    from .generation import generate_replies

    torch.manual_seed(seed)
    return generate_replies(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, **GENERATION).texts


def score(replies: Sequence[str], persona: str, classifier: PersonaClassifier, encoder: Any,
          examples: Sequence[str], parents: Optional[Sequence[str]] = None) -> dict[str, float]:
    probs = classifier.predict_proba(replies)
    labels = classifier.labels
    out = {
        "example_similarity": float(example_similarity(encoder, replies, examples).mean()),
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
        "mean_words": float(np.mean([len(r.split()) for r in replies])),
    }
    if parents:
        out["parent_mass"] = float(probs[:, [labels.index(p) for p in parents]].sum(1).mean())
        out["parent_mass_a"] = float(probs[:, labels.index(parents[0])].mean())
    else:
        out["persona_accuracy"] = float(np.mean([labels[i] == persona for i in probs.argmax(-1)]))
    return out


def save_json(data: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)


# --- the whole comparison ----------------------------------------------------------------------

BLENDS = (("librarian", "robot"), ("pirate", "butler"))


def load_for_eval(model_dir: Optional[str], base: str = "smollm2-135m-instruct"):
    """(master, tokenizer, peft model or None): a saved folder (with its adapters) or a fresh build."""
    from transformers import AutoTokenizer

    from . import PersonaWeaveForCausalLM
    from .adapters import has_sub_personalities, load_sub_personalities

    if model_dir is None:
        model, tok = PersonaWeaveForCausalLM.from_base(base, personas="default")
        return model, tok, None
    model = PersonaWeaveForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    peft = load_sub_personalities(model, model_dir).eval() if has_sub_personalities(model_dir) else None
    return model, tok, peft


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


def evaluate_personas(model_dir: Optional[str], classifier_dir: str, num_prompts: int = 30, seed: int = 0,
                      max_new_tokens: int = 56, log=print) -> dict[str, Any]:
    from . import chat, describe
    from .adapters import blend_sub_personalities, set_sub_personality, sub_personalities
    from .data import load_persona_dialogues
    from .zoo import default_encoder

    data = load_persona_dialogues()
    classifier, classifier_metrics = get_classifier(classifier_dir, data, log)
    log(f"classifier: {classifier_metrics}")
    encoder = default_encoder()
    model, tok, peft = load_for_eval(model_dir)
    bank = model.personas
    personas = [p for p in classifier.labels if p in bank]
    prompts = sorted(set(data["test"]["prompt"]))[:num_prompts]
    neutral = sorted(set(data["test"]["prompt"]))
    results: dict[str, Any] = {"classifier": classifier_metrics, "num_prompts": len(prompts), "seed": seed}

    def run(generator, conversations):
        if generator is model:  # LoRA layers live inside the master once loaded: switch them off
            with master_mode(peft):
                return replies_for(model, tok, conversations, seed=seed, max_new_tokens=max_new_tokens)
        return replies_for(generator, tok, conversations, seed=seed, max_new_tokens=max_new_tokens)

    plain = run(model, [[{"role": "user", "content": q}] for q in prompts])
    table: dict[str, dict[str, dict[str, float]]] = {"base_no_persona": {}, "prompt_baseline": {},
                                                     "persona_token": {}}
    for name in personas:
        examples = bank[name].examples
        log(f"evaluating {name}")
        table["base_no_persona"][name] = score(plain, name, classifier, encoder, examples)
        table["prompt_baseline"][name] = score(
            run(model, [describe(bank[name].description, q) for q in prompts]), name, classifier, encoder, examples)
        table["persona_token"][name] = score(
            run(model, [chat(name, q, model=model) for q in prompts]), name, classifier, encoder, examples)
        if peft is not None and name in sub_personalities(peft):
            set_sub_personality(peft, name)
            table.setdefault("persona_token_lora", {})[name] = score(
                run(peft, [chat(name, q, model=model) for q in prompts]), name, classifier, encoder, examples)
    blends: dict[str, Any] = {}
    for a, b in BLENDS:
        if a not in bank or b not in bank:
            continue
        name = f"{a}_{b}_50"
        if name not in model.config.persona_names:
            model.add_persona(name, blend={a: 0.5, b: 0.5}, tokenizer=tok)
        examples = bank[a].examples + bank[b].examples
        generator = model
        if peft is not None and {a, b} <= set(sub_personalities(peft)):
            adapter = blend_sub_personalities(peft, {a: 0.5, b: 0.5}, name=f"blend_{name}")
            generator = peft
        replies = run(generator, [chat(name, q, model=model) for q in prompts])
        blends[name] = score(replies, name, classifier, encoder, examples, parents=(a, b))
        blends[name]["with_lora_blend"] = generator is not model
        if generator is not model:
            peft.delete_adapter(adapter)
    results["per_persona"] = table
    results["blends"] = blends
    results["summary"] = {cond: {k: float(np.mean([v[k] for v in rows.values()])) for k in next(iter(rows.values()))}
                          for cond, rows in table.items() if rows}
    results["perplexity"] = perplexity_report(model, tok, peft, neutral, personas)
    return results


def master_mode(peft: Any):
    """A context in which the master runs without any LoRA adapter (no-op without peft)."""
    import contextlib

    return peft.disable_adapter() if peft is not None else contextlib.nullcontext()


def perplexity_report(model, tok, peft, texts: Sequence[str], personas: Sequence[str]) -> dict[str, float]:
    """Perplexity on neutral text without persona tokens: the bare base, the master, each adapter."""
    from .adapters import set_sub_personality, sub_personalities

    # The base is the wrapped LM called directly, bypassing the persona layer, on its own vocabulary.
    base_vocab = int(model.persona_token_table.min()) if model.persona_token_table.numel() else None
    with master_mode(peft):
        report = {"master": perplexity(model, tok, texts),
                  "base": perplexity(model.language_model, tok, texts, vocab_limit=base_vocab)}
    if peft is not None:
        for name in personas:
            if name in sub_personalities(peft):
                set_sub_personality(peft, name)
                report[f"lora_{name}"] = perplexity(peft, tok, texts)
    return report



def evaluate_onnx(onnx_dir: str, classifier_dir: str, file_name: str = "model.onnx", num_prompts: int = 30,
                  seed: int = 0, max_new_tokens: int = 56) -> dict[str, Any]:
    """Persona accuracy of an exported graph (fp32 or int8), on the same prompts and seeds as
    `evaluate_personas`, so the two can be compared."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from . import chat
    from .data import load_persona_dialogues

    data = load_persona_dialogues()
    classifier = PersonaClassifier.from_pretrained(classifier_dir)
    with open(os.path.join(onnx_dir, "config.json"), encoding="utf-8") as handle:
        meta = json.load(handle)["personaweave"]
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, file_name=file_name)
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    names = [p["name"] for p in meta["personas"] if p["name"] in classifier.labels]
    prompts = sorted(set(data["test"]["prompt"]))[:num_prompts]
    per_persona = {}
    for name in names:
        replies = replies_for(model, tok, [chat(name, q, num_persona_tokens=meta["num_persona_tokens"])
                                           for q in prompts], seed=seed, max_new_tokens=max_new_tokens)
        per_persona[name] = classifier_accuracy(classifier, replies, [name] * len(replies))
    return {"file": file_name, "persona_accuracy": float(np.mean(list(per_persona.values()))),
            "per_persona": per_persona}
