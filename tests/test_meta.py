"""Prototypical networks on planted clusters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from personaweave.meta import episode_accuracy, evaluate_protonet, sample_episode, train_projection


def planted(num_personas=12, per=20, dim=16, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_personas, dim)) * 2
    return {f"p{i}": centers[i] + noise * rng.normal(size=(per, dim)) for i in range(num_personas)}


def test_prototypes_separate_planted_personas():
    acc, ci = evaluate_protonet(planted(), n_way=5, k_shot=5, episodes=50)
    assert acc > 0.9 and ci < 0.05
    one_shot, _ = evaluate_protonet(planted(), n_way=5, k_shot=1, episodes=50)
    assert one_shot < acc  # more shots, better prototypes


def test_perfectly_separated_episode_is_fully_accurate():
    data = {f"p{i}": np.tile(np.eye(8)[i] * 10, (6, 1)) for i in range(8)}
    episode = sample_episode(data, 5, 2, 3, random.Random(0))
    assert episode.support.shape == (5, 2, 8) and episode.query.shape == (5, 3, 8)
    assert episode_accuracy(episode) == 1.0


def test_projection_learns_to_ignore_a_distracting_direction():
    """Personas differ in dims 0-3; a large shared nuisance (topic) varies in dims 4-15."""
    rng = np.random.default_rng(1)
    data = {}
    for i in range(20):
        signal = np.zeros(16)
        signal[:4] = rng.normal(size=4) * 1.5
        data[f"p{i}"] = signal + np.concatenate([0.3 * rng.normal(size=(20, 4)), 3 * rng.normal(size=(20, 12))], 1)
    train = {k: v for k, v in list(data.items())[:14]}
    test = {k: v for k, v in list(data.items())[14:]}
    raw, _ = evaluate_protonet(test, 5, 5, episodes=100)
    projection = train_projection(train, steps=300, dim=8)
    learned, _ = evaluate_protonet(test, 5, 5, episodes=100, projection=projection)
    assert learned > raw + 0.1


def test_bad_episode_requests():
    with pytest.raises(ValueError, match="needs 5 personas"):
        sample_episode(planted(num_personas=3), 5, 1, 1, random.Random(0))
    with pytest.raises(ValueError, match="needs 2 personas"):
        sample_episode(planted(per=4), 2, 5, 1, random.Random(0))  # k larger than available examples
    with pytest.raises(ValueError, match="at least 1"):
        sample_episode(planted(), 2, 0, 1, random.Random(0))
