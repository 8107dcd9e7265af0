"""Every recipe YAML parses into the recipe's dataclasses; bad options fail clearly."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trl import TrlParser

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.py"))


def recipe_of(config: Path) -> str:
    """recipes/configs/X.yaml configures recipes/X.py; X_variant.yaml too (sft_persona.yaml -> sft.py)."""
    if config.stem in RECIPE_NAMES:
        return config.stem
    prefixes = [name for name in RECIPE_NAMES if config.stem.startswith(name + "_")]
    return max(prefixes, key=len) if prefixes else config.stem


def test_every_recipe_has_a_config_and_every_config_a_recipe():
    configured = {recipe_of(c) for c in CONFIGS}
    assert configured - set(RECIPE_NAMES) == set(), "configs without a recipe"
    assert set(RECIPE_NAMES) - configured == set(), "recipes without a config in recipes/configs/"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_parses_with_trl_and_documents_its_options(name):
    """Every recipe builds its options with TrlParser (no bare argparse); each option has help."""
    source = (RECIPES / f"{name}.py").read_text()
    assert "argparse" not in source, f"recipes/{name}.py still uses argparse"
    recipe = load_recipe(name)
    parser = recipe.make_parser()
    assert isinstance(parser, TrlParser)
    import dataclasses

    own = [t for t in parser.dataclass_types if t.__module__ == recipe.__name__]
    assert own, f"recipes/{name}.py defines no dataclass of its own options"
    undocumented = [f"{t.__name__}.{f.name}" for t in own for f in dataclasses.fields(t) if not f.metadata.get("help")]
    assert not undocumented, undocumented


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_into_its_recipe_dataclasses(config):
    recipe = load_recipe(recipe_of(config))
    parsed = recipe.make_parser().parse_args_and_config(["--config", str(config)])
    keys = set(yaml.safe_load(config.read_text()) or {})
    fields = {name for obj in parsed for name in vars(obj)}
    assert keys <= fields, keys - fields  # every key landed in a dataclass (unknown keys already raise)


def test_shared_data_paths_only_in_the_configs():
    """Recipes and package code never point at ../shared/data themselves: the configs do."""
    import re

    pattern = re.compile(r"shared[\\/\"', ]+data")
    offenders = [str(p.relative_to(ROOT)) for p in [*RECIPES.glob("*.py"), *(ROOT / "personaweave").rglob("*.py")]
                 if pattern.search(p.read_text())]
    assert not offenders, offenders
    assert any("../shared/data" in c.read_text() for c in CONFIGS)


def test_ppo_eval_scores_with_the_runs_weights(tmp_path):
    from personaweave.training.rewards import DEFAULT_WEIGHTS, save_reward_weights

    evaluation = load_recipe("ppo_eval")
    ppo_yaml = RECIPES / "configs" / "ppo.yaml"
    # a run folder without the saved weights: the PPO config's weights
    from_config = evaluation.run_reward_weights(str(tmp_path), str(ppo_yaml))
    assert from_config == {k: float(v) for k, v in yaml.safe_load(ppo_yaml.read_text())["reward_weights"].items()}
    # a run that trained with other weights: those, not the library defaults nor the YAML
    run_weights = {"classifier_confidence": 0.25, "goal": 2.0}
    save_reward_weights(run_weights, str(tmp_path))
    assert evaluation.run_reward_weights(str(tmp_path), str(ppo_yaml)) == run_weights != DEFAULT_WEIGHTS
    with pytest.raises(FileNotFoundError, match="reward weights"):
        evaluation.run_reward_weights(str(tmp_path / "missing"), str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("config", sorted((RECIPES / "configs").glob("sft*.yaml")), ids=lambda p: p.name)
def test_sft_configs_parse(config):
    sft = load_recipe("sft")
    script_args, training_args = sft.make_parser().parse_args_and_config(["--config", str(config)])
    assert script_args.stage in {"persona", "sub_personality"}
    assert training_args.output_dir


def test_sft_lora_targets_default_to_the_library_and_the_config_overrides():
    from personaweave.sub_personalities import DEFAULT_TARGET_MODULES

    sft = load_recipe("sft")
    assert sft.sub_personality_lora_config(sft.PersonaSFTArguments()).target_modules == set(DEFAULT_TARGET_MODULES)
    script_args, _ = sft.make_parser().parse_args_and_config(
        ["--config", str(RECIPES / "configs" / "sft_sub_personality.yaml")])
    override = yaml.safe_load((RECIPES / "configs" / "sft_sub_personality.yaml").read_text())["lora_target_modules"]
    assert sft.sub_personality_lora_config(script_args).target_modules == set(override)


def test_traits_config_parses():
    traits = load_recipe("traits")
    args, training_args = TrlParser((traits.TraitArguments, traits.TrainingArguments)).parse_args_and_config(
        ["--config", str(RECIPES / "configs" / "traits.yaml")])
    assert args.max_rows_per_persona == 200 and training_args.num_train_epochs == 2


def test_trait_policy_config_parses():
    policy = load_recipe("trait_policy")
    (args,) = TrlParser((policy.PolicyArguments,)).parse_args_and_config(
        ["--config", str(RECIPES / "configs" / "trait_policy.yaml")])
    assert args.algorithms == ["dqn", "ppo"] and len(args.eval_seeds) == 5


def test_ppo_config_parses():
    ppo = load_recipe("ppo")
    script, args = TrlParser((ppo.PPOScriptArguments, ppo.PPOConfig)).parse_args_and_config(
        ["--config", str(RECIPES / "configs" / "ppo.yaml")])
    assert script.reward_weights["goal"] == 1.0 and args.kl_coef == 0.05
    script, args = TrlParser((ppo.PPOScriptArguments, ppo.PPOConfig)).parse_args_and_config(
        ["--config", str(RECIPES / "configs" / "ppo_v2.yaml")])
    assert script.start_adapter == "dpo" and script.reward_weights["persona_reward"] == 1.0
    assert script.reward_model.endswith("reward_model_v2/final")


def test_maml_config_parses():
    maml = load_recipe("maml")
    (args,) = TrlParser((maml.MamlArguments,)).parse_args_and_config(["--config", str(RECIPES / "configs" / "maml.yaml")])
    assert args.ks == [1, 5, 10] and len(args.seeds) == 5


@pytest.mark.parametrize("config", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_valid_yaml(config):
    data = yaml.safe_load(config.read_text())
    assert data["distributed_type"] in {"NO", "MULTI_GPU", "FSDP"}
    assert data["num_processes"] >= 1


def test_unfreeze_schedule_parsing():
    from personaweave.training.sft import parse_unfreeze_schedule

    assert parse_unfreeze_schedule("300:4,100:2") == [(100, 2), (300, 4)]
    with pytest.raises(ValueError, match="STEP:NUM_LAYERS"):
        parse_unfreeze_schedule("100-2")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU message")
def test_4bit_on_cpu_is_a_clear_message_not_a_crash():
    sft = load_recipe("sft")
    args = sft.PersonaSFTArguments(load_in_4bit=True)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        sft.quantization_kwargs(args)


@pytest.mark.slow
def test_smoke_recipe_lowers_the_loss(tmp_path):
    """The 5-minute CPU recipe (tiny random base) trains, checkpoints, and writes a loadable folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "smoke"
    cmd = [sys.executable, str(RECIPES / "sft.py"), "--config", str(RECIPES / "configs" / "sft_smoke.yaml"),
           "--output_dir", str(out), "--max_steps", "60", "--logging_steps", "10"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.05, losses
    from personaweave import PersonaWeaveForCausalLM

    model = PersonaWeaveForCausalLM.from_pretrained(out / "final")
    assert len(model.config.persona_names) == 8


def test_persona_stage_trains_one_map_for_default_and_style_personas(tmp_path):
    """`persona_sets: [default, style]` + `extra_dataset_dirs`: one bank of 72 personas, one map trained
    on both folders' rows; the unseen combinations stay out of the bank."""
    import pandas as pd

    from personaweave.zoo import load_default_personas, load_style_personas

    sft = load_recipe("sft")
    folders = {}
    for name, personas in (("default", load_default_personas()[:2]), ("style", load_style_personas("train")[:3])):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"persona": p.name, "description": p.description, "prompt": prompt, "response": p.examples[i],
                 "score": 0.5} for p in personas for i, prompt in enumerate(("hello there", "what do you do"))]
        for split in ("train", "validation", "test"):
            pd.DataFrame(rows if name == "default" else [{k: v for k, v in r.items() if k != "score"}
                                                         for r in rows]).to_parquet(folder / f"{split}.parquet")
        folders[name] = folder
    script_args, training_args = sft.make_parser().parse_args_and_config(
        ["--config", str(RECIPES / "configs" / "sft_smoke.yaml"), "--dataset_dir", str(folders["default"]),
         "--extra_dataset_dirs", str(folders["style"]), "--persona_sets", "default", "style",
         "--output_dir", str(tmp_path / "run"), "--max_steps", "4", "--save_strategy", "no",
         "--unfreeze_schedule", "0:0"])
    assert script_args.persona_sets == ["default", "style"]
    train = sft.load_dialogues(script_args, "train")
    assert len(train) == 2 * 2 + 3 * 2 and set(train["persona"]) >= {"librarian", "chef-cheerful-short"}
    final = sft.main(script_args, training_args)
    from personaweave import PersonaWeaveForCausalLM

    model = PersonaWeaveForCausalLM.from_pretrained(final)
    assert len(model.config.persona_names) == 72
    assert "chef-cheerful-short" in model.config.persona_names
    assert not set(p.name for p in load_style_personas("unseen")) & set(model.config.persona_names)


