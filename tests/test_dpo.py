"""DPO on best-of-N preference pairs (recipes/dpo.py): a smoke run on a tiny random model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("dpo_recipe", ROOT / "recipes" / "dpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpo_recipe"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _pair_logp(model, tokenizer, row, k):
    from personaweave.chat import chat

    prompt = tokenizer.apply_chat_template(chat(row["persona"], row["prompt"], num_persona_tokens=k),
                                           add_generation_prompt=True, tokenize=True)
    out = {}
    for key in ("chosen", "rejected"):
        reply = tokenizer(row[key], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([list(prompt) + reply])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
        out[key] = float(logp.gather(-1, torch.tensor(reply)[:, None]).sum())
    return out["chosen"] - out["rejected"]


def _write_pairs(folder) -> list[dict]:
    """Preference pairs of 4 default personas (chosen: an example line; rejected: a bland reply) in `folder`."""
    from personaweave.zoo import load_default_personas

    rows = []
    for p in load_default_personas()[:4]:
        for prompt in ("what should i read today", "hello how are you"):
            rows.append({"persona": p.name, "prompt": prompt, "chosen": p.examples[0].lower(),
                         "rejected": "ok fine whatever", "chosen_score": 0.8, "rejected_score": 0.1})
    for split in ("train", "validation"):
        pd.DataFrame(rows).to_parquet(folder / f"preferences_{split}.parquet")
    return rows


@pytest.mark.slow
def test_dpo_smoke_moves_the_policy_towards_chosen(tmp_path):
    from personaweave.loading import load_model
    from personaweave.sub_personalities import master_only, set_sub_personality

    rows = _write_pairs(tmp_path)
    recipe = _recipe()
    script_args, training_args = recipe.make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "configs" / "dpo_smoke.yaml"), "--preferences_dir", str(tmp_path),
         "--output_dir", str(tmp_path / "run"), "--max_steps", "6"])
    final = recipe.main(script_args, training_args)
    from personaweave.models import PersonaWeaveForCausalLM

    _, info = PersonaWeaveForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the master is saved without LoRA layers
    model, tokenizer, peft = load_model(final)
    assert peft is not None
    set_sub_personality(peft, "dpo")
    k = model.config.num_persona_tokens
    with torch.no_grad():
        after = [_pair_logp(peft, tokenizer, r, k) for r in rows]
        with master_only(peft):
            before = [_pair_logp(peft, tokenizer, r, k) for r in rows]
    # DPO's objective: the chosen reply gains log-probability relative to the rejected one, vs the reference
    assert sum(a - b for a, b in zip(after, before)) / len(rows) > 0.0


def test_dpo_per_persona_trains_each_persona_lora_against_a_copy_of_itself(tmp_path):
    """`--per_persona_adapters`: each persona's own LoRA moves towards its chosen replies, relative to
    the LoRA it started from; a persona without pairs keeps its adapter as it was; reruns skip."""
    from personaweave.loading import load_model
    from personaweave.sub_personalities import (
        add_sub_personality,
        lora_config,
        save_sub_personalities,
        set_sub_personality,
    )
    from personaweave.testing import tiny_persona_model, vocabulary

    rows = [{"persona": persona, "prompt": prompt, "chosen": chosen, "rejected": "ok fine whatever",
             "chosen_score": 0.8, "rejected_score": 0.1}
            for persona, chosen in (("pirate", "arr matey the sea"), ("butler", "very good sir indeed"))
            for prompt in ("what should i read today", "hello how are you")]
    for split in ("train", "validation"):
        pd.DataFrame(rows).to_parquet(tmp_path / f"preferences_{split}.parquet")
    torch.manual_seed(0)
    model, tokenizer = tiny_persona_model(extra_words=vocabulary([w for r in rows for w in r.values()
                                                                 if isinstance(w, str)]))
    master = tmp_path / "master"
    model.save_pretrained(master)
    tokenizer.save_pretrained(master)
    peft = None
    for name in ("pirate", "butler", "robot"):
        peft = add_sub_personality(peft or model, name, lora_config(r=2, alpha=4))
    save_sub_personalities(peft, str(master))
    k = model.config.num_persona_tokens
    recipe = _recipe()
    script_args, training_args = recipe.make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "configs" / "dpo_smoke.yaml"), "--preferences_dir", str(tmp_path),
         "--tiny_random_base", "false", "--master_model", str(master), "--per_persona_adapters", "true",
         "--output_dir", str(tmp_path / "run"), "--max_steps", "4"])
    final = recipe.main(script_args, training_args)

    def margins(folder, persona):
        _, tok, peft = load_model(str(folder))
        set_sub_personality(peft, persona)
        with torch.no_grad():
            return [_pair_logp(peft, tok, r, k) for r in rows if r["persona"] == persona]

    for persona in ("pirate", "butler"):
        after, before = margins(final, persona), margins(master, persona)
        assert sum(a - b for a, b in zip(after, before)) / len(after) > 0.0
    from safetensors.torch import load_file

    untouched = [load_file(str(d / "adapters" / "robot" / "adapter_model.safetensors")) for d in (master, Path(final))]
    assert all(torch.equal(untouched[0][key], untouched[1][key]) for key in untouched[0])
    stamp = (Path(final) / "adapters" / "pirate" / "adapter_model.safetensors").stat().st_mtime_ns
    recipe.main(script_args, training_args)  # resumes: finished personas are skipped
    assert (Path(final) / "adapters" / "pirate" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_dpo_persona_layer_only_trains_the_persona_layer_against_the_starting_master(tmp_path):
    """`persona_layer_only`: token-only DPO. The LM's weights stay exactly as they were, the persona layer
    moves, and the chosen replies gain log-probability over the rejected ones relative to the start."""
    from personaweave.models import PersonaWeaveForCausalLM

    rows = _write_pairs(tmp_path)
    recipe = _recipe()
    script_args, training_args = recipe.make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "configs" / "dpo_smoke.yaml"), "--preferences_dir", str(tmp_path),
         "--output_dir", str(tmp_path / "run"), "--max_steps", "6", "--learning_rate", "1e-2",
         "--persona_layer_only", "true"])
    start, tokenizer = recipe.build_policy(script_args)
    final = recipe.main(script_args, training_args)
    trained = PersonaWeaveForCausalLM.from_pretrained(final).eval()
    assert "eval_rewards/accuracies" in json.loads((tmp_path / "run" / "eval_results.json").read_text())
    before, after = start.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("persona_embedding.") for k in moved)
    k = trained.config.num_persona_tokens
    with torch.no_grad():
        gain = [_pair_logp(trained, tokenizer, r, k) - _pair_logp(start.eval(), tokenizer, r, k) for r in rows]
    assert sum(gain) / len(rows) > 0.0
