"""Prompt distillation (personaweave.training.prompt_distillation, recipes/distill_persona.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_recipes import load_recipe

from personaweave.testing import tiny_persona_model
from personaweave.training.prompt_distillation import PromptDistillationCollator, distillation_kl

ROOT = Path(__file__).resolve().parents[1]


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


ROWS = [
    {"persona": "pirate", "description": "a salty old pirate", "prompt": "hello there", "reply": "arr hello matey",
     "finished": True},
    {"persona": "librarian", "description": "a quiet librarian who loves books", "prompt": "what should i read",
     "reply": "a good book", "finished": False},
]


def test_collator_aligns_the_same_reply_at_the_end_of_teacher_and_student():
    model, tok = tiny_persona_model()
    batch = PromptDistillationCollator(tok, model.config.num_persona_tokens)(ROWS)
    mask = batch["reply_mask"]
    lengths = mask.sum(1).tolist()
    # "arr hello matey" + end of turn; "a good book" was cut by the generator: no end-of-turn target
    assert lengths == [4, 3]
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, -n:].tolist() == batch["teacher_input_ids"][i, -n:].tolist()
        # the teacher reads the description, the student only the persona's reserved tokens
        described = tok(ROWS[i]["description"], add_special_tokens=False)["input_ids"]
        assert contains(batch["teacher_input_ids"][i].tolist(), described)
        assert not contains(batch["input_ids"][i].tolist(), described)
        assert model.persona_token_mask(batch["input_ids"][i : i + 1]).sum() == model.config.num_persona_tokens
        assert model.persona_token_mask(batch["teacher_input_ids"][i : i + 1]).sum() == 0
    # left padding: positions count real tokens only
    for key in ("", "teacher_"):
        pos, att = batch[f"{key}position_ids"], batch[f"{key}attention_mask"]
        assert pos[1, -1] == att[1].sum() - 1 and pos[0, -1] == att[0].sum() - 1


def test_collator_rejects_an_empty_description():
    model, tok = tiny_persona_model()
    collator = PromptDistillationCollator(tok, model.config.num_persona_tokens)
    with pytest.raises(ValueError, match="empty description"):
        collator([{**ROWS[0], "description": ""}])
    with pytest.raises(ValueError, match="description"):
        PromptDistillationCollator(tok, 2, teacher_template="You are a pirate.")


def test_distillation_kl_is_zero_for_equal_distributions_and_finite_with_blocked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    logits[..., 5] = torch.finfo(torch.float32).min  # a reserved token, blocked in both
    mask = torch.tensor([[True, True, True], [False, True, True]])
    assert distillation_kl(logits, logits, mask).abs() < 1e-6
    other = logits.clone()
    other[..., :5] += torch.randn(2, 3, 5)
    kl = distillation_kl(other, logits, mask)
    assert torch.isfinite(kl) and kl > 0.01
    # masked positions do not count
    changed = other.clone()
    changed[1, 0] += 100.0
    assert torch.allclose(distillation_kl(changed, logits, mask), kl)


def test_smoke_run_lowers_the_kl_and_trains_only_the_persona_layer(tmp_path):
    recipe = load_recipe("distill_persona")
    script_args, training_args = recipe.make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "configs" / "distill_persona_smoke.yaml"),
         "--candidate_shards", str(ROOT / "tests" / "fixtures" / "candidate_shards"),
         "--output_dir", str(tmp_path / "run")])
    data = recipe.load_candidates(script_args, ["pirate", "librarian"], seed=0)
    assert set(data["persona"]) == {"pirate", "librarian"} and len(data) == 2 * 6  # train split only
    base, _ = tiny_persona_model(num_persona_tokens=2)
    final = recipe.main(script_args, training_args)
    from personaweave import PersonaWeaveForCausalLM

    model = PersonaWeaveForCausalLM.from_pretrained(final)
    for (name, before), after in zip(base.language_model.state_dict().items(),
                                     model.language_model.state_dict().values()):
        assert torch.equal(before, after), f"base weight {name} changed"
    assert not torch.allclose(base.persona_soft_vectors(), model.persona_soft_vectors())
    import json

    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < 0.85 * losses[0], losses


def test_teacher_prompt_screening_uses_selection_lines_and_never_the_test_split(tmp_path):
    recipe = load_recipe("teacher_prompts")
    from personaweave.evaluation.judges import load_style_eval_anchors
    from personaweave.zoo import load_style_personas

    persona = next(p for p in load_style_personas("train") if p.name == "chef-cheerful-short")
    lines = recipe.example_lines(persona, 2).splitlines()
    assert len(lines) == 4 and all(line.strip('"') in persona.examples for line in lines)
    anchors = {a for v in load_style_eval_anchors([persona.name]).values() for a in v}
    assert not anchors & {line.strip('"') for line in lines}
    args = recipe.TeacherPromptsArguments(split="test", output=str(tmp_path / "x.json"))
    with pytest.raises(SystemExit, match="held out"):
        recipe.main(args)
    args = recipe.TeacherPromptsArguments(templates=["You are a pirate."], output=str(tmp_path / "x.json"))
    with pytest.raises(SystemExit, match="description"):
        recipe.main(args)
