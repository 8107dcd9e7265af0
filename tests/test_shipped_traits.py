"""The shipped trait model (heads in personaweave/data/traits/, MiniLM from its package) works after install."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from personaweave.models.personas import TRAITS
from personaweave.traits.pretrained import (
    HEADS_FILE,
    has_shipped_trait_heads,
    load_trait_model,
    predict_traits,
    save_trait_heads,
    shipped_trait_heads_dir,
)


def test_only_the_heads_ship():
    assert has_shipped_trait_heads()
    from safetensors.torch import load_file

    heads = load_file(os.path.join(shipped_trait_heads_dir(), HEADS_FILE))
    assert set(heads) == {"trait_head.weight", "trait_head.bias", "engagement_head.weight", "engagement_head.bias"}
    assert heads["trait_head.weight"].shape == (len(TRAITS), 384)  # MiniLM's hidden size
    assert os.path.getsize(os.path.join(shipped_trait_heads_dir(), HEADS_FILE)) < 100_000


def test_shipped_trait_model_beats_the_constant_baseline_on_held_out_replies():
    """Held-out test replies of the persona dialogues (unseen user turns): lower MAE than always
    answering the training traits' mean (measured 0.199 vs 0.221), and traits that rank the replies
    (mean Pearson 0.40 measured, > 0.2 required)."""
    from personaweave.data import load_persona_dialogues

    data = load_persona_dialogues()
    test = data["test"]  # all 469 replies: a subset is too noisy for a 0.01 margin
    truth = np.asarray(test["traits"], dtype=float)
    predicted = predict_traits(list(test["response"]))
    assert len(predicted) == len(truth) and set(predicted[0]) == set(TRAITS)
    pred = np.array([[row[t] for t in TRAITS] for row in predicted])
    assert ((pred >= 0) & (pred <= 1)).all()
    constant = np.asarray(data["train"]["traits"], dtype=float).mean(0)
    mae, baseline = np.abs(pred - truth).mean(), np.abs(constant - truth).mean()
    assert mae < baseline - 0.01, (mae, baseline)
    pearson = [np.corrcoef(pred[:, i], truth[:, i])[0, 1] for i in range(len(TRAITS))]
    assert np.nanmean(pearson) > 0.2, pearson


def test_heads_round_trip_and_a_wrong_folder_is_a_clear_error(tmp_path):
    model, _ = load_trait_model()
    save_trait_heads(model, str(tmp_path / "heads"))
    again, _ = load_trait_model(str(tmp_path / "heads"))
    import torch

    torch.testing.assert_close(again.trait_head.weight, model.trait_head.weight)
    with pytest.raises(FileNotFoundError, match="trait heads"):
        load_trait_model(str(tmp_path / "missing"))


@pytest.mark.slow
def test_traits_command_prints_ten_traits_per_text(capsys):
    from personaweave.cli import main

    assert main(["traits", "Arr, the sea be calling me, matey!", "I would be delighted to assist, sir."]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["Arr, the sea be calling me, matey!", "I would be delighted to assist, sir."]
    assert all(len(r) == 11 and all(0.0 <= r[k] <= 1.0 for k in r if k != "text") for r in rows)
    assert rows[1]["formality"] > rows[0]["formality"]  # the butler line reads as more formal than the pirate's
