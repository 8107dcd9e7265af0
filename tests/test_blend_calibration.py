"""Balanced blends: bisection on the first parent's weight, and measuring a blend as the demo makes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_adapters import two_adapters  # noqa: F401  (fixture)

from personaweave.chat import chat
from personaweave.generation import DECODING, generate_replies
from personaweave.sub_personalities import blend_sub_personalities, master_only, sub_personalities
from personaweave.training.blend_calibration import balance_weight, blend_parent_shares, calibrate_blend

TURNS = ["hello there", "what should I read?", "tell me about the sea", "how are you today?"]


def steep_curve(crossing: float):
    """Shares of a blend whose first parent takes over fast past `crossing` (like pirate + butler), and
    where a tenth of replies read as neither parent."""
    def measure(x: float) -> tuple[float, float]:
        first = 0.9 / (1.0 + np.exp(-25.0 * (x - crossing)))
        return first, 0.9 - first
    return measure


@pytest.mark.parametrize("crossing,target", [(0.33, 0.5), (0.62, 0.5), (0.4, 0.7)])
def test_bisection_finds_the_weight_of_the_asked_proportion(crossing, target):
    measure = steep_curve(crossing)
    weight, probes = balance_weight(measure, target, rounds=7)
    first, second = measure(weight)
    assert abs(first / (first + second) - target) < 0.08
    assert len(probes) == 7 and probes[0].weight == target  # starts where it was asked
    # the requested weight itself is far off on these curves: calibration is what moves it
    start_first, start_second = measure(target)
    assert abs(start_first / (start_first + start_second) - target) > 0.15


def test_bisection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        balance_weight(steep_curve(0.5), 1.0)
    with pytest.raises(ValueError, match="rounds"):
        balance_weight(steep_curve(0.5), 0.5, rounds=0)
    with pytest.raises(ValueError, match="low"):
        balance_weight(steep_curve(0.5), 0.5, low=0.6, high=0.4)


class LengthJudge:
    """A stand-in selection judge: reads a reply as robot, pirate or nobody by its length mod 3."""

    names = ["robot", "pirate", "other"]

    def persona_probs(self, replies):
        return np.eye(3)[[len(r) % 3 for r in replies]]


def expected_shares(peft, tok, weights, judge, adapters=True):
    """The same measurement done by hand: a blended persona, the blended adapter (or every adapter off),
    the deployed decoding."""
    model = peft.get_base_model()
    model.add_persona("by_hand", blend=weights, tokenizer=tok)
    conversations = [chat("by_hand", t, model=model) for t in TURNS]
    if adapters:
        blend_sub_personalities(peft, weights, name="by_hand_lora")
        texts = generate_replies(peft, tok, conversations, max_new_tokens=8, **DECODING).texts
        peft.delete_adapter("by_hand_lora")
    else:
        with master_only(peft):
            texts = generate_replies(model, tok, conversations, max_new_tokens=8, **DECODING).texts
    model.remove_persona("by_hand")
    read = [judge.names[i] if t.strip() else "" for i, t in zip(judge.persona_probs(texts).argmax(-1), texts)]
    return {p: sum(r == p for r in read) / len(read) for p in weights}, texts


def test_parent_shares_measure_the_blend_with_its_adapters_and_clean_up(two_adapters):  # noqa: F811
    peft, tok = two_adapters
    model = peft.get_base_model()
    peft.set_adapter("pirate")
    names, vocab = list(model.config.persona_names), len(tok)
    judge = LengthJudge()
    weights = {"robot": 0.8, "pirate": 0.2}
    got = blend_parent_shares(model, tok, "mix", weights, judge, TURNS, peft=peft, max_new_tokens=8)
    # cleaned up: no persona or adapter left behind; the active adapter is the one before; only the
    # tokens of the name are reserved, which adding the blend under that name then uses
    assert list(model.config.persona_names) == names
    assert set(sub_personalities(peft)) == {"robot", "pirate"} and peft.active_adapter == "pirate"
    assert len(tok) == vocab + model.config.num_persona_tokens
    model.add_persona("mix", blend=weights, tokenizer=tok)
    assert len(tok) == vocab + model.config.num_persona_tokens
    model.remove_persona("mix")
    want, texts = expected_shares(peft, tok, weights, judge)
    assert got == want
    # and the blend matters: other weights give other replies
    _, other = expected_shares(peft, tok, {"robot": 0.2, "pirate": 0.8}, judge)
    assert other != texts
    # tokens alone (as serve answers blends): every adapter off, whichever one is active
    tokens_only = blend_parent_shares(model, tok, "mix", weights, judge, TURNS, peft=peft, adapters=False,
                                      max_new_tokens=8)
    want_tokens, tokens_texts = expected_shares(peft, tok, weights, judge, adapters=False)
    assert tokens_only == want_tokens and tokens_texts != texts


def test_calibrate_blend_returns_a_measured_weight(two_adapters):  # noqa: F811
    peft, tok = two_adapters
    model = peft.get_base_model()
    torch.manual_seed(0)
    result = calibrate_blend(model, tok, "mix", {"robot": 1, "pirate": 1}, LengthJudge(), TURNS, peft=peft, rounds=3,
                             max_new_tokens=8)
    assert result.requested == {"robot": 0.5, "pirate": 0.5}
    assert len(result.probes) == 3 and result.best.weight == result.weights["robot"]
    assert result.weights["robot"] + result.weights["pirate"] == pytest.approx(1.0)
    assert set(result.to_dict()["shares"]) == {"robot", "pirate"}


def test_calibrate_blend_rejects_what_it_cannot_balance(two_adapters):  # noqa: F811
    peft, tok = two_adapters
    model = peft.get_base_model()
    with pytest.raises(ValueError, match="two parents"):
        calibrate_blend(model, tok, "mix", {"robot": 1.0}, LengthJudge(), TURNS)
    with pytest.raises(ValueError, match="user turn"):
        calibrate_blend(model, tok, "mix", {"robot": 0.5, "pirate": 0.5}, LengthJudge(), [])
    with pytest.raises(KeyError, match="Unknown persona"):
        calibrate_blend(model, tok, "mix", {"robot": 0.5, "butler": 0.5}, LengthJudge(), TURNS)

    class NarrowJudge(LengthJudge):
        names = ["robot", "other"]

    with pytest.raises(KeyError, match="does not know"):
        blend_parent_shares(model, tok, "mix", {"robot": 0.5, "pirate": 0.5}, NarrowJudge(), TURNS)
    with pytest.raises(ValueError, match="already exists"):
        blend_parent_shares(model, tok, "robot", {"robot": 0.5, "pirate": 0.5}, LengthJudge(), TURNS)
