"""Profile personas: Synthetic-Persona-Chat profiles (4-5 sentences each), each with its speaker's turns.

One row per (conversation, speaker): the profile sentences, their joined text, and every turn that
speaker said after the other one (`prompts[i]` -> `responses[i]`), the targets for training a
description -> soft-vector map on many personas. `split_profiles` splits by conversation, so the two
speakers of one conversation never sit on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from typing import Any

SPEAKERS = ("User 1", "User 2")
PROFILE_COLUMNS = {"User 1": "user 1 personas", "User 2": "user 2 personas"}
CONVERSATION_COLUMN = "Best Generated Conversation"


def profile_sentences(text: str) -> list[str]:
    """The non-empty lines of a profile cell."""
    return [s.strip() for s in str(text or "").splitlines() if s.strip()]


def profile_rows(example: dict[str, Any], conversation: int) -> list[dict[str, Any]]:
    """The two profile rows of one Synthetic-Persona-Chat conversation."""
    turns = []
    for line in str(example[CONVERSATION_COLUMN]).splitlines():
        speaker, sep, text = line.partition(":")
        if sep and speaker.strip() in SPEAKERS and text.strip():
            turns.append((speaker.strip(), text.strip()))
    rows = []
    for speaker in SPEAKERS:
        sentences = profile_sentences(example[PROFILE_COLUMNS[speaker]])
        if not sentences:
            raise ValueError(f"Conversation {conversation}: {speaker} has an empty profile "
                             f"(column {PROFILE_COLUMNS[speaker]!r}); every persona needs at least one sentence.")
        pairs = [(prev, text) for (_, prev), (who, text) in zip(turns, turns[1:]) if who == speaker]
        description = " ".join(sentences)
        rows.append({
            "persona": "profile-" + hashlib.sha1(description.encode("utf-8")).hexdigest()[:10],
            "conversation": conversation,
            "speaker": speaker,
            "sentences": sentences,
            "description": description,
            "prompts": [p for p, _ in pairs],
            "responses": [r for _, r in pairs],
        })
    return rows


def load_persona_profiles(source: Any):
    """Synthetic-Persona-Chat as a `Dataset` of profile personas, from its CSV file or loaded rows
    (dicts with the three Synthetic-Persona-Chat columns). An empty profile is an error."""
    from datasets import Dataset

    if isinstance(source, str):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"No Synthetic-Persona-Chat CSV at {source}.")
        with open(source, encoding="utf-8") as handle:
            examples = list(csv.DictReader(handle))
    else:
        examples = list(source)
    missing = [c for c in (*PROFILE_COLUMNS.values(), CONVERSATION_COLUMN) if examples and c not in examples[0]]
    if missing:
        raise ValueError(f"Not Synthetic-Persona-Chat rows: missing columns {missing}.")
    rows = [row for i, example in enumerate(examples) for row in profile_rows(example, i)]
    if not rows:
        raise ValueError("No profiles found.")
    return Dataset.from_list(rows)


def split_profiles(dataset, held_out: float | int = 0.1, seed: int = 0):
    """(train, held_out) by conversation: a fraction or a number of conversations is held out."""
    conversations = sorted(set(dataset["conversation"]))
    n = held_out if isinstance(held_out, int) else round(held_out * len(conversations))
    if not 0 < n < len(conversations):
        raise ValueError(f"Holding out {n} of {len(conversations)} conversations leaves one side empty.")
    test = set(random.Random(seed).sample(conversations, n))
    train = dataset.filter(lambda row: row["conversation"] not in test)
    return train, dataset.filter(lambda row: row["conversation"] in test)


__all__ = ["load_persona_profiles", "profile_rows", "profile_sentences", "split_profiles"]
