"""Few-shot persona recognition with prototypical networks (Snell et al. 2017).

Each persona's prototype is the mean embedding of its k support replies; a query reply goes to
the nearest prototype (squared Euclidean distance). Embeddings come from the shipped MiniLM,
optionally through a linear projection meta-trained on episodes drawn from training personas,
so the projection learns what separates speakers rather than topics.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Episode:
    support: torch.Tensor  # (N, k, D)
    query: torch.Tensor  # (N, q, D)


def sample_episode(embeddings: Mapping[str, np.ndarray], n_way: int, k_shot: int, n_query: int,
                   rng: random.Random) -> Episode:
    """An N-way k-shot episode from personas that have at least k + q examples."""
    eligible = [name for name, e in embeddings.items() if len(e) >= k_shot + n_query]
    if k_shot < 1 or n_query < 1:
        raise ValueError("k_shot and n_query must be at least 1.")
    if len(eligible) < n_way:
        raise ValueError(f"{n_way}-way {k_shot}-shot needs {n_way} personas with >= {k_shot + n_query} "
                         f"examples; only {len(eligible)} have that many.")
    support, query = [], []
    for name in rng.sample(eligible, n_way):
        idx = rng.sample(range(len(embeddings[name])), k_shot + n_query)
        rows = torch.as_tensor(np.asarray(embeddings[name])[idx], dtype=torch.float32)
        support.append(rows[:k_shot])
        query.append(rows[k_shot:])
    return Episode(torch.stack(support), torch.stack(query))


def episode_logits(episode: Episode, projection: nn.Module | None = None) -> torch.Tensor:
    """(N * q, N) logits = negative squared distances of queries to the prototypes."""
    support, query = episode.support, episode.query
    if projection is not None:
        support, query = projection(support), projection(query)
    prototypes = support.mean(1)  # (N, D)
    flat = query.reshape(-1, query.shape[-1])  # (N * q, D)
    return -torch.cdist(flat, prototypes) ** 2


def episode_accuracy(episode: Episode, projection: nn.Module | None = None) -> float:
    n_way, n_query = episode.query.shape[:2]
    target = torch.arange(n_way).repeat_interleave(n_query)
    with torch.no_grad():
        return float((episode_logits(episode, projection).argmax(-1) == target).float().mean())


def evaluate_protonet(embeddings: Mapping[str, np.ndarray], n_way: int, k_shot: int, episodes: int = 500,
                      n_query: int = 5, projection: nn.Module | None = None, seed: int = 0) -> tuple[float, float]:
    """Mean accuracy and its 95% interval half-width over random episodes."""
    rng = random.Random(seed)
    accs = [episode_accuracy(sample_episode(embeddings, n_way, k_shot, n_query, rng), projection)
            for _ in range(episodes)]
    return float(np.mean(accs)), float(1.96 * np.std(accs) / np.sqrt(len(accs)))


def train_projection(embeddings: Mapping[str, np.ndarray], n_way: int = 5, k_shot: int = 5, n_query: int = 5,
                     steps: int = 500, dim: int = 128, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Meta-train a linear projection on episodes from the training personas."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    in_dim = np.asarray(next(iter(embeddings.values()))).shape[-1]
    projection = nn.Linear(in_dim, dim, bias=False)
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr)
    for _ in range(steps):
        episode = sample_episode(embeddings, n_way, k_shot, n_query, rng)
        target = torch.arange(n_way).repeat_interleave(n_query)
        loss = nn.functional.cross_entropy(episode_logits(episode, projection), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return projection.eval()


def group_embeddings(texts: Sequence[str], labels: Sequence[str], encoder=None) -> dict[str, np.ndarray]:
    """{label: (n, D) unit-norm embeddings} for texts grouped by persona/speaker label."""
    from .discovery import embed_units

    vectors = embed_units(list(texts), encoder)
    out: dict[str, list[np.ndarray]] = {}
    for v, label in zip(vectors, labels):
        out.setdefault(label, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}
