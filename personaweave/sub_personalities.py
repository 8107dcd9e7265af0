"""Sub-personalities: one peft LoRA adapter per persona on top of the shared (frozen) master model.

Adapters are named after their persona, switched with `set_sub_personality` and blended with
peft's `add_weighted_adapter`. The default `combination_type="cat"` is an exact weighted sum of
the adapters' weight deltas ("linear" is, by peft's own docstring, a rough approximation). On
disk they live in `<model folder>/adapters/<persona>/` (peft's own format), next to the master.
Several at once: peft's per-row `adapter_names` (`MASTER` for a row without any), as `serve` and
`chat` use them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from personaweave.models.personas import blend_name, check_name, normalise_blend

ADAPTERS_DIR = "adapters"
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASTER = "__base__"  # peft's name, in `adapter_names`, for a row that runs without any adapter


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.05,
                target_modules: Sequence[str] = DEFAULT_TARGET_MODULES):
    """A LoRA config for sub-personalities. rsLoRA stays off: blends keep the first adapter's
    `use_rslora` (peft 0.21), so mixed settings would blend wrongly."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      task_type="CAUSAL_LM", use_rslora=False)


def add_sub_personality(model: Any, persona: str, config: Any = None):
    """Add a LoRA adapter named `persona`; returns the PeftModel (wrapping `model` on first use)."""
    from peft import PeftModel, get_peft_model

    check_name(persona)
    config = config or lora_config()
    if isinstance(model, PeftModel):
        if persona in model.peft_config:
            raise ValueError(f"Sub-personality {persona!r} already exists.")
        model.add_adapter(persona, config)
        return model
    return get_peft_model(model, config, adapter_name=persona)


def sub_personalities(model: Any) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def set_sub_personality(model: Any, persona: str) -> None:
    """Activate one sub-personality (adapter) by name."""
    known = sub_personalities(model)
    if persona not in known:
        raise KeyError(f"Unknown sub-personality {persona!r}; known: {known}.")
    model.set_adapter(persona)


def blend_sub_personalities(model: Any, weights: Mapping[str, float], name: Optional[str] = None,
                            combination_type: str = "cat", activate: bool = True) -> str:
    """Add the weighted blend of existing adapters as a new adapter (weights normalised to 1)."""
    weights = normalise_blend(weights, sub_personalities(model))
    name = check_name(name or blend_name(weights))
    if name in sub_personalities(model):
        raise ValueError(f"Sub-personality {name!r} already exists.")
    was_training = model.training
    model.add_weighted_adapter(list(weights), list(weights.values()), adapter_name=name,
                               combination_type=combination_type)
    # peft builds the new adapter's modules in torch's default training mode: in a model that was in eval
    # mode that would switch its LoRA dropout on, so blended replies would be random and perturbed
    model.train(was_training)
    if activate:
        model.set_adapter(name)
    return name


def save_sub_personalities(model: Any, model_dir: str, names: Optional[Sequence[str]] = None) -> list[str]:
    """Save adapters to `<model_dir>/adapters/<name>/` (peft format: config + safetensors), each
    written to a temp folder first and swapped in, so an interrupted save leaves the old one."""
    import shutil
    import tempfile

    from personaweave.files import replace_folder

    names = list(names or sub_personalities(model))
    root = os.path.join(model_dir, ADAPTERS_DIR)
    os.makedirs(root, exist_ok=True)
    for name in names:
        tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-")
        try:
            model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
            # peft writes an adapter named "default" at the top, any other in a subfolder
            nested = os.path.join(tmp, name)
            replace_folder(nested if os.path.isdir(nested) else tmp, os.path.join(root, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return names


def load_sub_personalities(model: Any, model_dir: str, names: Optional[Sequence[str]] = None,
                           is_trainable: bool = False):
    """Wrap `model` (the master) in a PeftModel holding every adapter saved under `model_dir`."""
    from peft import PeftModel

    root = os.path.join(model_dir, ADAPTERS_DIR)
    if names is None:
        names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "adapter_config.json"))) \
            if os.path.isdir(root) else []
    if not names:
        raise FileNotFoundError(f"No sub-personality adapters under {root}.")
    peft_model = None
    for name in names:
        path = os.path.join(root, name)
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=is_trainable)
        else:
            peft_model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    return peft_model


def has_sub_personalities(model_dir: str) -> bool:
    root = os.path.join(model_dir, ADAPTERS_DIR)
    return os.path.isdir(root) and any(os.path.isfile(os.path.join(root, d, "adapter_config.json"))
                                       for d in os.listdir(root))


def master_only(peft: Any):
    """A context in which the master runs without any LoRA adapter (peft's `disable_adapter`);
    a no-op when there is no peft model."""
    import contextlib

    return peft.disable_adapter() if peft is not None else contextlib.nullcontext()
