"""Chat messages that select a persona, so users never type reserved tokens by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from personaweave.models.personas import check_name, persona_prompt

DEFAULT_NUM_PERSONA_TOKENS = 4


def chat(
    persona: str,
    user_message: str,
    history: Optional[Sequence[dict[str, str]]] = None,
    *,
    model: Any = None,
    num_persona_tokens: Optional[int] = None,
    description: Optional[str] = None,
    reinsert: bool = True,
    context: Optional[str] = None,
) -> list[dict[str, str]]:
    """Chat-format messages for `persona` answering `user_message` after `history`.

    The system message carries the persona's reserved tokens (and `description`, for the
    prompt-described baseline). With `reinsert`, the tokens are also put in front of the latest
    user turn whenever there is history: a persona stated only at the top of a long chat is
    known to fade after a few turns. `context` (e.g. retrieved memories) is appended to the
    system message.
    """
    check_name(persona)
    if not isinstance(user_message, str) or not user_message.strip():
        raise ValueError("user_message must be a non-empty string.")
    if model is not None:
        num_persona_tokens = model.config.num_persona_tokens
        if persona not in model.config.persona_names:
            raise KeyError(f"Unknown persona {persona!r}; known personas: {model.config.persona_names}.")
    tokens = persona_prompt(persona, num_persona_tokens or DEFAULT_NUM_PERSONA_TOKENS)
    system = tokens if description is None else f"{tokens}{description}"
    if context:  # e.g. long-term memories retrieved for this turn
        system = f"{system}\n{context}"
    messages = [{"role": "system", "content": system}]
    past = [m for m in (history or []) if m.get("role") != "system"]
    messages.extend(past)
    prefix = tokens if (reinsert and past) else ""
    messages.append({"role": "user", "content": prefix + user_message})
    return messages


def prompt_baseline_messages(persona_description: str, user_message: str,
             history: Optional[Sequence[dict[str, str]]] = None) -> list[dict[str, str]]:
    """The prompt-described baseline: the description as a plain system prompt, no tokens."""
    messages = [{"role": "system", "content": f"You are {persona_description}. Stay in character."}]
    messages.extend(m for m in (history or []) if m.get("role") != "system")
    messages.append({"role": "user", "content": user_message})
    return messages
