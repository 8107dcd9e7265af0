"""Dataset loaders, preference pairs, the shipped dataset and latent persona discovery."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, load_dataset

from personaweave.data import (
    load_personachat,
    load_synthetic_persona_chat,
    persona_preference_pairs,
    shipped_dataset_dir,
)
from personaweave.data.discovery import cluster_dialogues, discover_personas

FIXTURES = Path(__file__).parent / "fixtures"
COLUMNS = {"persona", "description", "traits", "messages", "prompt", "response", "source"}


def toy_dialogues() -> Dataset:
    rows = []
    for prompt in ("hi", "how are you", "what now"):
        for persona in ("robot", "pirate", "butler"):
            rows.append({"persona": persona, "description": f"a {persona}", "traits": [0.5] * 10,
                         "messages": [], "prompt": prompt, "response": f"{persona} says {prompt}", "source": "toy"})
    return Dataset.from_list(rows)


def test_preference_pairs_never_pair_a_persona_with_itself():
    pairs = persona_preference_pairs(toy_dialogues(), seed=1)
    assert len(pairs) == 9
    for row in pairs:
        assert row["persona"] != row["rejected_persona"]
        assert row["chosen"][0]["content"].startswith(row["persona"])
        assert row["rejected"][0]["content"].startswith(row["rejected_persona"])
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"


def test_synthetic_persona_chat_loader_on_the_original_csv_format():
    data = load_synthetic_persona_chat(str(FIXTURES / "synthetic_persona_chat_sample.csv"))
    assert COLUMNS <= set(data.column_names)
    assert len(data) == 24 + 21  # (turns - 1) reply pairs per conversation
    first = data[0]
    assert first["prompt"] == "Hi!" and first["response"] == "Hello!"
    assert "transplant" in first["description"]  # User 2's profile answers User 1
    assert first["messages"][-1] == {"role": "assistant", "content": "Hello!"}
    assert len(first["traits"]) == 10 and all(math.isnan(t) for t in first["traits"])


def test_personachat_loader_on_parlai_text_and_hub_format():
    parlai = load_personachat(str(FIXTURES / "personachat_parlai_sample.txt"))
    assert len(parlai) == 3 and COLUMNS <= set(parlai.column_names)
    assert parlai[0]["response"] == "i am great , just back from a hike ."
    assert parlai[0]["persona"] == parlai[1]["persona"] != parlai[2]["persona"]
    assert parlai[2]["description"] == "i am a chef."
    hub = load_personachat(load_dataset("json", data_files=str(FIXTURES / "personachat_hf_sample.jsonl"))["train"])
    assert [r["response"] for r in hub] == [r["response"] for r in parlai][:2]
    assert hub[1]["prompt"] == "nice ! do you have pets ?"
    assert hub[0]["persona"] == parlai[0]["persona"]


def test_discovery_recovers_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    truth = np.repeat(np.arange(4), 25)
    emb = centers[truth] + rng.normal(size=(100, 16))
    units = [f"word{t} filler text" for t in truth]
    found = cluster_dialogues(units, embeddings=emb, traits=[[t / 4] * 10 for t in truth])
    assert found.k == 4
    assert adjusted_rand_score(truth, found.labels) > 0.95
    assert len({p.name for p in found.personas}) == 4
    for p in found.personas:
        assert p.vector.shape == (16,) and p.traits is not None and len(p.examples) == 3
    shuffled = rng.permutation(truth)
    assert abs(adjusted_rand_score(shuffled, found.labels)) < 0.1


def test_discovery_bad_input():
    with pytest.raises(ValueError, match="empty"):
        discover_personas([])
    with pytest.raises(ValueError, match="between 1 and"):
        discover_personas(["a", "b"], k=5, embeddings=np.eye(2))


SHIPPED = os.path.isfile(os.path.join(shipped_dataset_dir(), "train.parquet"))


@pytest.mark.skipif(not SHIPPED, reason="the shipped dataset is not built yet")
def test_shipped_dataset_schema_size_and_no_split_leakage():
    from personaweave.data import load_persona_dialogues

    data = load_persona_dialogues()
    assert set(data) == {"train", "validation", "test"}
    prompts = {s: set(data[s]["prompt"]) for s in data}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for split in data.values():
        assert COLUMNS <= set(split.column_names)
    train = data["train"].to_pandas()
    per_persona = train.groupby("persona")["prompt"].nunique()
    assert len(per_persona) == 8 and per_persona.min() >= 300, per_persona.to_dict()
    assert len(prompts["validation"]) >= 50 and len(prompts["test"]) >= 50
    row = data["test"][0]
    assert row["messages"][-1]["content"] == row["response"] and len(row["traits"]) == 10


def test_a_split_with_no_rows_loads_as_an_empty_dataset(tmp_path):
    """A small build (e.g. the style personas' data, no validation turns yet) writes row-less parquet
    files; datasets' parquet builder fails on those, the loader must not."""
    import pandas as pd

    from personaweave.data import load_persona_dialogues

    pd.DataFrame([{"persona": "pirate", "prompt": "hi", "response": "Arr, ahoy!"}]).to_parquet(tmp_path / "train.parquet")
    for split in ("validation", "test"):
        pd.DataFrame([]).to_parquet(tmp_path / f"{split}.parquet")
    data = load_persona_dialogues(data_dir=str(tmp_path))
    assert list(data) == ["train", "validation", "test"]
    assert len(data["train"]) == 1 and len(data["validation"]) == 0
    assert len(load_persona_dialogues("test", data_dir=str(tmp_path))) == 0
