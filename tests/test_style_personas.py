"""Composed style personas (issue 15): 64 for training, 8 combinations kept unseen, and their own
evaluation anchors, held apart from the selection judge's example lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personaweave.evaluation.judges import EvaluationJudge, load_style_eval_anchors
from personaweave.testing import BagOfWordsEncoder
from personaweave.zoo import load_persona_set, load_style_personas

ROOT = Path(__file__).resolve().parents[1]


def test_sixty_four_training_personas_and_eight_unseen_combinations():
    train, unseen = load_style_personas("train"), load_style_personas("unseen")
    assert len(train) == 64 and len(unseen) == 8
    names = [p.name for p in train + unseen]
    descriptions = [p.description for p in train + unseen]
    assert len(set(names)) == 72 and len(set(descriptions)) == 72
    assert {p.name for p in load_style_personas("all")} == set(names)
    # unseen as combinations, not as parts: every role, temperament and habit of them is trained on
    seen_parts = [set(p.name.split("-")[i] for p in train) for i in range(3)]
    for p in unseen:
        assert all(part in seen for part, seen in zip(p.name.split("-"), seen_parts)), p.name
    for p in train + unseen:
        assert all(0.0 <= v <= 1.0 for v in p.traits.values()) and len(p.traits) == 10
        assert len(p.examples) >= 5
    assert [p.name for p in load_persona_set("style")] == names[:64]


def test_unknown_persona_set_and_selector_are_refused():
    with pytest.raises(ValueError, match="Unknown persona set"):
        load_persona_set("everyone")
    with pytest.raises(ValueError, match="which must be"):
        load_style_personas("some")


def test_style_anchors_are_held_out_from_example_lines_and_data():
    personas = load_style_personas("all")
    anchors = load_style_eval_anchors([p.name for p in personas])
    lines = {line.lower() for group in anchors.values() for line in group}
    examples = {e.lower() for p in personas for e in p.examples}
    assert lines and not lines & examples
    import pandas as pd

    for path in (ROOT / "personaweave" / "data").rglob("*.parquet"):
        frame = pd.read_parquet(path)
        for column in ("response", "chosen", "rejected"):
            if column in frame:
                assert not {t.lower() for t in frame[column]} & lines, f"a style anchor is in {path}"


def test_evaluation_judge_over_unseen_style_personas():
    unseen = load_style_personas("unseen")
    judge = EvaluationJudge.from_style_personas(unseen, encoder=BagOfWordsEncoder())
    assert judge.names == [p.name for p in unseen]
    spec = json.loads((ROOT / "personaweave" / "data" / "eval_anchors_style.json").read_text())
    # a role's own anchor line is identified as the unseen persona with that role
    replies = [spec["roles"][p.name.split("-")[0]][0] for p in unseen]
    verdicts = judge.judge(["hello"] * len(unseen), replies, [p.name for p in unseen])
    assert verdicts.summary()["persona_accuracy"] >= 0.75
    with pytest.raises(KeyError, match="not a composed style persona"):
        load_style_eval_anchors(["pirate"])


@pytest.mark.slow
def test_unseen_personas_recipe_on_the_shipped_layer(tmp_path):
    """recipes/unseen_personas.py end to end on two held-out turns: a prompt-baseline row and a
    persona-token row judged over the 8 unseen personas, with the soft vectors' spread."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("unseen_personas", ROOT / "recipes" / "unseen_personas.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["unseen_personas"] = recipe
    spec.loader.exec_module(recipe)
    (args,) = recipe.make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "configs" / "unseen_personas.yaml"),
         "--models", "shipped", "--max_turns", "2", "--few_shot_seeds", "0",
         "--max_new_tokens", "12", "--output", str(tmp_path / "report.json")])
    report = recipe.main(args)
    assert report["chance"] == 0.125 and report["turns"] == 2
    rows = report["rows"]
    assert set(rows) == {"prompt_baseline", f"persona_token:{args.models[0]}", "few_shot_prompt:seed0",
                         "few_shot_plain:shipped:seed0"}
    assert rows["few_shot_plain:shipped:seed0"]["few_shot"]["fit_seconds_per_persona"] > 0
    token = rows[f"persona_token:{args.models[0]}"]
    assert token["evaluation_judge"]["n"] == 16 and token["trained_personas"] == 8
    assert token["soft_vector_spread"]["unseen"] > 0  # eight descriptions, eight different points
    assert json.loads((tmp_path / "report.json").read_text())["personas"] == report["personas"]


