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


def test_exported_checkpoint_reloads_on_its_base(tmp_path):
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
