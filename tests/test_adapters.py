"""LoRA sub-personalities with peft on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_persona_model
from test_modeling import encode

from personaweave.sub_personalities import (
    add_sub_personality,
    blend_sub_personalities,
    has_sub_personalities,
    load_sub_personalities,
    lora_config,
    save_sub_personalities,
    set_sub_personality,
    sub_personalities,
)

CONFIG = dict(r=4, alpha=8, dropout=0.0)


def perturb(peft_model, name, seed):
    """Give adapter `name` non-zero B matrices (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n and f".{name}." in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture
def two_adapters():
    model, tok = make_persona_model()
    peft = add_sub_personality(model, "robot", lora_config(**CONFIG))
    peft = add_sub_personality(peft, "pirate", lora_config(**CONFIG))
    perturb(peft, "robot", 0)
    perturb(peft, "pirate", 1)
    return peft.eval(), tok


def logits(model, tok, persona="robot"):
    with torch.no_grad():
        return model(input_ids=encode(tok, persona)).logits


def test_switching_sub_personalities_changes_the_output(two_adapters):
    peft, tok = two_adapters
    assert sub_personalities(peft) == ["robot", "pirate"]
    set_sub_personality(peft, "robot")
    robot = logits(peft, tok)
    set_sub_personality(peft, "pirate")
    pirate = logits(peft, tok)
    assert (robot - pirate).abs().max() > 1e-3
    with pytest.raises(KeyError, match="ghost"):
        set_sub_personality(peft, "ghost")


def test_blending_one_adapter_at_weight_one_reproduces_it(two_adapters):
    peft, tok = two_adapters
    set_sub_personality(peft, "robot")
    robot = logits(peft, tok)
    blend_sub_personalities(peft, {"robot": 1.0}, name="just_robot")
    torch.testing.assert_close(logits(peft, tok), robot, rtol=1e-5, atol=1e-5)


def test_cat_blend_is_the_weighted_sum_of_deltas(two_adapters):
    peft, tok = two_adapters
    with peft.disable_adapter():
        base = logits(peft, tok)
    blend_sub_personalities(peft, {"robot": 0.0, "pirate": 2.0}, name="all_pirate")
    all_pirate = logits(peft, tok)
    set_sub_personality(peft, "pirate")
    torch.testing.assert_close(all_pirate, logits(peft, tok), rtol=1e-5, atol=1e-5)
    assert (all_pirate - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="negative"):
        blend_sub_personalities(peft, {"robot": -1.0, "pirate": 2.0})
    with pytest.raises(KeyError, match="ghost"):
        blend_sub_personalities(peft, {"ghost": 1.0})


def test_save_and_load_sub_personalities(tmp_path):
    master, tok = make_persona_model()
    master.save_pretrained(tmp_path)  # the master is saved before LoRA layers are injected into it
    peft = add_sub_personality(master, "robot", lora_config(**CONFIG))
    peft = add_sub_personality(peft, "pirate", lora_config(**CONFIG))
    perturb(peft, "robot", 0)
    perturb(peft, "pirate", 1)
    set_sub_personality(peft, "pirate")
    expected = logits(peft.eval(), tok)
    save_sub_personalities(peft, str(tmp_path))
    assert has_sub_personalities(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir() if p.is_dir()) == ["pirate", "robot"]
    fresh, _ = make_persona_model()
    loaded = load_sub_personalities(fresh, str(tmp_path)).eval()
    set_sub_personality(loaded, "pirate")
    torch.testing.assert_close(logits(loaded, tok), expected, rtol=1e-5, atol=1e-5)


def test_training_one_adapter_leaves_the_other_and_the_master_alone(two_adapters):
    peft, tok = two_adapters
    set_sub_personality(peft, "pirate")
    frozen = {n: p.clone() for n, p in peft.named_parameters() if ".pirate." not in n}
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(".pirate." in n for n in trainable)
    peft.train()
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    ids = encode(tok, "pirate")
    for _ in range(3):
        peft(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in peft.named_parameters() if n in frozen)


def test_a_blend_made_at_inference_runs_without_dropout():
    """peft creates a blended adapter's modules in training mode; in a model in eval mode the blend must not
    switch LoRA dropout on (two identical forwards must agree); in a model being trained it stays on."""
    model, tok = make_persona_model()
    peft = add_sub_personality(model, "robot", lora_config(r=4, alpha=8, dropout=0.5))
    peft = add_sub_personality(peft, "pirate", lora_config(r=4, alpha=8, dropout=0.5))
    perturb(peft, "robot", 0)
    perturb(peft, "pirate", 1)
    peft.eval()
    blend_sub_personalities(peft, {"robot": 0.5, "pirate": 0.5}, name="mix")
    assert not any(m.training for m in peft.modules())
    torch.testing.assert_close(logits(peft, tok), logits(peft, tok))
    peft.train()
    blend_sub_personalities(peft, {"robot": 0.3, "pirate": 0.7}, name="mix_training")
    assert all(m.training for n, m in peft.named_modules() if n.endswith("lora_dropout.mix_training"))
