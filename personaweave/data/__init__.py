"""Persona dialogue data: the shipped dataset, preference pairs, and loaders for public datasets.

Every loader returns rows in one schema: `persona`, `description`, `traits` (ten floats, NaN
where unknown), `messages` (system description, user turn, assistant reply), `prompt`,
`response`, `source`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections.abc import Iterable
from importlib import resources
from typing import Any, Optional

from personaweave.models.personas import TRAITS

SPLITS = ("train", "validation", "test")
UNKNOWN_TRAITS = [float("nan")] * len(TRAITS)


def shipped_dataset_dir(name: str = "persona_dialogues") -> str:
    """A dataset folder shipped in the package: `persona_dialogues` (v1), `persona_dialogues_v2` (best-of-N)."""
    return str(resources.files("personaweave.data").joinpath(name))


def _load_parquet_splits(files: dict[str, str]):
    """{split: parquet file} -> `DatasetDict`. datasets' parquet builder fails on a file with no rows (a
    split a small build has no turns for, e.g. the style personas' validation): those are read directly."""
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict, load_dataset

    empty = {s for s, f in files.items() if pq.read_metadata(f).num_rows == 0}
    data = dict(load_dataset("parquet", data_files={s: f for s, f in files.items() if s not in empty})
                if len(empty) < len(files) else {})
    for s in empty:
        data[s] = Dataset(pq.read_table(files[s]))
    return DatasetDict({s: data[s] for s in files})


def load_persona_dialogues(split: Optional[str] = None, data_dir: Optional[str] = None):
    """The persona dialogue dataset shipped with the package (offline): a `DatasetDict`, or one split."""
    data_dir = data_dir or shipped_dataset_dir()
    files = {s: os.path.join(data_dir, f"{s}.parquet") for s in SPLITS}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"Missing dataset files {missing}: build them with "
                                "datasets_scripts/build_persona_dialogues.py")
    if split is not None and split not in files:
        raise ValueError(f"Unknown split {split!r}; splits are {list(SPLITS)}.")
    data = _load_parquet_splits(files)
    return data[split] if split else data


def load_persona_preferences(split: Optional[str] = None, data_dir: Optional[str] = None):
    """The best-of-N preference pairs of the v2 dataset (`preferences_<split>.parquet`: persona,
    prompt, chosen, rejected and their selection scores): a `DatasetDict`, or one split."""
    if data_dir is None:
        raise ValueError("Pass data_dir: the folder written by datasets_scripts/build_persona_dialogues_v2.py.")
    files = {s: os.path.join(data_dir, f"preferences_{s}.parquet") for s in SPLITS}
    files = {s: f for s, f in files.items() if os.path.isfile(f) and os.path.getsize(f) > 0}
    if split is not None and split not in files:
        raise FileNotFoundError(f"No preference pairs for split {split!r} in {data_dir}.")
    data = _load_parquet_splits(files)
    return data[split] if split else data


def persona_preference_pairs(dataset, seed: int = 0, description_in_prompt: bool = True):
    """Preference pairs for reward modelling, in TRL's conversational preference format.

    For each (persona, prompt) row: `chosen` = that persona's reply, `rejected` = a different
    persona's reply to the same prompt. Prompts answered by one persona only are skipped.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in dataset:
        by_prompt.setdefault(row["prompt"], []).append(row)
    pairs = []
    for prompt, rows in by_prompt.items():
        for row in rows:
            others = [r for r in rows if r["persona"] != row["persona"]]
            if not others:
                continue
            other = rng.choice(others)
            system = f"You are {row['description']}." if description_in_prompt else ""
            pairs.append({
                "persona": row["persona"],
                "rejected_persona": other["persona"],
                "prompt": ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": row["response"]}],
                "rejected": [{"role": "assistant", "content": other["response"]}],
            })
    return Dataset.from_list(pairs)


# --- public datasets ---------------------------------------------------------------------------


def _profile_persona(profile: Iterable[str]) -> tuple[str, str]:
    sentences = [s.strip() for s in profile if s and s.strip()]
    description = " ".join(sentences)
    digest = hashlib.sha1(description.encode("utf-8")).hexdigest()[:10]
    return f"profile-{digest}", description


def _row(profile: Iterable[str], prompt: str, response: str, source: str) -> dict[str, Any]:
    name, description = _profile_persona(profile)
    return {
        "persona": name,
        "description": description,
        "traits": list(UNKNOWN_TRAITS),
        "messages": [{"role": "system", "content": description}, {"role": "user", "content": prompt.strip()},
                     {"role": "assistant", "content": response.strip()}],
        "prompt": prompt.strip(),
        "response": response.strip(),
        "source": source,
    }


def parse_parlai_personachat(path: str) -> list[dict[str, Any]]:
    """PersonaChat / ConvAI2 in ParlAI's text format ("N your persona: ..." then "N partner\\treply")."""
    rows, profile = [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            number, _, body = line.partition(" ")
            if number == "1":
                profile = []
            if body.startswith("your persona:"):
                profile.append(body[len("your persona:"):].strip())
            elif "\t" in body:
                partner, reply = body.split("\t")[:2]
                rows.append(_row(profile, partner, reply, "personachat"))
    return rows


def map_personachat_hf(example: dict[str, Any]) -> dict[str, Any]:
    """One row of a Hub PersonaChat dataset (`personality`, `history`, `candidates`; the gold reply
    is the last candidate, as in bavard/personachat_truecased)."""
    history = example["history"]
    return _row(example["personality"], history[-1] if history else "", example["candidates"][-1], "personachat")


def load_personachat(source: Any):
    """PersonaChat-style data as a `Dataset` in our schema, from a ParlAI .txt file, a loaded
    `datasets.Dataset` with personality/history/candidates columns, or a Hub id (online)."""
    from datasets import Dataset, load_dataset

    if isinstance(source, str) and os.path.isfile(source):
        return Dataset.from_list(parse_parlai_personachat(source))
    dataset = load_dataset(source, split="validation") if isinstance(source, str) else source
    return dataset.map(map_personachat_hf, remove_columns=dataset.column_names)


def map_synthetic_persona_chat(example: dict[str, Any]) -> list[dict[str, Any]]:
    """All (turn, reply) pairs of one Synthetic-Persona-Chat conversation, each reply under its
    speaker's profile."""
    profiles = {"User 1": example["user 1 personas"].splitlines(), "User 2": example["user 2 personas"].splitlines()}
    turns = []
    for line in example["Best Generated Conversation"].splitlines():
        speaker, sep, text = line.partition(":")
        if sep and speaker.strip() in profiles and text.strip():
            turns.append((speaker.strip(), text.strip()))
    return [_row(profiles[speaker], prev_text, text, "synthetic_persona_chat")
            for (_, prev_text), (speaker, text) in zip(turns, turns[1:])]


def load_synthetic_persona_chat(source: Any = "google/Synthetic-Persona-Chat", split: str = "validation"):
    """Synthetic-Persona-Chat in our schema, from its CSV file, a loaded `Dataset`, or the Hub id."""
    from datasets import Dataset, load_dataset

    if isinstance(source, str) and os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            examples = list(csv.DictReader(handle))
    else:
        examples = load_dataset(source, split=split) if isinstance(source, str) else source
    return Dataset.from_list([row for example in examples for row in map_synthetic_persona_chat(example)])


__all__ = [
    "load_persona_dialogues",
    "persona_preference_pairs",
    "load_personachat",
    "load_synthetic_persona_chat",
    "parse_parlai_personachat",
    "shipped_dataset_dir",
]
