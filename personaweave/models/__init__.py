"""The models: the self-contained unit saved as remote code.

`configuration_personaweave.py`, `modeling_personaweave.py`, `personas.py` and `modeling_traits.py`
import only torch, transformers and each other (relatively), so `save_pretrained` copies them into a
model folder that loads with `trust_remote_code=True` where personaweave is not installed. Nothing here
knows where weights come from (see `personaweave.zoo` and `personaweave.loading`).

Importing this package registers the classes with transformers' Auto classes (below).
"""


from .configuration_personaweave import PersonaWeaveConfig
from .modeling_personaweave import (
    PersonaEmbedding,
    PersonaWeaveForCausalLM,
    PersonaWeaveForConditionalGeneration,
    PersonaWeavePreTrainedModel,
)
from .modeling_traits import PersonaTraitConfig, PersonaTraitModel, TraitModelOutput
from .personas import TRAITS, Persona, PersonaBank, persona_prompt, persona_token

__all__ = [
    "TRAITS",
    "Persona",
    "PersonaBank",
    "PersonaEmbedding",
    "PersonaTraitConfig",
    "PersonaTraitModel",
    "PersonaWeaveConfig",
    "PersonaWeaveForCausalLM",
    "PersonaWeaveForConditionalGeneration",
    "PersonaWeavePreTrainedModel",
    "TraitModelOutput",
    "persona_prompt",
    "persona_token",
]


def _register_auto_classes() -> None:
    """The one place where the Auto classes are registered: locally (AutoX.register, on import of
    `personaweave.models`) and, for saved folders, in their config's auto_map (register_for_auto_class)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    AutoConfig.register(PersonaWeaveConfig.model_type, PersonaWeaveConfig, exist_ok=True)
    AutoModelForCausalLM.register(PersonaWeaveConfig, PersonaWeaveForCausalLM, exist_ok=True)
    AutoModel.register(PersonaWeaveConfig, PersonaWeaveForCausalLM, exist_ok=True)  # no headless base class
    AutoModelForSeq2SeqLM.register(PersonaWeaveConfig, PersonaWeaveForConditionalGeneration, exist_ok=True)
    AutoConfig.register(PersonaTraitConfig.model_type, PersonaTraitConfig, exist_ok=True)
    AutoModel.register(PersonaTraitConfig, PersonaTraitModel, exist_ok=True)
    PersonaWeaveConfig.register_for_auto_class()
    PersonaWeaveForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    PersonaWeaveForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
    PersonaTraitConfig.register_for_auto_class()
    PersonaTraitModel.register_for_auto_class("AutoModel")


_register_auto_classes()
