"""personaweave: persona-conditioned dialogue models for the Hugging Face ecosystem.

Importing the package registers the PersonaWeave classes with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from personaweave.chat import chat, prompt_baseline_messages
from personaweave.encoders import default_encoder
from personaweave.loading import from_base, load_model
from personaweave.models import (
    TRAITS,
    Persona,
    PersonaBank,
    PersonaEmbedding,
    PersonaTraitConfig,
    PersonaTraitModel,
    PersonaWeaveConfig,
    PersonaWeaveForCausalLM,
    PersonaWeaveForConditionalGeneration,
    PersonaWeavePreTrainedModel,
    persona_prompt,
    persona_token,
)
from personaweave.models import modeling_personaweave as _modeling

__version__ = "0.1.0"

# The one place where the Auto classes are registered: locally (AutoX.register) and, for
# saved folders, in their config's auto_map (register_for_auto_class).
AutoConfig.register(PersonaWeaveConfig.model_type, PersonaWeaveConfig, exist_ok=True)
AutoModelForCausalLM.register(PersonaWeaveConfig, PersonaWeaveForCausalLM, exist_ok=True)
AutoModelForSeq2SeqLM.register(PersonaWeaveConfig, PersonaWeaveForConditionalGeneration, exist_ok=True)
AutoConfig.register(PersonaTraitConfig.model_type, PersonaTraitConfig, exist_ok=True)
AutoModel.register(PersonaTraitConfig, PersonaTraitModel, exist_ok=True)
PersonaWeaveConfig.register_for_auto_class()
PersonaWeaveForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PersonaWeaveForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
PersonaTraitConfig.register_for_auto_class()
PersonaTraitModel.register_for_auto_class("AutoModel")
# Descriptions are encoded by the shipped MiniLM unless a call passes its own encoder.
_modeling.DEFAULT_ENCODER_FACTORY = default_encoder


def add_persona_tokens(tokenizer, model) -> list[str]:
    """Add every reserved token of `model`'s bank to `tokenizer` (e.g. a freshly loaded base
    tokenizer) and check that the ids agree with the model's; returns the tokens."""
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
