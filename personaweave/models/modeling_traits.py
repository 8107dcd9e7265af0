"""The ten-trait model: a sentence encoder with a trait head and an engagement head.

`PersonaTraitModel` mean-pools a BERT-style encoder (default: the shipped all-MiniLM-L6-v2) and
predicts the ten traits (sigmoid, in [0, 1]) and an engagement score. Trait labels may be partial
(NaN where unknown: the Big-Five essays label five traits), so the loss is a masked MSE.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from .personas import TRAITS


class PersonaTraitConfig(PretrainedConfig):
    model_type = "personaweave_traits"
    sub_configs = {"encoder_config": AutoConfig}

    def __init__(self, encoder_config: Optional[PretrainedConfig | dict[str, Any]] = None,
                 trait_names: Sequence[str] = TRAITS, engagement_weight: float = 0.1, **kwargs: Any) -> None:
        if isinstance(encoder_config, dict):
            encoder_config = AutoConfig.for_model(**encoder_config)
        self.encoder_config = encoder_config if encoder_config is not None else AutoConfig.for_model("bert")
        self.trait_names = list(trait_names)
        self.engagement_weight = engagement_weight
        super().__init__(**kwargs)


@dataclass
class TraitModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    traits: Optional[torch.Tensor] = None  # (B, 10) in [0, 1]
    engagement: Optional[torch.Tensor] = None  # (B,) in [0, 1]
    embeddings: Optional[torch.Tensor] = None  # (B, H) mean-pooled


class PersonaTraitModel(PreTrainedModel):
    config_class = PersonaTraitConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True

    def __init__(self, config: PersonaTraitConfig, encoder: Optional[PreTrainedModel] = None) -> None:
        super().__init__(config)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config.encoder_config)
        hidden = self.encoder.config.hidden_size
        self.trait_head = nn.Linear(hidden, len(config.trait_names))
        self.engagement_head = nn.Linear(hidden, 1)
        self._cache: OrderedDict[str, list[float]] = OrderedDict()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module in (getattr(self, "trait_head", None),
                                                       getattr(self, "engagement_head", None)):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif hasattr(self, "encoder") and module is not self:
            self.encoder._init_weights(module)

    @classmethod
    def from_encoder(cls, path: str) -> PersonaTraitModel:
        """A trait model on pretrained encoder weights (e.g. `personaweave.zoo.minilm_path()`), heads untrained."""
        encoder = AutoModel.from_pretrained(path)
        return cls(PersonaTraitConfig(encoder_config=encoder.config), encoder=encoder)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                engagement_labels: Optional[torch.Tensor] = None, **kwargs: Any) -> TraitModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        pooled = self.pool(input_ids, attention_mask, **extra)
        traits = torch.sigmoid(self.trait_head(pooled))
        engagement = torch.sigmoid(self.engagement_head(pooled)).squeeze(-1)
        loss = None
        if labels is not None:
            known = torch.isfinite(labels)
            if not known.any():
                raise ValueError("A batch of trait labels has no known value.")
            loss = ((traits - labels.nan_to_num()) ** 2)[known].mean()
            if engagement_labels is not None:
                loss = loss + self.config.engagement_weight * ((engagement - engagement_labels) ** 2).mean()
        return TraitModelOutput(loss=loss, traits=traits, engagement=engagement, embeddings=pooled)

    @torch.no_grad()
    def predict_traits(self, texts: Sequence[str], tokenizer: Any, batch_size: int = 32,
                       cache_size: int = 4096) -> list[dict[str, float]]:
        """Trait dicts for `texts`, batched, with an LRU cache for repeated inputs."""
        if isinstance(texts, str):
            raise TypeError("predict_traits takes a list of strings.")
        found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            found.update(zip(chunk, self.eval()(**enc).traits.float().cpu().tolist()))
        # results come from `found`: inserting new texts may evict cached ones of this very call
        for text, row in found.items():
            self._cache[text] = row
            self._cache.move_to_end(text)
        while len(self._cache) > cache_size:
            self._cache.popitem(last=False)
        return [dict(zip(self.config.trait_names, found[text])) for text in texts]


__all__ = ["PersonaTraitConfig", "PersonaTraitModel", "TraitModelOutput"]
