"""Engagement signals of one user turn: the state features of the adaptation engine."""

from __future__ import annotations

import re
from dataclasses import astuple, dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

CONTINUE = re.compile(r"\b(tell me more|go on|and then|really|interesting|what else|why|how come|cool|haha|lol)\b", re.I)
DISENGAGE = re.compile(r"^\s*(k|ok\.?|fine|whatever|bye|goodbye|stop|nevermind|never mind|boring)\s*[.!]*\s*$", re.I)
NEGATIVE = re.compile(r"\b(wrong|annoying|stupid|useless|shut up|rude|hate (this|you)|not helpful|makes no sense)\b",
                      re.I)
EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
SIGNAL_NAMES = ("sentiment", "length", "questions", "emoji", "latency", "continuation", "disengagement",
                "negative_feedback")


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound score in [-1, 1]."""
    return float(_vader().polarity_scores(text)["compound"])


@dataclass
class TurnSignals:
    sentiment: float  # VADER compound, [-1, 1]
    length: float  # words / 50, capped at 1
    questions: float  # question marks, capped at 3, / 3
    emoji: float  # emoji, capped at 3, / 3
    latency: float  # response latency / 60 s, capped at 1 (0.5 when unknown)
    continuation: float  # 1 if the turn asks for more
    disengagement: float  # 1 if the turn is a curt sign-off
    negative_feedback: float  # 1 if the turn complains about the bot

    def vector(self) -> np.ndarray:
        return np.asarray(astuple(self), dtype=np.float32)


def extract_signals(message: str, latency_s: Optional[float] = None) -> TurnSignals:
    """Signals of a user message (and of how long the user took to send it, when known)."""
    if not isinstance(message, str):
        raise TypeError("message must be a string.")
    return TurnSignals(
        sentiment=sentiment(message) if message.strip() else 0.0,
        length=min(len(message.split()) / 50.0, 1.0),
        questions=min(message.count("?"), 3) / 3.0,
        emoji=min(len(EMOJI.findall(message)), 3) / 3.0,
        latency=0.5 if latency_s is None else float(np.clip(latency_s / 60.0, 0.0, 1.0)),
        continuation=float(bool(CONTINUE.search(message))),
        disengagement=float(bool(DISENGAGE.match(message)) or not message.strip()),
        negative_feedback=float(bool(NEGATIVE.search(message))),
    )
