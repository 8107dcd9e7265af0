"""Configuration of PersonaWeave models.

Kept free of any import outside transformers and this folder: `save_pretrained` copies this
file next to the weights, so a saved model loads with `trust_remote_code=True` on a machine
without personaweave installed.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


class PersonaWeaveConfig(PretrainedConfig):
    r"""Configuration of a persona-conditioned language model.

    Args:
        text_config (`PretrainedConfig` or `dict`, *optional*):
            The wrapped language model's configuration (any causal LM, or a T5/BART-style
            encoder-decoder). Defaults to a Llama config.
        persona_dim (`int`, *optional*, defaults to 384):
            Size of a persona vector (the sentence encoder's embedding size; 384 for MiniLM).
        num_persona_tokens (`int`, *optional*, defaults to 4):
            Soft vectors per persona, i.e. reserved tokens per persona in the tokenizer.
        persona_hidden_size (`int`, *optional*, defaults to 512):
            Width of the persona MLP's hidden layer.
        personas (`list[dict]`, *optional*):
            The persona bank's entries, in order: `name`, `token_ids` (one per soft vector)
            and metadata (`description`, `traits`, `examples`, `blend`). The vectors themselves
            are model weights (`persona_vectors`).
        few_shot_init (`list[float]`, *optional*):
            Starting vector when `add_persona(name, examples=[...])` fits a persona from example lines
            (meta-learned by `personaweave.training.meta_learning.meta_learn_persona_init`). Default: the
            mean of the bank's vectors. Not used when `few_shot_temperature` is set.
        few_shot_temperature (`float`, *optional*):
            When set, a few-shot fit starts from the lines themselves: the described personas' vectors
            weighted by softmax(cosine(mean sentence embedding of the lines, vector) / temperature),
            plus `few_shot_offset` (both meta-learned together). Default: no retrieval.
        few_shot_offset (`list[float]`, *optional*):
            Added to that retrieved start. Default: none.
        few_shot_steps (`int`, *optional*, defaults to 5):
            Gradient steps (Adam on the persona vector alone) of that fit.
        few_shot_lr (`float`, *optional*, defaults to 0.08):
            Learning rate of that fit.
    """

    model_type = "personaweave"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: Optional[PretrainedConfig | dict[str, Any]] = None,
        persona_dim: int = 384,
        num_persona_tokens: int = 4,
        persona_hidden_size: int = 512,
        personas: Optional[list[dict[str, Any]]] = None,
        few_shot_init: Optional[list[float]] = None,
        few_shot_temperature: Optional[float] = None,
        few_shot_offset: Optional[list[float]] = None,
        few_shot_steps: int = 5,
        few_shot_lr: float = 0.08,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            model_type = text_config.get("model_type", "llama")
            text_config = CONFIG_MAPPING[model_type](**text_config)
        elif text_config is None:
            text_config = CONFIG_MAPPING["llama"]()
        self.text_config = text_config
        self.persona_dim = persona_dim
        self.num_persona_tokens = num_persona_tokens
        self.persona_hidden_size = persona_hidden_size
        self.personas = [dict(p) for p in (personas or [])]
        self.few_shot_init = None if few_shot_init is None else [float(x) for x in few_shot_init]
        if few_shot_temperature is not None and not (math.isfinite(few_shot_temperature) and few_shot_temperature > 0):
            raise ValueError(f"few_shot_temperature must be a finite number > 0, got {few_shot_temperature!r}.")
        self.few_shot_temperature = None if few_shot_temperature is None else float(few_shot_temperature)
        self.few_shot_offset = None if few_shot_offset is None else [float(x) for x in few_shot_offset]
        self.few_shot_steps = few_shot_steps
        self.few_shot_lr = few_shot_lr
        # Generation and weight tying read these from the top-level config.
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        kwargs.setdefault("is_encoder_decoder", getattr(text_config, "is_encoder_decoder", False))
        # generate() and its helpers look for `use_cache` on the top-level config.
        kwargs.setdefault("use_cache", getattr(text_config, "use_cache", True))
        # PretrainedConfig.__init__ pushes its attn_implementation down to text_config: keep the
        # wrapped model's choice unless one is asked for.
        kwargs.setdefault("attn_implementation", getattr(text_config, "_attn_implementation_internal", None))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            kwargs.setdefault(key, getattr(text_config, key, None))
        super().__init__(**kwargs)

    @property
    def persona_names(self) -> list[str]:
        return [p["name"] for p in self.personas]

    @property
    def persona_token_ids(self) -> list[list[int]]:
        return [list(p["token_ids"]) for p in self.personas]


__all__ = ["PersonaWeaveConfig"]
