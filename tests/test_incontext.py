"""Robust trait JSON parsing and the NNLS trait -> persona blend mapping."""

from __future__ import annotations

import pytest

from personaweave.models.personas import TRAITS
from personaweave.traits.incontext import blend_traits_vector, parse_traits, traits_to_blend
from personaweave.zoo import load_default_personas


def test_parse_traits_from_messy_answers():
    assert parse_traits('Sure! {"humor": 0.9, "empathy": 1.7, "charm": 0.3, "formality": "high"} hope it helps')[
        "humor"] == 0.9
    parsed = parse_traits("{'humor': 0.2, 'empathy': -1,}")
    assert parsed["humor"] == 0.2 and parsed["empathy"] == 0.0 and parsed["formality"] == 0.5
    assert parse_traits("no json here") == {t: 0.5 for t in TRAITS}
    assert parse_traits("{broken {\"openness\": 0.7}")["openness"] == 0.7
    assert parse_traits("", default={"humor": 0.1}) == {"humor": 0.1}
    assert set(parse_traits('{"HUMOR ": 1}')) == set(TRAITS)
    cut = 'This is a JSON object:\n```json\n{\n    "extraversion": 0.4,\n    "humor": 1.3,\n    "empathy": 0.8,\n    "enth'
    truncated = parse_traits(cut)  # a small model's answer cut off by the token limit
    assert (truncated["extraversion"], truncated["humor"], truncated["empathy"]) == (0.4, 1.0, 0.8)
    assert truncated["formality"] == 0.5
    assert parse_traits("humor: 0.9 but no object") == {t: 0.5 for t in TRAITS}


def test_nnls_recovers_a_planted_mixture():
    personas = load_default_personas()
    planted = {"pirate": 0.6, "counselor": 0.4}
    weights = traits_to_blend(blend_traits_vector(planted, personas), personas)
    assert set(weights) == set(planted)
    for name, w in planted.items():
        assert weights[name] == pytest.approx(w, abs=0.02)


def test_traits_to_blend_bad_input():
    personas = load_default_personas()
    with pytest.raises(ValueError, match="Unknown traits"):
        traits_to_blend({"charm": 1.0}, personas)
    with pytest.raises(ValueError, match="at least one"):
        traits_to_blend({}, personas)
    with pytest.raises(ValueError, match="No persona"):
        traits_to_blend({"humor": 1.0}, [])


class StubLM:
    """Records the prompt and answers with fixed text (the LM is not what is under test here)."""

    def __init__(self, answer):
        self.answer, self.seen = answer, None

    def __call__(self, messages):
        self.seen = messages
        return self.answer


def test_in_context_estimator_retrieves_similar_examples_and_parses(hash_encoder):
    from personaweave.traits.incontext import InContextTraitEstimator

    lm = StubLM('Here you go: {"humor": 0.8, "formality": 0.1}')
    bank = InContextTraitEstimator(["ahoy matey", "beep logic", "tea please sir"],
                                   [{"humor": 0.9}, {"humor": 0.2}, {"formality": 1.0}], lm, encoder=hash_encoder,
                                   shots=2)
    traits = bank.estimate("ahoy matey", recent_turns=[])
    assert traits["humor"] == 0.8 and traits["formality"] == 0.1 and traits["empathy"] == 0.5
    assert "Text: ahoy matey" in lm.seen[1]["content"]  # the identical example is retrieved first
    with pytest.raises(ValueError, match="empty context"):
        bank.estimate("  ")
    with pytest.raises(ValueError, match="as many"):
        InContextTraitEstimator(["a"], [], lm, encoder=hash_encoder)
