"""Personas and the persona bank.

A persona is a name, a natural-language description, ten trait values and example replies;
its *vector* (a sentence-encoder embedding of the description, or a blend of other vectors)
is what the model's `PersonaEmbedding` turns into soft vectors.

Only torch, safetensors and the standard library are imported here: the model's remote code
imports this file, so it must work where personaweave is not installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

TRAITS: tuple[str, ...] = (
    "extraversion",
    "agreeableness",
    "conscientiousness",
    "neuroticism",
    "openness",
    "humor",
    "empathy",
    "formality",
    "enthusiasm",
    "supportiveness",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
PERSONAS_FILE = "personas.json"
VECTORS_FILE = "persona_vectors.safetensors"


def persona_token(name: str, slot: int) -> str:
    """The reserved token for soft vector `slot` of persona `name`."""
    return f"<|persona:{name}:{slot}|>"


def persona_prompt(name: str, num_tokens: int) -> str:
    """All reserved tokens of a persona, in order: what a prompt carries to select it."""
    return "".join(persona_token(name, i) for i in range(num_tokens))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"Invalid persona name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit."
        )
    return name


def check_description(description: Optional[str]) -> str:
    if description is None or not str(description).strip():
        raise ValueError("A persona description must be a non-empty string.")
    return str(description).strip()


def check_vector(vector: Any, dim: int, name: str = "persona") -> torch.Tensor:
    """Return `vector` as a 1-D float32 tensor of size `dim`, or raise a ValueError saying why not."""
    tensor = torch.as_tensor(vector, dtype=torch.float32).detach().cpu()
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or tensor.shape[0] != dim:
        raise ValueError(f"Vector of {name!r} has shape {tuple(tensor.shape)}; expected ({dim},).")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"Vector of {name!r} contains NaN or infinite values.")
    return tensor.clone()


def check_traits(traits: Optional[Mapping[str, float]]) -> Optional[dict[str, float]]:
    if traits is None:
        return None
    unknown = set(traits) - set(TRAITS)
    if unknown:
        raise ValueError(f"Unknown traits {sorted(unknown)}; the traits are {list(TRAITS)}.")
    out = {}
    for key in TRAITS:
        if key in traits:
            value = float(traits[key])
            if not (0.0 <= value <= 1.0) or math.isnan(value):
                raise ValueError(f"Trait {key!r} = {value} is outside [0, 1].")
            out[key] = value
    return out


def normalise_blend(weights: Mapping[str, float], known: Iterable[str]) -> dict[str, float]:
    """Check blend weights against the known persona names and scale them to sum to 1."""
    known = list(known)
    if not isinstance(weights, Mapping):
        raise ValueError(f"A blend is a dict of persona name -> weight, e.g. {{'pirate': 0.5, 'butler': 0.5}}, "
                         f"not a {type(weights).__name__} ({weights!r:.80}).")
    if not weights:
        raise ValueError("A blend needs at least one persona weight.")
    for name, weight in weights.items():
        if name not in known:
            raise KeyError(f"Unknown persona {name!r} in blend; known personas: {known}.")
        if not isinstance(weight, (int, float)) or math.isnan(weight) or math.isinf(weight):
            raise ValueError(f"Blend weight for {name!r} must be a finite number, got {weight!r}.")
        if weight < 0:
            raise ValueError(f"Blend weight for {name!r} is negative ({weight}); weights must be >= 0.")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("Blend weights must sum to a positive number.")
    return {name: float(weight) / total for name, weight in weights.items()}


def parse_blend(items: str | Sequence[str]) -> dict[str, float]:
    """Blend weights from `"a=0.7,b=0.3"` or `["a=0.7", "b=0.3"]` (the one NAME=WEIGHT parser).

    Raises ValueError for a part without `=`, a weight that is not a finite number, or a name
    given twice. Names are checked against a bank later, by `normalise_blend`.
    """
    parts = items.split(",") if isinstance(items, str) else list(items)
    weights: dict[str, float] = {}
    for part in parts:
        name, sep, value = str(part).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"Blend part {part!r} is not NAME=WEIGHT.")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"Blend weight in {part!r} is not a number.") from None
        if math.isnan(weight) or math.isinf(weight):
            raise ValueError(f"Blend weight in {part!r} must be a finite number.")
        if name in weights:
            raise ValueError(f"Persona {name!r} appears twice in the blend.")
        weights[name] = weight
    if not weights:
        raise ValueError("A blend needs at least one NAME=WEIGHT part.")
    return weights


def blend_name(weights: Mapping[str, float], prefix: str = "blend") -> str:
    """The one naming scheme for blends: parents in order, then a hash of the normalised weights,
    so equal mixes share a name and different mixes never do (`0.8/0.2` vs `0.5/0.5`)."""
    total = float(sum(weights.values()))
    if not total > 0:
        raise ValueError("Blend weights must sum to a positive number.")
    normalised = sorted((n, round(float(w) / total, 6)) for n, w in weights.items())
    digest = hashlib.sha256(json.dumps(normalised).encode()).hexdigest()[:10]
    parents = "_".join(re.sub(r"[^A-Za-z0-9]", "", n)[:12] for n, _ in normalised)[:36]
    return f"{prefix}-{parents}-{digest}"


@dataclass
class Persona:
    """One persona: who it is, and (once encoded) the vector that conditions the model."""

    name: str
    description: str = ""
    traits: Optional[dict[str, float]] = None
    examples: list[str] = field(default_factory=list)
    blend: Optional[dict[str, float]] = None
    vector: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_name(self.name)
        self.traits = check_traits(self.traits)
        self.examples = [str(e) for e in self.examples]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata (the vector is stored separately, as safetensors)."""
        return {
            "name": self.name,
            "description": self.description,
            "traits": self.traits,
            "examples": list(self.examples),
            "blend": self.blend,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], vector: Optional[torch.Tensor] = None) -> Persona:
        keys = ("name", "description", "traits", "examples", "blend")
        return cls(**{k: data[k] for k in keys if data.get(k) is not None}, vector=vector)


