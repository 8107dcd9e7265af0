"""Evaluation metrics and the shipped-checkpoint export/load round trip, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from test_adapters import CONFIG, perturb
from test_modeling import encode

from personaweave import PersonaWeaveConfig, PersonaWeaveForCausalLM
from personaweave.evaluation import distinct_n, perplexity
from personaweave.loading import export_persona_checkpoint, load_pretrained_personas
from personaweave.sub_personalities import add_sub_personality, lora_config, save_sub_personalities, set_sub_personality
from personaweave.testing import tiny_llama, tiny_tokenizer


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([], 2) == 0.0


def test_perplexity_of_master_equals_base_without_persona_tokens(persona_model):
    model, tok = persona_model
    texts = ["hello what should i read ?", "why is the sea good ?"]
    base_vocab = int(model.persona_token_table.min())  # persona tokens were appended to the base vocabulary
    bare = perplexity(model.language_model, tok, texts, vocab_limit=base_vocab)
    assert perplexity(model, tok, texts) == pytest.approx(bare, rel=1e-6)
    assert perplexity(model.language_model, tok, texts) != pytest.approx(bare, rel=1e-3)
    enc = tok(texts[:1], return_tensors="pt")
    loss = model(**enc, labels=enc["input_ids"]).loss
    assert perplexity(model, tok, texts[:1]) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def trained_model(tmp_path):
    """A tiny trained-looking PersonaWeave model (robot, pirate) whose base is saved under tmp_path/base."""
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), seed=3)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    config = PersonaWeaveConfig(text_config=base.config, persona_dim=8, num_persona_tokens=2, persona_hidden_size=16)
    model = PersonaWeaveForCausalLM(config, language_model=base).eval()
    for p in model.persona_embedding.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(0)
    for name in ("robot", "pirate"):
        model.add_persona(name, f"a {name}", vector=torch.randn(8, generator=g), tokenizer=tok)
    return model, tok


def test_exported_checkpoint_reloads_on_its_base(tmp_path):
    model, tok = trained_model(tmp_path)
    model.config.few_shot_temperature, model.config.few_shot_lr = 0.05, 0.005  # a learned few-shot start travels
    model.config.few_shot_offset = [0.25] * 8
    model.save_pretrained(tmp_path / "trained")
    tok.save_pretrained(tmp_path / "trained")
    peft = add_sub_personality(model, "robot", lora_config(**CONFIG))
    perturb(peft, "robot", 0)
    save_sub_personalities(peft, str(tmp_path / "trained"))
    set_sub_personality(peft, "robot")
    ids = encode(tok, "robot")
    with torch.no_grad():
        with_lora = peft(input_ids=ids).logits
        with peft.disable_adapter():
            master = peft(input_ids=ids).logits

    export_persona_checkpoint(str(tmp_path / "trained"), str(tmp_path / "ckpt"), base=str(tmp_path / "base"))
    import stat

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").rglob("*")}
    assert all(m & 0o044 == 0o044 for m in modes.values()), modes  # readable by others: a checkpoint to ship
    loaded, loaded_tok, loaded_peft = load_pretrained_personas(str(tmp_path / "ckpt"))
    assert loaded.config.persona_names == ["robot", "pirate"]
    assert (loaded.config.few_shot_temperature, loaded.config.few_shot_lr, loaded.config.few_shot_offset) == (
        0.05, 0.005, [0.25] * 8)
    assert torch.equal(encode(loaded_tok, "robot"), ids)
    with torch.no_grad():
        with loaded_peft.disable_adapter():
            torch.testing.assert_close(loaded_peft(input_ids=ids).logits, master, rtol=1e-5, atol=1e-5)
        set_sub_personality(loaded_peft, "robot")
        # adapters are shipped in fp16: close, not bit-identical
        torch.testing.assert_close(loaded_peft(input_ids=ids).logits, with_lora, rtol=1e-2, atol=1e-2)


def test_merged_persona_checkpoints_are_the_weighted_average_and_load_as_a_model(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from personaweave.loading import CONFIG_FILE, LAYER_FILE, load_model, merge_persona_checkpoints

    model, tok = trained_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    model.save_pretrained(tmp_path / "trained")
    tok.save_pretrained(tmp_path / "trained")
    peft = add_sub_personality(model, "robot", lora_config(**CONFIG))
    save_sub_personalities(peft, str(tmp_path / "trained"))
    a = export_persona_checkpoint(str(tmp_path / "trained"), str(tmp_path / "a"), base=str(tmp_path / "base"))
    layer_a = load_file(str(tmp_path / "a" / LAYER_FILE))
    layer_b = {k: v + torch.randn(v.shape, generator=g) for k, v in layer_a.items()}  # another "trained" layer
    (tmp_path / "b").mkdir()
    save_file(layer_b, str(tmp_path / "b" / LAYER_FILE))
    (tmp_path / "b" / CONFIG_FILE).write_text((tmp_path / "a" / CONFIG_FILE).read_text())

    out = merge_persona_checkpoints([a, str(tmp_path / "b")], [0.25, 0.75], str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / LAYER_FILE))
    assert set(merged) == set(layer_a)
    for key in merged:
        torch.testing.assert_close(merged[key], 0.25 * layer_a[key] + 0.75 * layer_b[key])
    assert (tmp_path / "merged" / "adapters" / "robot" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "merged" / CONFIG_FILE).read_text())["merged_from"] == [
        {"checkpoint": a, "weight": 0.25}, {"checkpoint": str(tmp_path / "b"), "weight": 0.75}]

    # a checkpoint-format folder is a model source of its own: the same model as load_pretrained_personas gives
    loaded, loaded_tok, loaded_peft = load_model(out)
    direct, _, _ = load_pretrained_personas(out)
    ids = encode(loaded_tok, "pirate")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, direct(input_ids=ids).logits)
        first, _, _ = load_model(merge_persona_checkpoints([a, str(tmp_path / "b")], [1.0, 0.0], str(tmp_path / "m1")))
        torch.testing.assert_close(first(input_ids=ids).logits, load_pretrained_personas(a)[0](input_ids=ids).logits)
    assert loaded_peft is not None and "robot" in loaded_peft.peft_config

    for weights in ([0.5, 0.6], [float("nan"), 1.0], [1.5, -0.5], [1.0]):
        with pytest.raises(ValueError, match="weight"):
            merge_persona_checkpoints([a, str(tmp_path / "b")], weights, str(tmp_path / "bad"))
    other = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    other["personas"] = other["personas"][::-1]
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps(other))
    with pytest.raises(ValueError, match="same personas"):
        merge_persona_checkpoints([a, str(tmp_path / "b")], [0.5, 0.5], str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
