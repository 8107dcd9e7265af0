"""In-context trait estimation helpers: parse an LM's trait JSON robustly, map traits to a blend.

The in-context learner asks an instruct LM for the user's preferred trait values as JSON.
Small models answer loosely, so `parse_traits` extracts the first JSON object it can find,
drops unknown keys, clamps values to [0, 1] and falls back to a default on garbage.
`traits_to_blend` maps a trait vector onto the bank's personas with non-negative least squares,
ready for `model.add_persona(name, blend=...)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from personaweave.models.personas import TRAITS, Persona

_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_PAIR = re.compile(r"[\"']?([A-Za-z_]+)[\"']?\s*:\s*(-?\d+(?:\.\d+)?)")


def parse_traits(text: str, default: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """Trait values from an LM answer: the first parseable JSON object with known trait keys.

    Values are clamped to [0, 1]; unknown keys and non-numeric values are dropped; with nothing
    usable, `default` (or every trait at 0.5) is returned.
    """
    fallback = dict(default) if default is not None else {t: 0.5 for t in TRAITS}
    for match in _JSON_OBJECT.finditer(text or ""):
        candidate = match.group(0)
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            try:  # single quotes and trailing commas are common in small models' JSON
                data = json.loads(re.sub(r",\s*}", "}", candidate.replace("'", '"')))
            except json.JSONDecodeError:
                continue
        traits = {}
        for key, value in data.items():
            name = str(key).strip().lower()
            if name in TRAITS:
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if np.isfinite(number):
                    traits[name] = float(np.clip(number, 0.0, 1.0))
        if traits:
            return {**fallback, **traits}
    # an object cut off by the token limit ('{"humor": 0.3, "empathy": 0.8,'): read its pairs
    opened = (text or "").find("{")
    traits = {}
    for key, value in _PAIR.findall(text[opened:] if opened >= 0 else ""):
        if key.lower() in TRAITS:
            traits[key.lower()] = float(np.clip(float(value), 0.0, 1.0))
    return {**fallback, **traits} if traits else fallback


def traits_to_blend(traits: Mapping[str, float], personas: Sequence[Persona], min_weight: float = 1e-3
                    ) -> dict[str, float]:
    """Non-negative least squares of the target traits onto the personas' trait vectors.

    Returns weights that sum to 1 over the personas with a weight above `min_weight`.
    """
    from scipy.optimize import nnls

    usable = [p for p in personas if p.traits and all(t in p.traits for t in TRAITS)]
    if not usable:
        raise ValueError("No persona in the bank has all ten trait values.")
    unknown = set(traits) - set(TRAITS)
    if unknown:
        raise ValueError(f"Unknown traits {sorted(unknown)}; the traits are {list(TRAITS)}.")
    keys = [t for t in TRAITS if t in traits]
    if not keys:
        raise ValueError("traits_to_blend needs at least one trait value.")
    matrix = np.array([[p.traits[t] for p in usable] for t in keys])  # (traits, personas)
    target = np.array([traits[t] for t in keys])
    # A row of ones (weighted) pushes the weights towards a convex mix, so the blend is a blend.
    matrix = np.vstack([matrix, 10.0 * np.ones(len(usable))])
    target = np.append(target, 10.0)
    weights, _ = nnls(matrix, target)
    if weights.sum() <= 0:
        raise ValueError("No non-negative mix of the bank's personas fits these traits.")
    weights = weights / weights.sum()
    kept = {p.name: float(w) for p, w in zip(usable, weights) if w > min_weight}
    total = sum(kept.values())
    return {name: w / total for name, w in kept.items()}


def blend_traits_vector(blend: Mapping[str, float], personas: Sequence[Persona]) -> dict[str, float]:
    """The trait vector a blend stands for (the weighted mean of its parents')."""
    by_name = {p.name: p for p in personas}
    return {t: float(sum(w * by_name[n].traits[t] for n, w in blend.items())) for t in TRAITS}


def trait_prompt(examples: Sequence[tuple[str, Mapping[str, float]]], context: str) -> list[dict[str, Any]]:
    """Chat messages asking an instruct LM for trait values as JSON, with worked examples."""
    shots = "\n\n".join(f"Text: {text}\nTraits: {json.dumps({k: round(v, 2) for k, v in t.items()})}"
                        for text, t in examples)
    return [
        {"role": "system", "content": "You rate which personality a chatbot should show. Answer only with a JSON "
                                      f"object whose keys are {', '.join(TRAITS)} and whose values are in [0, 1]."},
        {"role": "user", "content": f"{shots}\n\nText: {context}\nTraits:"},
    ]


class InContextTraitEstimator:
    """Traits for a user context from an instruct LM shown the most similar labelled examples.

    `generate(messages) -> str` is the LM: `local_generator(model, tokenizer)` for the shipped
    SmolLM2 (or any HF chat model), or `openai_generator(url)` for any OpenAI-compatible endpoint.
    """

    def __init__(self, texts: Sequence[str], traits: Sequence[Mapping[str, float]], generate, encoder: Any = None,
                 shots: int = 3) -> None:
        if len(texts) != len(traits) or not len(texts):
            raise ValueError("The example bank needs as many trait labels as texts, and at least one.")
        from personaweave.data.discovery import embed_units

        self.texts, self.traits, self.generate, self.shots = list(texts), list(traits), generate, shots
        self.encoder = encoder
        self.vectors = embed_units(self.texts, encoder)

    def examples_for(self, context: str) -> list[tuple[str, Mapping[str, float]]]:
        from personaweave.data.discovery import embed_units

        query = embed_units([context], self.encoder)[0]
        best = np.argsort(-(self.vectors @ query))[: self.shots]
        return [(self.texts[i], self.traits[i]) for i in best]

    def estimate(self, context: str, recent_turns: Sequence[str] = ()) -> dict[str, float]:
        text = " ".join([*recent_turns, context]).strip()
        if not text:
            raise ValueError("Cannot estimate traits from an empty context.")
        return parse_traits(self.generate(trait_prompt(self.examples_for(text), text)))


def local_generator(model: Any, tokenizer: Any, max_new_tokens: int = 160):
    """`generate(messages) -> str` with a local HF chat model (greedy)."""
    import torch

    def generate(messages: list[dict[str, str]]) -> str:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate


def openai_generator(base_url: str, model: str = "default", api_key: str = "none", timeout: float = 30.0):
    """`generate(messages) -> str` through any OpenAI-compatible /v1/chat/completions endpoint."""
    import urllib.request

    url = base_url.rstrip("/") + "/chat/completions"

    def generate(messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": model, "messages": messages, "temperature": 0}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (user-given URL)
            return json.load(response)["choices"][0]["message"]["content"]

    return generate