def test_style_selection_judge_factorises_role_temperament_and_habit():
    from personaweave.evaluation.judges import StyleSelectionJudge, habit_score

    judge = StyleSelectionJudge.from_style_personas(load_style_personas("all"), encoder=BagOfWordsEncoder())
    reply = ("That reminds me of a good stew in my kitchen, but it will probably go wrong anyway, it usually "
             "does, so why would you want to taste it?")
    probs = dict(zip(judge.names, judge.persona_probs([reply])[0]))
    assert max(probs, key=probs.get) == "chef-gloomy-asks"
    assert probs["chef-gloomy-asks"] > probs["chef-gloomy-short"] > 0  # the habit gate: it ends with a question
    assert habit_score("Fine. Go. Now.", "short") == 1.0 and habit_score("Fine. Go. Now.", "asks") < 1.0
    with pytest.raises(KeyError, match="habit"):
        habit_score("hello", "sings")


@pytest.mark.slow
def test_shipped_descriptions_checkpoint_spreads_unseen_descriptions_like_trained_ones():
    """The shipped "descriptions" layer (prompt-distilled over 72 descriptions) holds no unseen persona, and
    maps the 8 unseen descriptions about as far apart as its trained personas (the default layer, trained on
    8 personas, put them at a quarter of that: 2.05 vs 8.15)."""
    import importlib.util
    import sys

    from personaweave.loading import load_model

    spec = importlib.util.spec_from_file_location("unseen_personas", ROOT / "recipes" / "unseen_personas.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["unseen_personas"] = recipe
    spec.loader.exec_module(recipe)
    model, tokenizer, peft = load_model(checkpoint="descriptions")
    assert peft is None and len(model.config.persona_names) == 72
    unseen = load_style_personas("unseen")
    assert not {p.name for p in unseen} & set(model.config.persona_names)
    for p in unseen:
        model.add_persona(p.name, description=p.description, tokenizer=tokenizer)
    spread = recipe.soft_vector_spread(model, [p.name for p in unseen])
    assert spread["ratio"] > 0.6, spread
    with pytest.raises(ValueError, match="Unknown shipped checkpoint"):
        load_model(checkpoint="bard")


@pytest.mark.slow
def test_shipped_descriptions_checkpoint_starts_few_shot_personas_from_their_lines():
    """The shipped "descriptions" checkpoint carries a meta-learned retrieval start: five example lines of an
    unseen persona start nearest to its own description's vector among the 8 unseen descriptions for most
    of them (the bank mean, the start without retrieval, is one point for all: 1 of 8)."""
    import random

    import torch

    from personaweave.encoders import default_encoder
    from personaweave.loading import load_model

    model, tokenizer, _ = load_model(checkpoint="descriptions")
    assert model.config.few_shot_temperature is not None and model.config.few_shot_offset is not None
    unseen = load_style_personas("unseen")
    described = torch.nn.functional.normalize(torch.stack(
        [torch.as_tensor(v) for v in default_encoder().encode([p.description for p in unseen])]).float(), dim=-1)
    rng = random.Random(0)
    nearest = [int((described @ model.few_shot_start(rng.sample(list(p.examples), 5))).argmax()) for p in unseen]
    assert sum(n == i for i, n in enumerate(nearest)) >= 6, nearest
