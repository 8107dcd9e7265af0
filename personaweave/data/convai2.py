"""ConvAI2 / PersonaChat in ParlAI's text format, kept as dialogues (profile + history + gold reply).

`parse_parlai_personachat` (in `personaweave.data`) flattens the same files into single-turn rows of the
training schema; the benchmark needs more: every partner turn and reply before the gold one, so the
model can be scored the way ConvAI2 scored its entries (the reply given the profile and the history).

Format ("self_original_no_cands"): each episode starts at line number 1; "N your persona: <sentence>"
lines give the profile of the speaker whose replies are the targets; then "N <partner>\\t<reply>".
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Optional

VALID_FILE = "valid_self_original_no_cands.txt"


@dataclass
class ConvAI2Example:
    """One gold reply of a ConvAI2 dialogue, with everything the speaker had seen before it."""

    dialogue: int  # episode index in the file
    turn: int  # index of this reply within its dialogue (0 = first)
    profile: list[str]  # the replying speaker's persona sentences
    history: list[str] = field(default_factory=list)  # earlier turns: partner, reply, partner, reply, ...
    partner: str = ""  # the partner's utterance this reply answers
    reply: str = ""  # the human gold reply

    @property
    def profile_text(self) -> str:
        return " ".join(self.profile)


def resolve_convai2_path(path: str) -> str:
    """A ParlAI ConvAI2 file, or a folder holding `valid_self_original_no_cands.txt`."""
    if os.path.isdir(path):
        path = os.path.join(path, VALID_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ConvAI2 file at {path}: give the ParlAI text file (e.g. {VALID_FILE}) "
                                "or the folder that holds it.")
    return path


def load_convai2(path: str) -> list[ConvAI2Example]:
    """Every (partner turn, gold reply) of a ParlAI ConvAI2 file, with the profile and the history.

    Episodes without a profile or without turns are errors: a benchmark must not silently score
    replies with no persona behind them.
    """
    path = resolve_convai2_path(path)
    examples: list[ConvAI2Example] = []
    profile: list[str] = []
    history: list[str] = []
    dialogue, turn = -1, 0
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            number, _, body = line.partition(" ")
            if not number.isdigit():
                raise ValueError(f"{path}:{lineno}: a ParlAI line starts with its number, got {line[:40]!r}.")
            if number == "1":
                dialogue, turn, profile, history = dialogue + 1, 0, [], []
            if body.startswith("your persona:"):
                profile.append(body[len("your persona:"):].strip())
            elif body.startswith("partner's persona:"):
                continue  # the "both" variants also list the partner's profile: not the speaker's
            elif "\t" in body:
                partner, reply = body.split("\t")[:2]
                if not profile:
                    raise ValueError(f"{path}:{lineno}: a dialogue turn before any 'your persona:' line.")
                examples.append(ConvAI2Example(dialogue, turn, list(profile), list(history),
                                               partner.strip(), reply.strip()))
                history += [partner.strip(), reply.strip()]
                turn += 1
    if not examples:
        raise ValueError(f"{path} holds no ConvAI2 turns (lines 'N partner<TAB>reply').")
    return examples


def sample_examples(examples: list[ConvAI2Example], limit: Optional[int], seed: int = 0) -> list[ConvAI2Example]:
    """`limit` examples drawn uniformly (seeded), so a subset spreads over dialogues and turn depths;
    returned in file order. None or a limit >= the total keeps them all."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


__all__ = ["ConvAI2Example", "load_convai2", "resolve_convai2_path", "sample_examples"]
