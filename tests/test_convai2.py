"""The ConvAI2 benchmark: loader, ParlAI's F1, the four conditions and the gold-reply perplexity (fixtures and a
tiny model; the real validation file only when ../shared/data has it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import HashEncoder, make_persona_model

from personaweave.cli import main
from personaweave.data.convai2 import load_convai2, sample_examples
from personaweave.evaluation.convai2 import (
    CONDITIONS,
    add_profile_personas,
    condition_messages,
    encode_pairs,
    evaluate_convai2,
    normalize_answer,
    target_nll,
    unigram_f1,
)

FIXTURE = Path(__file__).parent / "fixtures" / "personachat_parlai_sample.txt"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "convai2_personachat"


def test_loader_keeps_profile_history_and_gold_reply():
    examples = load_convai2(str(FIXTURE))
    assert [(e.dialogue, e.turn) for e in examples] == [(0, 0), (0, 1), (1, 0)]
    first, second, third = examples
    assert first.profile == ["i love hiking in the mountains.", "i have two cats."]
    assert first.history == [] and first.partner == "hi there , how are you ?"
    assert first.reply == "i am great , just back from a hike ."
    assert second.history == [first.partner, first.reply]
    assert third.profile == ["i am a chef."] and third.history == []


def test_loader_rejects_a_turn_without_profile(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 hello\thi there\n")
    with pytest.raises(ValueError, match="before any 'your persona:'"):
        load_convai2(str(bad))
    with pytest.raises(FileNotFoundError, match="No ConvAI2 file"):
        load_convai2(str(tmp_path / "missing.txt"))


def test_sample_is_seeded_and_in_file_order():
    examples = load_convai2(str(FIXTURE))
    a, b = sample_examples(examples, 2, seed=3), sample_examples(examples, 2, seed=3)
    assert a == b and len(a) == 2
    assert [(e.dialogue, e.turn) for e in a] == sorted((e.dialogue, e.turn) for e in a)
    assert sample_examples(examples, None) == examples


def test_f1_is_parlai_unigram_f1():
    assert normalize_answer("The cat, an owl & A dog!") == "cat owl dog"
    assert unigram_f1("The cat sat.", "the cat sat") == 1.0
    assert unigram_f1("hello", "goodbye") == 0.0
    assert unigram_f1("", "anything") == 0.0
    # guess {i, like, cats, too} vs gold {i, like, dogs}: 2 shared; p = 2/4, r = 2/3
    assert unigram_f1("I like cats too", "i like dogs") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # multiset overlap: a repeated word counts as often as it occurs in both
    assert unigram_f1("yes yes yes", "yes") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert unigram_f1("yes yes", "yes yes no") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # counts, not sets


def test_conditions_carry_the_profile_where_they_should():
    model, tok = make_persona_model()
    examples = load_convai2(str(FIXTURE))
    assert add_profile_personas(model, tok, examples, encoder=HashEncoder()) == ["convai2-0", "convai2-1"]
    assert add_profile_personas(model, tok, examples, encoder=HashEncoder()) == []  # idempotent
    example = examples[0]
    none = condition_messages(example, "none", model)
    prompt = condition_messages(example, "prompt", model)
    tokens = condition_messages(example, "tokens", model)
    both = condition_messages(example, "both", model)
    profile = example.profile_text
    assert all("persona" not in m["content"] and profile not in m["content"] for m in none)
    assert profile in prompt[0]["content"] and "<|persona:" not in prompt[0]["content"]
    assert tokens[0]["content"] == "<|persona:convai2-0:0|><|persona:convai2-0:1|>"
    assert both[0]["content"].startswith(tokens[0]["content"]) and profile in both[0]["content"]
    with pytest.raises(ValueError, match="Unknown condition"):
        condition_messages(example, "sideways", model)


def test_history_is_kept_as_alternating_turns_and_can_be_cut():
    examples = load_convai2(str(FIXTURE))
    second = examples[1]
    full = condition_messages(second, "none")
    assert [m["role"] for m in full] == ["user", "assistant", "user"]
    assert condition_messages(second, "none", history_turns=0) == [{"role": "user", "content": second.partner}]


def test_batched_target_nll_equals_one_at_a_time():
    """Left padding, position ids and the kept logits must not change any row's score."""
    model, tok = make_persona_model()
    conversations = [[{"role": "user", "content": "hello"}],
                     [{"role": "user", "content": "what should i read today ?"}, {"role": "assistant", "content": "a book"},
                      {"role": "user", "content": "why"}]]
    prompts, targets = encode_pairs(tok, conversations, ["hi robot", "the sea is good , sir"])
    batched = target_nll(model, prompts, targets, tok.pad_token_id, batch_size=2)
    single = [target_nll(model, [p], [t], tok.pad_token_id, batch_size=1) for p, t in zip(prompts, targets)]
    assert batched[1] == sum(n for _, n in single) == sum(map(len, targets))
    assert batched[0] == pytest.approx(sum(s for s, _ in single), rel=1e-5)
    # and equal to the loss the model reports on the unpadded sequence
    ids = torch.tensor([prompts[1] + targets[1]])
    labels = ids.clone()
    labels[0, :len(prompts[1])] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    assert single[1][0] / single[1][1] == pytest.approx(float(loss), rel=1e-5)


