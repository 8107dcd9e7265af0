"""A simulated conversation environment for learning trait adjustments from engagement.

Each simulated user has hidden trait preferences (drawn from real Synthetic-Persona-Chat
profiles, mapped to the ten traits by the keyword heuristic below). The bot's state is its own
ten-trait vector; each action nudges one trait by -0.2..+0.2 (clamped to [0, 1]). The user's
satisfaction falls with the distance between the bot's traits and their preferences, and shows
only through noisy engagement signals (sentiment, length, continuation, disengagement,
negative feedback). Reward follows the spec's conversation reward.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import Any, Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from personaweave.evaluation.signals import SIGNAL_NAMES
from personaweave.models.personas import TRAITS

DELTAS = (-0.2, -0.1, 0.0, 0.1, 0.2)
# One action per (trait, delta), trait-major: action = trait * len(DELTAS) + delta index.
NUM_ACTIONS = len(TRAITS) * len(DELTAS)
# The no-op action (trait 0, delta 0.0): the traits stay where they are.
HOLD_ACTION = DELTAS.index(0.0)
MAX_TURNS = 50
# Keyword heuristic: profile words that raise a preferred trait (documented, deliberately simple).
TRAIT_KEYWORDS = {
    "extraversion": ("party", "friends", "dance", "concert", "social", "travel", "outgoing"),
    "agreeableness": ("volunteer", "help", "kind", "family", "love my"),
    "conscientiousness": ("work", "job", "study", "organized", "plan", "nurse", "teacher", "lawyer"),
    "neuroticism": ("anxious", "worry", "stress", "afraid", "nervous"),
    "openness": ("art", "read", "book", "music", "paint", "write", "learn", "museum"),
    "humor": ("funny", "joke", "comedy", "laugh"),
    "empathy": ("animals", "dog", "cat", "care", "listen"),
    "formality": ("business", "suit", "professional", "manager", "finance"),
    "enthusiasm": ("love", "excited", "sports", "run", "gym", "hike", "adventure"),
    "supportiveness": ("mom", "dad", "mother", "father", "kids", "children", "support"),
}


def profile_traits(profile: str) -> np.ndarray:
    """A ten-trait preference vector from a persona profile's words (0.3 base, +0.2 per hit)."""
    text = profile.lower()
    return np.array([min(1.0, 0.3 + 0.2 * sum(k in text for k in TRAIT_KEYWORDS[t])) for t in TRAITS], np.float32)


def load_user_profiles(path: str) -> list[np.ndarray]:
    """Preference vectors of the real Synthetic-Persona-Chat profiles (both speakers).

    `path`: a Synthetic-Persona-Chat CSV (e.g. `Synthetic-Persona-Chat_valid.csv`); the recipe
    takes it from its config (`user_profiles_csv` in recipes/configs/trait_policy.yaml).
    """
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [profile_traits(r[key]) for r in rows for key in ("user 1 personas", "user 2 personas")]


class ConversationEnv(gym.Env):
    """Observation: the last turn's signals (8) + the bot's traits (10). Action: 10 traits x 5 deltas."""

    metadata = {"render_modes": []}

    def __init__(self, users: Sequence[np.ndarray], start_traits: Optional[np.ndarray] = None,
                 noise: float = 0.1, max_turns: int = MAX_TURNS) -> None:
        if not len(users):
            raise ValueError("ConversationEnv needs at least one user profile.")
        self.users = [np.asarray(u, dtype=np.float32) for u in users]
        self.start_traits = None if start_traits is None else np.asarray(start_traits, np.float32)
        self.noise = noise
        self.max_turns = max_turns
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        low = np.array([-1.0] + [0.0] * (len(SIGNAL_NAMES) - 1) + [0.0] * len(TRAITS), np.float32)
        self.observation_space = spaces.Box(low=low, high=np.ones_like(low), dtype=np.float32)

    @staticmethod
    def decode(action: int) -> tuple[int, float]:
        return int(action) // len(DELTAS), DELTAS[int(action) % len(DELTAS)]

    def satisfaction(self) -> float:
        """1 when the bot's traits match the user's preferences, falling with the mean distance."""
        return float(1.0 - 2.5 * np.abs(self.traits - self.user).mean())

    def _signals(self, satisfaction: float) -> tuple[np.ndarray, dict[str, float]]:
        rng = self.np_random
        s = float(np.clip(satisfaction + rng.normal(0, self.noise), -1, 1))
        sig = {
            "sentiment": float(np.clip(s + rng.normal(0, 0.2), -1, 1)),
            "length": float(np.clip(0.3 + 0.4 * s + rng.normal(0, 0.1), 0, 1)),
            "questions": float(rng.random() < 0.2 + 0.3 * max(s, 0)) / 3,
            "emoji": float(rng.random() < 0.1 + 0.2 * max(s, 0)) / 3,
            "latency": float(np.clip(0.5 - 0.3 * s + rng.normal(0, 0.1), 0, 1)),
            "continuation": float(rng.random() < max(0.0, s)),
            "disengagement": float(rng.random() < 0.02 + 0.25 * max(0.0, -s)),
            "negative_feedback": float(rng.random() < 0.3 * max(0.0, -s)),
        }
        return np.array([sig[n] for n in SIGNAL_NAMES], np.float32), sig

    @staticmethod
    def reward(sig: dict[str, float], blocked: bool = False) -> float:
        """The spec's conversation reward: a reply was given, sentiment, length, continuation,
        penalties for negative feedback and for being blocked."""
        appropriate_length = 1.0 - abs(sig["length"] - 0.5) * 2
        value = 0.1 + 0.5 * sig["sentiment"] + 0.2 * appropriate_length + 0.3 * sig["continuation"]
        value -= 0.5 * sig["negative_feedback"]
        return value - (1.0 if blocked else 0.0)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        self.user = self.users[int(self.np_random.integers(len(self.users)))]
        self.traits = (self.start_traits.copy() if self.start_traits is not None
                       else np.full(len(TRAITS), 0.5, np.float32))
        self.turn = 0
        signals, _ = self._signals(self.satisfaction())
        return np.concatenate([signals, self.traits]).astype(np.float32), {}

    def step(self, action: int):
        if not self.action_space.contains(action):
            raise ValueError(f"Invalid action {action!r}; actions are 0..{self.action_space.n - 1}.")
        trait, delta = self.decode(action)
        self.traits[trait] = float(np.clip(self.traits[trait] + delta, 0.0, 1.0))
        self.turn += 1
        satisfaction = self.satisfaction()
        signals, sig = self._signals(satisfaction)
        blocked = sig["negative_feedback"] > 0 and sig["disengagement"] > 0
        reward = self.reward(sig, blocked)
        terminated = bool(sig["disengagement"] > 0)
        truncated = self.turn >= self.max_turns
        info = {"satisfaction": satisfaction, "blocked": blocked, **sig}
        return np.concatenate([signals, self.traits]).astype(np.float32), reward, terminated, truncated, info
