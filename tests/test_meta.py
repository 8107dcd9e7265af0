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


def _finite_difference(fn, params: dict, eps: float = 1e-6) -> list:
    """Central differences of the scalar fn(params) for every entry of every parameter (float64)."""
    import torch

    grads = []
    for name, value in params.items():
        grad = torch.zeros_like(value)
        for i in range(value.numel()):
            shifted = {n: v.detach().clone() for n, v in params.items()}
            shifted[name].view(-1)[i] += eps
            up = fn(shifted)
            shifted[name].view(-1)[i] -= 2 * eps
            grad.view(-1)[i] = (up - fn(shifted)) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_maml_meta_gradient_matches_finite_differences(inner_steps):
    """The meta-gradient itself, on a tiny head in float64: second order = d/d(theta) of the query
    loss after the inner SGD steps (finite differences through the whole inner loop); first order =
    the query gradient at the adapted point. The two differ by the inner loop's Hessian term, so a
    second-order run that silently drops it (or a first-order one taken at the wrong point) fails."""
    import torch
    from torch.func import functional_call

    from personaweave.training.meta_learning import TraitHead, inner_adapt, task_meta_loss

    torch.manual_seed(0)
    head = TraitHead(5, 3).double()
    sx, qx = torch.randn(4, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    y = torch.rand(3, dtype=torch.float64)
    split = (sx, y.expand(4, -1), qx, y.expand(6, -1))
    lr = 2.0  # large enough that the second-order term is far above the finite-difference error

    def meta_objective(params):  # L(theta) = query loss at theta adapted on the support set
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        adapted = inner_adapt(head, leaves, sx, split[1], inner_steps, lr)
        return float(torch.nn.functional.mse_loss(functional_call(head, adapted, (qx,)), split[3]))

    theta = {n: p.detach() for n, p in head.named_parameters()}
    loss, wrt = task_meta_loss(head, split, inner_steps, lr, first_order=False)
    second = torch.autograd.grad(loss, wrt)
    expected_second = _finite_difference(meta_objective, theta)
    for got, want in zip(second, expected_second):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)

    loss_fo, wrt_fo = task_meta_loss(head, split, inner_steps, lr, first_order=True)
    first = torch.autograd.grad(loss_fo, wrt_fo)
    assert float(loss_fo) == pytest.approx(float(loss))  # same objective value, different gradient
    adapted = {n: p.detach() for n, p in inner_adapt(head, dict(head.named_parameters()), sx, split[1],
                                                     inner_steps, lr).items()}
    query_loss = lambda params: float(torch.nn.functional.mse_loss(functional_call(head, params, (qx,)), split[3]))  # noqa: E731
    for got, want in zip(first, _finite_difference(query_loss, adapted)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    gap = sum(float((a - b).norm()) for a, b in zip(first, second))
    assert gap > 1e-3 * sum(float(g.norm()) for g in second)


def test_maml_adapted_loss_on_held_out_tasks_beats_the_pretrained_init():
    """End to end: after meta-training, adapting on k support examples of held-out personas gives a
    lower query error than the same adaptation from the plain pre-trained head."""
    import copy

    from personaweave.training.meta_learning import few_shot_mse, maml_train, pretrain_head

    tasks = toy_tasks(num=12)
    init = pretrain_head(tasks[:8], steps=200)
    meta = maml_train(copy.deepcopy(init), tasks[:8], k=3, inner_steps=3, inner_lr=0.5, meta_lr=1e-2, meta_steps=60,
                      tasks_per_step=4)

    def held_out(head):
        return np.mean([few_shot_mse(head, t, 3, 3, 0.5, random.Random(s)) for t in tasks[8:] for s in range(5)])

    assert held_out(meta) < held_out(init)