def test_evaluate_reports_every_condition():
    model, tok = make_persona_model()
    examples = load_convai2(str(FIXTURE))
    results = evaluate_convai2(model, tok, examples, f1_examples=examples[:2], encoder=HashEncoder(),
                               max_new_tokens=3, log=lambda m: None)
    assert list(results["conditions"]) == list(CONDITIONS)
    rows = results["conditions"]
    assert all(math.isfinite(r["ppl"]) and 0 <= r["f1"] <= 1 for r in rows.values())
    # one persona per dialogue, named after it; persona tokens are fewer prompt tokens than the profile text
    assert {"convai2-0", "convai2-1"} <= set(model.config.persona_names)
    assert rows["tokens"]["prompt_tokens_per_request"] < rows["both"]["prompt_tokens_per_request"]
    assert rows["tokens"]["target_tokens"] == rows["none"]["target_tokens"]
    assert results["published"]["rows"][0]["f1"] == 19.5


def test_cli_benchmark(tmp_path, capsys, monkeypatch):
    from personaweave.models import modeling_personaweave

    model, tok = make_persona_model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(modeling_personaweave, "DEFAULT_ENCODER_FACTORY", HashEncoder)
    out = tmp_path / "convai2.json"
    assert main(["eval", "--benchmark", "convai2", "--data", str(FIXTURE), "--model", str(tmp_path / "m"),
                 "--limit", "2", "--f1-limit", "1", "--max-new-tokens", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["num_replies_ppl"] == 2 and results["num_replies_f1"] == 1
    assert set(results["conditions"]) == set(CONDITIONS)
    assert main(["eval", "--benchmark", "convai2", "--data", str(FIXTURE), "--model", str(tmp_path / "m"),
                 "--f1-limit", "0", "--conditions", "none", "tokens", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["conditions"]) == ["none", "tokens"]
    with pytest.raises(SystemExit, match="no persona_layer.safetensors"):
        main(["eval", "--benchmark", "convai2", "--data", str(FIXTURE), "--persona-layer", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --data"):
        main(["eval", "--benchmark", "convai2"])
    with pytest.raises(SystemExit, match="No ConvAI2 file"):
        main(["eval", "--benchmark", "convai2", "--data", str(tmp_path / "nowhere")])


@pytest.mark.skipif(not SHARED.is_dir(), reason="the ConvAI2 validation file is not here")
def test_real_validation_file_parses():
    examples = load_convai2(str(SHARED))
    assert len(examples) == 7801
    assert len({e.dialogue for e in examples}) == 1000
    assert all(3 <= len(e.profile) <= 5 for e in examples)


@pytest.mark.parametrize("encoding", ["whole", "per_sentence"])
def test_cli_benchmark_with_a_trained_persona_layer(tmp_path, monkeypatch, encoding):
    """`--persona-layer` (recipes/profile_personas.py's output) builds the model around its base and encodes
    each profile the way the layer was trained (per_sentence: one vector per sentence)."""
    import personaweave.encoders
    from personaweave.testing import tiny_llama, tiny_tokenizer
    from personaweave.training.profile_personas import make_persona_map, save_persona_layer

    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok), 0)
    lm.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    layer = make_persona_map(encoding, HashEncoder.dim, 32, num_tokens=2, inner_size=16, max_sentences=2)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    save_persona_layer(layer, str(tmp_path / "best"), str(tmp_path / "base"),
                       extra={"encoding": encoding, "max_sentences": 2})
    monkeypatch.setattr(personaweave.encoders, "default_encoder", HashEncoder)
    out = tmp_path / "convai2.json"
    assert main(["eval", "--benchmark", "convai2", "--data", str(FIXTURE), "--persona-layer", str(tmp_path / "best"),
                 "--f1-limit", "0", "--conditions", "none", "tokens", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["conditions"]
    assert rows["tokens"]["ppl"] != rows["none"]["ppl"]
