"""Prototypical networks on planted clusters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from personaweave.training.meta_learning import episode_accuracy, evaluate_protonet, sample_episode, train_projection


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


def test_functional_inner_step_equals_a_manual_sgd_step():
    import torch

    from personaweave.training.meta_learning import TraitHead, inner_adapt

    torch.manual_seed(0)
    head = TraitHead(6, 3)
    x, y = torch.randn(4, 6), torch.rand(4, 3)
    adapted = inner_adapt(head, dict(head.named_parameters()), x, y, steps=1, lr=0.1)
    loss = torch.nn.functional.mse_loss(head(x), y)
    loss.backward()
    for name, p in head.named_parameters():
        torch.testing.assert_close(adapted[name], p.detach() - 0.1 * p.grad)


def toy_tasks(num=8, per=30, dim=12, seed=0):
    """Personas whose traits are a linear function of a persona direction, plus reply noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, 4, generator=g)
    tasks = []
    from personaweave.training.meta_learning import TraitTask

    for _ in range(num):
        center = torch.randn(dim, generator=g)
        traits = torch.sigmoid(center @ mixing).repeat(1, 3)[0, :4]
        tasks.append(TraitTask(center + 0.5 * torch.randn(per, dim, generator=g), traits))
    return tasks


def test_adaptation_lowers_query_error_and_bad_support_fails():
    from personaweave.training.meta_learning import adapt, few_shot_mse, pretrain_head

    tasks = toy_tasks()
    head = pretrain_head(tasks[:6], steps=200)
    rng = random.Random(0)
    before = np.mean([few_shot_mse(head, t, 5, 0, 0.5, random.Random(1)) for t in tasks[6:]])
    after = np.mean([few_shot_mse(head, t, 5, 10, 0.5, random.Random(1)) for t in tasks[6:]])
    assert after < before
    with pytest.raises(ValueError, match="support"):
        tasks[6].split(30, rng)
    with pytest.raises(ValueError, match="empty support"):
        import torch

        adapt(head, torch.zeros(0, 12), torch.zeros(0, 4))


@pytest.mark.parametrize("first_order", [True, False])
def test_maml_loop_runs_and_changes_the_head(first_order):
    import torch

    from personaweave.training.meta_learning import maml_train, pretrain_head

    tasks = toy_tasks()
    head = pretrain_head(tasks[:6], steps=50)
    before = [p.detach().clone() for p in head.parameters()]
    trained = maml_train(head, tasks[:6], k=3, inner_steps=2, meta_steps=5, tasks_per_step=2, first_order=first_order)
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters()))