def test_unseen_personas_meta_learns_a_few_shot_start_from_the_trained_style_personas_only():
    import torch

    from personaweave.testing import tiny_persona_model
    from personaweave.zoo import load_style_personas

    recipe = load_recipe("unseen_personas")
    (args,) = recipe.make_parser().parse_args_and_config(["--meta_steps", "3", "--meta_tasks_per_step", "2"])
    trained = load_style_personas("train")[:3]
    words = tuple({w for p in trained for line in p.examples for w in line.split()})
    model, tok = tiny_persona_model(personas=trained, extra_words=words)
    torch.nn.init.normal_(model.persona_embedding.net[2].weight, std=0.1)  # a layer that maps vectors somewhere
    start = model.few_shot_init_vector().clone()
    learned, info = recipe.meta_learned_init(model, tok, args)
    assert info["tasks"] == 3 and info["meta_steps"] == 3 and info["start"] == "vector"
    assert learned.temperature is None and len(learned.vector) == model.config.persona_dim
    assert not torch.allclose(learned.vector, start)  # the meta steps moved the start
    assert "fewshot-meta-scratch" not in model.config.persona_names  # the scratch persona is gone again
    defaults_only, tok = tiny_persona_model()
    assert recipe.meta_learned_init(defaults_only, tok, args) is None  # no training style persona: no tasks


