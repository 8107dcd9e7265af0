"""`TraitAdaptationEngine` (the conversation-level adaptation engine): per-user trait state -> a persona blend in the model, one call per turn."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from personaweave.evaluation.signals import extract_signals
from personaweave.models.personas import TRAITS
from personaweave.serving.adaptation.env import HOLD_ACTION, ConversationEnv
from personaweave.traits.incontext import traits_to_blend

Policy = Callable[[np.ndarray], int]


def hold_policy(observation: np.ndarray) -> int:
    """The no-op policy (a trait + 0.0): the persona stays where it is."""
    return HOLD_ACTION


class TraitAdaptationEngine:
    """Keeps each user's trait state, smoothed across turns, and the matching blend in the model.

    `policy(observation) -> action` picks one of the environment's `NUM_ACTIONS` trait adjustments from the
    turn's signals and the current traits (an SB3 policy's `predict`, or `hold_policy`).
    """

    def __init__(self, model: Any, tokenizer: Any, policy: Optional[Policy] = None, smoothing: float = 0.5,
                 start_traits: Optional[np.ndarray] = None) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError("smoothing must be in (0, 1].")
        bank = model.personas
        self.parents = [p for p in bank if p.traits and len(p.traits) == len(TRAITS) and not p.blend]
        if not self.parents:
            raise ValueError("The model's bank has no persona with all ten traits to blend from.")
        self.model, self.tokenizer = model, tokenizer
        self.policy = policy or hold_policy
        self.smoothing = smoothing
        self.start = np.full(len(TRAITS), 0.5, np.float32) if start_traits is None else np.asarray(start_traits)
        self.states: dict[str, np.ndarray] = {}
        self.pending_feedback: dict[str, bool] = {}

    def restore(self, user_id: str, traits: Any) -> None:
        """Resume a user's trait state (e.g. from the service's database after a restart)."""
        values = np.asarray(traits, dtype=np.float32)
        if values.shape != (len(TRAITS),) or not np.isfinite(values).all():
            raise ValueError(f"A trait state is {len(TRAITS)} finite values, got shape {values.shape}.")
        self.states[user_id] = np.clip(values, 0.0, 1.0)

    def forget(self, user_id: str) -> None:
        """Drop a user's trait state, pending feedback and blend persona."""
        self.states.pop(user_id, None)
        self.pending_feedback.pop(user_id, None)
        name = self.persona_name(user_id)
        if name in self.model.config.persona_names:
            self.model.remove_persona(name)

    def feedback(self, user_id: str, negative: bool) -> None:
        """Explicit feedback (thumbs down, blocking) reaches the policy as the next turn's
        negative-feedback signal."""
        self.pending_feedback[user_id] = self.pending_feedback.get(user_id, False) or bool(negative)

    @staticmethod
    def persona_name(user_id: str) -> str:
        return "user-" + re.sub(r"[^A-Za-z0-9_.\-]", "_", str(user_id))[:50]

    def step(self, user_id: str, user_message: str, latency_s: Optional[float] = None) -> str:
        """Update the user's traits from this turn and return the persona to answer with."""
        blend = self.update(user_id, user_message, latency_s)
        name = self.persona_name(user_id)
        if name in self.model.config.persona_names:
            self.model.remove_persona(name)
        self.model.add_persona(name, blend=blend, tokenizer=self.tokenizer)
        return name

    def update(self, user_id: str, user_message: str, latency_s: Optional[float] = None) -> dict[str, float]:
        """Update the user's traits from this turn and return the blend to answer with (the caller
        puts it in the bank: `step` as `user-<id>`, the service in its bounded persona pool)."""
        state = self.states.get(user_id, self.start.copy())
        signals = extract_signals(user_message, latency_s)
        if self.pending_feedback.pop(user_id, False):
            signals.negative_feedback = 1.0
        observation = np.concatenate([signals.vector(), state]).astype(np.float32)
        trait, delta = ConversationEnv.decode(int(self.policy(observation)))
        target = state.copy()
        target[trait] = np.clip(target[trait] + delta, 0.0, 1.0)
        state = ((1 - self.smoothing) * state + self.smoothing * target).astype(np.float32)  # gradual shifts
        self.states[user_id] = state
        return traits_to_blend(dict(zip(TRAITS, state.tolist())), self.parents)
