"""A/B testing: stable assignment, tests, sequential boundaries, and bad input."""

from __future__ import annotations

from collections import Counter

import pytest

from personaweave.serving.adaptation.abtest import (
    UserExperiment,
    assign,
    group_sequential_boundaries,
    prob_b_beats_a,
    simulate_sequential,
    two_proportion_z,
)


def test_assignment_is_stable_and_follows_the_weights():
    variants = {"a": 3, "b": 1}
    assert all(assign(f"u{i}", "exp", variants) == assign(f"u{i}", "exp", variants) for i in range(100))
    counts = Counter(assign(f"u{i}", "exp", variants) for i in range(20000))
    assert counts["a"] / 20000 == pytest.approx(0.75, abs=0.015)
    other = [assign(f"u{i}", "exp", variants, salt="x") for i in range(200)]
    assert other != [assign(f"u{i}", "exp", variants) for i in range(200)]  # the salt reshuffles


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        UserExperiment("e", {"a": 0, "b": 0})
    with pytest.raises(ValueError, match=">= 0"):
        UserExperiment("e", {"a": -1, "b": 2})
    with pytest.raises(ValueError, match="exactly two"):
        UserExperiment("e", {"a": 1})


def test_z_test_and_bayes():
    z, p = two_proportion_z(100, 1000, 150, 1000)
    assert z > 3 and p < 0.001
    assert prob_b_beats_a(100, 1000, 150, 1000) > 0.99
    assert prob_b_beats_a(100, 1000, 100, 1000) == pytest.approx(0.5, abs=0.02)


def test_boundaries_match_published_values():
    pocock = group_sequential_boundaries(5, 0.05, "pocock")
    assert pocock[0] == pytest.approx(2.413, abs=0.02)  # Pocock (1977), K = 5
    obf = group_sequential_boundaries(5, 0.05, "obrien_fleming")
    assert obf[-1] == pytest.approx(2.040, abs=0.02) and obf[0] == pytest.approx(4.562, abs=0.05)


def test_peeking_inflates_false_positives_and_the_correction_holds_alpha():
    result = simulate_sequential(runs=400, users=1000, peek_every=100, seed=1)
    assert result["naive_rejection_rate"] > 0.1
    assert 0.02 <= result["corrected_rejection_rate"] <= 0.08