def _persona_quality_folder(path: Path, seed: int) -> str:
    """A tiny saved PersonaWeave folder with a random LoRA sub-personality for every default persona."""
    import torch

    from personaweave.sub_personalities import add_sub_personality, lora_config, save_sub_personalities
    from personaweave.testing import tiny_persona_model

    model, tok = tiny_persona_model(extra_words=("what", "should", "i", "read", "cook", "tonight"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    peft = None
    for name in model.config.persona_names:
        peft = add_sub_personality(peft or model, name, lora_config(r=2, alpha=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_sub_personalities(peft, str(path))
    return str(path)


def test_persona_quality_compare_model_and_blended_loras(tmp_path, monkeypatch, hash_encoder):
    """`--compare_model` adds the second folder's rows, computed as that folder's own run computes them;
    `blends_lora` generates with the blended tokens + the 50/50 `cat` blend of the parents' LoRAs (not with
    the tokens alone); asking to compare on no row is a clear error."""
    import pandas as pd

    import personaweave.encoders

    monkeypatch.setattr(personaweave.encoders, "default_encoder", lambda *a, **k: hash_encoder)
    recipe = load_recipe("persona_quality")
    # the tiny model rarely ends a sentence: keep its replies whole so that they can be compared
    monkeypatch.setattr(recipe, "trim_to_sentence", lambda text: text)
    first, second = _persona_quality_folder(tmp_path / "a", 1), _persona_quality_folder(tmp_path / "b", 2)
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [{"split": "test", "prompt": turn, "persona": "pirate", "sample": s, "score": float(s),
             "reply_trimmed": f"reply {s}."} for turn in ("what should i read", "what should i cook tonight")
            for s in range(2)]
    pd.DataFrame(rows).to_parquet(shards / "judged-000.parquet")

    def run(model, out, rows, compare=None):
        args = recipe.PersonaQualityArguments(shards=str(shards), model=model, max_turns=2, max_new_tokens=4,
                                              batch_size=8, rows=rows, output=str(tmp_path / out),
                                              compare_model=compare)
        return recipe.main(args)["rows"]

    table = run(first, "a.json", ["persona_token", "token_lora", "blends", "blends_lora"], compare=second)
    alone = run(second, "b.json", ["persona_token", "token_lora"])
    assert table["compare_token_lora"]["replies"] == alone["token_lora"]["replies"]
    assert table["compare_persona_token"]["replies"] == alone["persona_token"]["replies"]
    assert table["token_lora"]["replies"] != alone["token_lora"]["replies"]  # the two folders differ
    from personaweave.chat import chat
    from personaweave.generation import generate_replies
    from personaweave.loading import load_model
    from personaweave.sub_personalities import blend_sub_personalities

    model, tok, peft = load_model(first)
    turns = ["what should i read", "what should i cook tonight"]
    for a, b in (("librarian", "robot"), ("pirate", "butler")):
        tokens, lora = table[f"blend_{a}_{b}"], table[f"blend_{a}_{b}_lora"]
        # what the demo does: blended tokens + the 50/50 `cat` blend of the parents' LoRAs
        model.add_persona(f"blend_{a}_{b}", blend={a: 0.5, b: 0.5}, tokenizer=tok)
        blend_sub_personalities(peft, {a: 0.5, b: 0.5}, name=f"check_{a}_{b}")
        out = generate_replies(peft, tok, [chat(f"blend_{a}_{b}", t, model=model) for t in turns],
                               max_new_tokens=4, **recipe.DECODING)
        assert lora["replies"] == out.texts
        assert lora["replies"] != tokens["replies"]
        assert lora["parent_share"] == pytest.approx(lora[f"share_{a}"] + lora[f"share_{b}"])
    with pytest.raises(SystemExit, match="nothing to compare"):
        run(first, "c.json", ["prompt_baseline"], compare=second)


def test_persona_quality_calibrated_blends_use_training_turns_and_their_weights(tmp_path, monkeypatch, hash_encoder):
    """`--calibrate_blends`: calibration sees training turns only (never the held-out ones) and the
    selection judge (never the evaluation judge); the calibrated rows generate with the weights it returns,
    for the tokens and the parents' LoRAs alike."""
    import pandas as pd

    import personaweave.encoders
    from personaweave.evaluation.judges import SelectionJudge
    from personaweave.training import blend_calibration

    monkeypatch.setattr(personaweave.encoders, "default_encoder", lambda *a, **k: hash_encoder)
    recipe = load_recipe("persona_quality")
    monkeypatch.setattr(recipe, "trim_to_sentence", lambda text: text)
    folder = _persona_quality_folder(tmp_path / "a", 1)
    shards = tmp_path / "shards"
    shards.mkdir()
    test_turns, train_turns = ["what should i read", "what should i cook tonight"], ["i read", "cook what"]
    rows = [{"split": split, "prompt": turn, "persona": "pirate", "sample": 0, "score": 0.0, "reply_trimmed": "r."}
            for split, turns in (("test", test_turns), ("train", train_turns)) for turn in turns]
    pd.DataFrame(rows).to_parquet(shards / "judged-000.parquet")
    calls = []

    def fixed(model, tokenizer, name, weights, judge, turns, **kwargs):
        calls.append((name, sorted(turns), type(judge), kwargs["adapters"]))
        first, second = weights
        return blend_calibration.BlendCalibration(dict(weights), {first: 0.3, second: 0.7},
                                                  [blend_calibration.BlendProbe(0.3, 0.5, 0.5)])

    monkeypatch.setattr(blend_calibration, "calibrate_blend", fixed)
    args = recipe.PersonaQualityArguments(shards=str(shards), model=folder, max_turns=2, max_new_tokens=4,
                                          batch_size=8, rows=["blends", "blends_lora"], calibrate_blends=True,
                                          output=str(tmp_path / "out.json"))
    table = recipe.main(args)["rows"]
    assert [(c[1], c[2], c[3]) for c in calls] == [(sorted(train_turns), SelectionJudge, False)] * 2 + [
        (sorted(train_turns), SelectionJudge, True)] * 2
    from personaweave.chat import chat
    from personaweave.generation import generate_replies
    from personaweave.loading import load_model
    from personaweave.sub_personalities import blend_sub_personalities

    model, tok, peft = load_model(folder)
    for a, b in (("librarian", "robot"), ("pirate", "butler")):
        row = table[f"blend_{a}_{b}_calibrated_lora"]
        assert row["weights"] == {a: 0.3, b: 0.7} and row["calibration"]["weights"] == {a: 0.3, b: 0.7}
        model.add_persona(f"by_hand_{a}", blend={a: 0.3, b: 0.7}, tokenizer=tok)
        blend_sub_personalities(peft, {a: 0.3, b: 0.7}, name=f"check_{a}_{b}")
        out = generate_replies(peft, tok, [chat(f"by_hand_{a}", t, model=model) for t in test_turns],
                               max_new_tokens=4, **recipe.DECODING)
        assert row["replies"] == out.texts
        assert table[f"blend_{a}_{b}_calibrated"]["weights"] == {a: 0.3, b: 0.7}
