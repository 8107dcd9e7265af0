"""Evaluation harness: does each persona speak in character, and is the base model's ability kept?

- persona accuracy: a MiniLM persona classifier (`AutoModelForSequenceClassification`, trained
  with `Trainer` on the train split's replies) labels each generated reply;
- similarity: max cosine (MiniLM) between a reply and its persona's example responses;
- distinct-1/2 and mean length of the replies;
- perplexity without persona tokens on neutral held-out text (the test split's user turns).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from personaweave.evaluation.classifier import PersonaClassifier, classifier_accuracy, get_classifier
from personaweave.evaluation.metrics import distinct_n, example_similarity, perplexity
from personaweave.loading import load_model
from personaweave.sub_personalities import master_only

GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2}


# --- generation under each condition -----------------------------------------------------------


@torch.no_grad()
def replies_for(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], seed: int = 0,
                max_new_tokens: int = 56, batch_size: int = 16) -> list[str]:
    from personaweave.generation import generate_replies

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


# --- the whole comparison ----------------------------------------------------------------------

BLENDS = (("librarian", "robot"), ("pirate", "butler"))


def evaluate_personas(model_dir: Optional[str], classifier_dir: str, num_prompts: int = 30, seed: int = 0,
                      max_new_tokens: int = 56, log=print) -> dict[str, Any]:
    from personaweave.chat import chat, prompt_baseline_messages
    from personaweave.data import load_persona_dialogues
    from personaweave.encoders import default_encoder
    from personaweave.sub_personalities import blend_sub_personalities, set_sub_personality, sub_personalities

    data = load_persona_dialogues()
    classifier, classifier_metrics = get_classifier(classifier_dir, data, log)
    log(f"classifier: {classifier_metrics}")
    encoder = default_encoder()
    model, tok, peft = load_model(model_dir)
    bank = model.personas
    personas = [p for p in classifier.labels if p in bank]
    prompts = sorted(set(data["test"]["prompt"]))[:num_prompts]
    neutral = sorted(set(data["test"]["prompt"]))
    results: dict[str, Any] = {"classifier": classifier_metrics, "num_prompts": len(prompts), "seed": seed}

    def run(generator, conversations):
        if generator is model:  # LoRA layers live inside the master once loaded: switch them off
            with master_only(peft):
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
            run(model, [prompt_baseline_messages(bank[name].description, q) for q in prompts]), name, classifier, encoder, examples)
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


def perplexity_report(model, tok, peft, texts: Sequence[str], personas: Sequence[str]) -> dict[str, float]:
    """Perplexity on neutral text without persona tokens: the bare base, the master, each adapter."""
    from personaweave.sub_personalities import set_sub_personality, sub_personalities

    # The base is the wrapped LM called directly, bypassing the persona layer, on its own vocabulary.
    base_vocab = int(model.persona_token_table.min()) if model.persona_token_table.numel() else None
    with master_only(peft):
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

    from personaweave.chat import chat
    from personaweave.data import load_persona_dialogues

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
