"""The models: the self-contained unit saved as remote code.

`configuration_personaweave.py`, `modeling_personaweave.py`, `personas.py` and `modeling_traits.py`
import only torch, transformers and each other (relatively), so `save_pretrained` copies them into a
model folder that loads with `trust_remote_code=True` where personaweave is not installed. Nothing here
knows where weights come from (see `personaweave.zoo` and `personaweave.loading`).
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
