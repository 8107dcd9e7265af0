"""Knowledge distillation of the trait model into a shallower student, and dynamic int8.

The student copies the teacher's embeddings and every other encoder layer (the usual
DistilBERT-style initialisation), then learns to match the teacher's trait predictions (and the
labels, where known) with `Trainer`.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from transformers import Trainer

from personaweave.models.modeling_traits import PersonaTraitConfig, PersonaTraitModel


def make_student(teacher: PersonaTraitModel, num_layers: int = 3) -> PersonaTraitModel:
    layers = teacher.encoder.encoder.layer
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be between 1 and the teacher's {len(layers)} layers.")
    keep = [round(i * (len(layers) - 1) / max(1, num_layers - 1)) for i in range(num_layers)]
    encoder_config = copy.deepcopy(teacher.config.encoder_config)
    encoder_config.num_hidden_layers = num_layers
    config = PersonaTraitConfig(encoder_config=encoder_config, trait_names=teacher.config.trait_names)
    student = PersonaTraitModel(config)
    state = teacher.state_dict()
    renamed = {}
    for key, value in state.items():
        if ".encoder.layer." in key:
            index = int(key.split(".encoder.layer.")[1].split(".")[0])
            if index not in keep:
                continue
            key = key.replace(f".encoder.layer.{index}.", f".encoder.layer.{keep.index(index)}.")
        renamed[key] = value
    student.load_state_dict(renamed)
    return student


class DistillationTrainer(Trainer):
    """Loss = MSE(student traits, teacher traits) + alpha * masked MSE(student traits, labels)."""

    def __init__(self, *args: Any, teacher: PersonaTraitModel, alpha: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Optional[int] = None):
        labels = inputs.pop("labels", None)
        with torch.no_grad():
            target = self.teacher(**inputs).traits
        outputs = model(**inputs, labels=labels if labels is not None and torch.isfinite(labels).any() else None)
        loss = torch.nn.functional.mse_loss(outputs.traits, target)
        if outputs.loss is not None:
            loss = loss + self.alpha * outputs.loss
        return (loss, outputs) if return_outputs else loss


def quantize_torch_dynamic_int8(model: PersonaTraitModel) -> torch.nn.Module:
    """Dynamic int8 of every Linear layer (weights int8, activations quantized on the fly)."""
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)
