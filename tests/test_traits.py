"""The trait model on a tiny BERT, and the trait metrics module."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, BertConfig

from personaweave import PersonaTraitConfig, PersonaTraitModel
from personaweave.evaluation.metrics import load_trait_metrics
from personaweave.testing import tiny_tokenizer


@pytest.fixture
def tiny_traits():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = PersonaTraitConfig(encoder_config=BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))
    return PersonaTraitModel(config).eval(), tok


def test_forward_shapes_and_masked_loss(tiny_traits):
    model, tok = tiny_traits
    enc = tok(["hello what", "why is the sea good ?"], return_tensors="pt", padding=True)
    labels = torch.full((2, 10), float("nan"))
    labels[0, :5] = 1.0
    out = model(**enc, labels=labels)
    assert out.traits.shape == (2, 10) and ((out.traits > 0) & (out.traits < 1)).all()
    expected = ((out.traits[0, :5] - 1.0) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="no known value"):
        model(**enc, labels=torch.full((2, 10), float("nan")))


def test_predict_traits_is_batched_cached_and_round_trips(tmp_path, tiny_traits):
    model, tok = tiny_traits
    first = model.predict_traits(["hello", "sea ship", "hello"], tok, batch_size=1)
    assert len(first) == 3 and first[0] == first[2] and set(first[0]) >= {"humor", "empathy"}
    assert len(model._cache) == 2
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, PersonaTraitModel)
    assert loaded.predict_traits(["hello"], tok)[0] == pytest.approx(first[0])
    with pytest.raises(TypeError):
        model.predict_traits("hello", tok)


def test_trait_cache_eviction_never_loses_a_result_of_the_same_call(tiny_traits):
    model, tok = tiny_traits
    model._cache.clear()
    x, y = model.predict_traits(["hello", "sea ship"], tok, cache_size=2)
    again = model.predict_traits(["hello", "what now"], tok, cache_size=2)  # "hello" is the oldest entry
    assert again[0] == x and list(model._cache) == ["hello", "what now"]
    many = model.predict_traits(["a sea", "b ship", "c hello", "hello"], tok, cache_size=2)
    assert len(many) == 4 and many[3] == x and len(model._cache) == 2


def test_trait_metrics():
    metric = load_trait_metrics()
    result = metric.compute(predictions=[[0.5] * 10, [0.2] * 10, [0.9] * 10],
                            references=[[0.55] * 10, [0.1] * 10, [float("nan")] * 5 + [0.5] * 5])
    assert result["mae"] == pytest.approx((10 * 0.05 + 10 * 0.1 + 5 * 0.4) / 25, abs=1e-5)
    assert result["within_tolerance"] == pytest.approx(20 / 25)
    assert "pearson_humor" in result and "pearson_extraversion" not in result
    assert math.isfinite(result["pearson_humor"])


def test_student_copies_alternate_layers_and_int8_stays_close(tiny_traits):
    from transformers import BertConfig

    from personaweave.training.distillation import make_student, quantize_torch_dynamic_int8

    tok = tiny_traits[1]
    config = PersonaTraitConfig(encoder_config=BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                                                          num_attention_heads=4, intermediate_size=64))
    teacher = PersonaTraitModel(config).eval()
    student = make_student(teacher, num_layers=2).eval()
    assert student.config.encoder_config.num_hidden_layers == 2
    torch.testing.assert_close(student.encoder.encoder.layer[1].output.dense.weight,
                               teacher.encoder.encoder.layer[3].output.dense.weight)
    torch.testing.assert_close(student.trait_head.weight, teacher.trait_head.weight)
    enc = tok(["hello what", "why is the sea good ?"], return_tensors="pt", padding=True)
    q = quantize_torch_dynamic_int8(student)
    assert (q(**enc).traits - student(**enc).traits).abs().max() < 0.05
    with pytest.raises(ValueError, match="num_layers"):
        make_student(teacher, num_layers=9)
