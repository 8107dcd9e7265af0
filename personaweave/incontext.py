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

from .personas import TRAITS, Persona

_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


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
    return fallback


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
