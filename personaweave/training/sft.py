"""Training helpers shared by the recipes: data formatting, freezing, unfreezing, NaN guard."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from personaweave.chat import chat


def to_prompt_completion(row: dict[str, Any], num_persona_tokens: int) -> dict[str, Any]:
    """One dataset row as TRL's conversational prompt-completion example, selected by the
    persona's reserved tokens only (no description: the token must carry the persona)."""
    return {
        "prompt": chat(row["persona"], row["prompt"], num_persona_tokens=num_persona_tokens),
        "completion": [{"role": "assistant", "content": row["response"]}],
    }


def freeze_base(model: Any) -> None:
    """Train only the persona layer: the base LM (the master) stays exactly as it was."""
    for p in model.language_model.parameters():
        p.requires_grad_(False)
    for p in model.persona_embedding.parameters():
        p.requires_grad_(True)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The largest ModuleList of transformer blocks in `model` (Llama: model.layers, GPT-2: h)."""
    lists = [m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and re.search(r"(layers|h|block)$", n)]
    if not lists:
        raise ValueError("Could not find the decoder layers to unfreeze.")
    return max(lists, key=len)


def parse_unfreeze_schedule(schedule: Optional[str]) -> list[tuple[int, int]]:
    """'100:2,300:4' -> [(100, 2), (300, 4)]: at step 100 train the top 2 base layers, at 300 the top 4."""
    if not schedule:
        return []
    steps = []
    for item in schedule.split(","):
        step, sep, layers = item.partition(":")
        if not sep or not step.strip().isdigit() or not layers.strip().isdigit():
            raise ValueError(f"Bad unfreeze schedule item {item!r}; expected STEP:NUM_LAYERS.")
        steps.append((int(step), int(layers)))
    return sorted(steps)


def unfreeze_candidates(model: Any, schedule: list[tuple[int, int]]) -> list[torch.nn.Parameter]:
    """Base parameters that the schedule will unfreeze (they join the optimizer from the start,
    frozen: AdamW skips parameters without a gradient, so they do not move until unfrozen)."""
    if not schedule:
        return []
    top = max(n for _, n in schedule)
    layers = decoder_layers(model)
    return [p for layer in list(layers)[-top:] for n, p in layer.named_parameters() if "lora_" not in n]


class ProgressiveUnfreezing(TrainerCallback):
    """Unfreeze the top N base layers at the scheduled steps."""

    def __init__(self, model: Any, schedule: list[tuple[int, int]]) -> None:
        self.layers = decoder_layers(model)
        self.schedule = schedule

    def on_step_begin(self, args, state, control, **kwargs):
        for step, count in self.schedule:
            if state.global_step == step:
                for layer in list(self.layers)[-count:]:
                    for name, p in layer.named_parameters():
                        if "lora_" not in name:
                            p.requires_grad_(True)
        return control


class NanGuard(TrainerCallback):
    """Stop at the first non-finite loss; the recipe then keeps the last good checkpoint."""

    def __init__(self) -> None:
        self.tripped_at: Optional[int] = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.tripped_at = state.global_step
            control.should_training_stop = True
            control.should_save = False
        return control