class PersonaBank:
    """An ordered collection of personas with vectors of one dimension.

    Standalone (discovery output, datasets) or as a snapshot of a model's bank
    (`model.personas`). Saved as `personas.json` + `persona_vectors.safetensors`.
    """

    def __init__(self, personas: Sequence[Persona] = (), dim: Optional[int] = None) -> None:
        self.dim = dim
        self._personas: dict[str, Persona] = {}
        for persona in personas:
            self.add(persona)

    # -- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._personas)

    def __iter__(self) -> Iterator[Persona]:
        return iter(self._personas.values())

    def __contains__(self, name: object) -> bool:
        return name in self._personas

    def __getitem__(self, name: str) -> Persona:
        if name not in self._personas:
            raise KeyError(f"Unknown persona {name!r}; known personas: {self.names}.")
        return self._personas[name]

    def __repr__(self) -> str:
        return f"PersonaBank({self.names})"

    @property
    def names(self) -> list[str]:
        return list(self._personas)

    # -- edits ----------------------------------------------------------------------------
    def add(self, persona: Persona) -> Persona:
        if persona.name in self._personas:
            raise ValueError(f"Persona {persona.name!r} already exists; remove it first.")
        if persona.vector is not None:
            if self.dim is None:
                self.dim = int(torch.as_tensor(persona.vector).numel())
            persona.vector = check_vector(persona.vector, self.dim, persona.name)
        self._personas[persona.name] = persona
        return persona

    def remove(self, name: str) -> Persona:
        persona = self[name]
        del self._personas[name]
        return persona

    def blend(self, name: str, weights: Mapping[str, float], description: Optional[str] = None) -> Persona:
        """A new persona whose vector and traits are the normalised weighted mix of others."""
        check_name(name)
        weights = normalise_blend(weights, self.names)
        vector = sum(w * self._require_vector(n) for n, w in weights.items())
        return Persona(
            name=name,
            description=description or describe_blend(weights, {n: self[n].description for n in weights}),
            traits=blend_traits([self[n] for n in weights], list(weights.values())),
            blend=weights,
            vector=vector,
        )

    def vectors(self) -> torch.Tensor:
        """(num_personas, dim) matrix of the vectors, in bank order."""
        if not len(self):
            return torch.zeros(0, self.dim or 0)
        return torch.stack([self._require_vector(n) for n in self.names])

    def _require_vector(self, name: str) -> torch.Tensor:
        vector = self[name].vector
        if vector is None:
            raise ValueError(f"Persona {name!r} has no vector yet; encode its description first.")
        return vector

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write personas.json and persona_vectors.safetensors (each via a temp file + rename)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        meta = {"dim": self.dim, "personas": [p.to_dict() for p in self]}
        tensors = {p.name: p.vector.contiguous() for p in self if p.vector is not None}
        _atomic_write(os.path.join(directory, PERSONAS_FILE), lambda path: _write_json(path, meta))
        _atomic_write(os.path.join(directory, VECTORS_FILE), lambda path: save_file(tensors, path))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PersonaBank:
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, PERSONAS_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"No {PERSONAS_FILE} in {directory}.")
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        vec_path = os.path.join(directory, VECTORS_FILE)
        vectors = load_file(vec_path) if os.path.isfile(vec_path) else {}
        personas = [Persona.from_dict(p, vectors.get(p["name"])) for p in meta["personas"]]
        return cls(personas, dim=meta.get("dim"))


def describe_blend(weights: Mapping[str, float], descriptions: Optional[Mapping[str, str]] = None) -> str:
    """'a blend of 70% <librarian's description> and 30% <robot's description>'."""
    descriptions = descriptions or {}
    parts = [f"{round(100 * w)}% {descriptions.get(n) or n}" for n, w in weights.items()]
    return "a blend of " + (" and ".join(parts) if len(parts) == 2 else ", ".join(parts))


def blend_traits(personas: Sequence[Persona], weights: Sequence[float]) -> Optional[dict[str, float]]:
    """Weighted mean of the parents' traits, over the traits that every parent has."""
    if any(p.traits is None for p in personas):
        return None
    shared = [t for t in TRAITS if all(t in p.traits for p in personas)]  # type: ignore[operator]
    return {t: sum(w * p.traits[t] for p, w in zip(personas, weights)) for t in shared}  # type: ignore[index]


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)


def _atomic_write(path: str, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash leaves the old file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = [
    "TRAITS",
    "Persona",
    "PersonaBank",
    "persona_token",
    "persona_prompt",
    "normalise_blend",
    "check_vector",
    "check_name",
    "check_description",
]
