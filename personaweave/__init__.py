"""personaweave: persona-conditioned dialogue models for the Hugging Face ecosystem.

`import personaweave` is cheap (no torch, no transformers): the names below load on first use
(PEP 562), so `personaweave --help` starts fast. Importing the models (`personaweave.models`, or any
model name from here, e.g. `personaweave.PersonaWeaveForCausalLM`) registers the PersonaWeave classes
with transformers' Auto classes.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; loaded on first attribute access.
_LAZY = {
    **{name: "personaweave.models" for name in (
        "TRAITS", "Persona", "PersonaBank", "PersonaEmbedding", "PersonaTraitConfig", "PersonaTraitModel",
        "PersonaWeaveConfig", "PersonaWeaveForCausalLM", "PersonaWeaveForConditionalGeneration",
        "PersonaWeavePreTrainedModel", "persona_prompt", "persona_token")},
    "chat": "personaweave.chat",
    "prompt_baseline_messages": "personaweave.chat",
    "default_encoder": "personaweave.encoders",
    "from_base": "personaweave.loading",
    "load_model": "personaweave.loading",
}


class _Package(types.ModuleType):
    """Importing the submodule `personaweave.chat` sets the package attribute `chat` to that module; keep
    `personaweave.chat` the function (as the eager imports of old did) by not storing a module over a
    lazy name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'personaweave' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if module == "personaweave.models":
        importlib.import_module("personaweave.encoders")  # the default encoder for add_persona(description=)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def add_persona_tokens(tokenizer, model) -> list[str]:
    """Add every reserved token of `model`'s bank to `tokenizer` (e.g. a freshly loaded base
    tokenizer) and check that the ids agree with the model's; returns the tokens."""
    from personaweave.models import persona_token

    tokens = [persona_token(n, i) for n in model.config.persona_names
              for i in range(model.config.num_persona_tokens)]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    expected = [i for row in model.config.persona_token_ids for i in row]
    if ids != expected:
        raise ValueError("The tokenizer assigns other ids to the persona tokens than the model: "
                         "load the tokenizer saved with the model instead.")
    return tokens


__all__ = [
    "TRAITS",
    "Persona",
    "PersonaBank",
    "PersonaEmbedding",
    "PersonaWeaveConfig",
    "PersonaWeaveForCausalLM",
    "PersonaWeaveForConditionalGeneration",
    "PersonaWeavePreTrainedModel",
    "PersonaTraitConfig",
    "PersonaTraitModel",
    "add_persona_tokens",
    "chat",
    "from_base",
    "load_model",
    "prompt_baseline_messages",
    "persona_prompt",
    "persona_token",
]
