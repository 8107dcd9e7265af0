"""Latent persona discovery: cluster dialogue embeddings into personas.

Each unit (one reply, or a list of replies from one speaker/conversation, averaged) is embedded
with the shipped MiniLM (or any encoder, or precomputed embeddings such as a PersonaWeave
model's hidden states), optionally centred per group (e.g. per user turn: replies to the same
prompt share its topic, which would otherwise dominate the clusters), clustered with k-means,
k chosen by silhouette when not given. Each cluster becomes a `Persona`: vector = centroid,
name and description from its most distinctive terms (c-TF-IDF) and nearest examples, traits
= mean of the members' traits where known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from personaweave.models.personas import TRAITS, Persona

# sklearn's English stop words lack contractions and fillers, which then top every cluster
CONTRACTIONS = frozenset("i'm you're it's that's i've don't just i'd i'll can't let's we're they're there's "
                         "what's isn't doesn't didn't won't like really sure oh yes yeah".split())


@dataclass
class Discovery:
    """Everything a clustering run produced; `personas` is what `discover_personas` returns."""

    personas: list[Persona]
    labels: np.ndarray
    k: int
    silhouette: dict[int, float] = field(default_factory=dict)


def _texts_of(unit: Any) -> list[str]:
    return [unit] if isinstance(unit, str) else [str(t) for t in unit]


def embed_units(units: Sequence[Any], encoder: Any = None) -> np.ndarray:
    """(n, dim) unit-norm embeddings; a unit that is a list of texts gets the mean of its texts."""
    if encoder is None:
        from personaweave.encoders import default_encoder

        encoder = default_encoder()
    texts = [_texts_of(u) for u in units]
    flat = [t for group in texts for t in group]
    vectors = np.asarray(encoder.encode(flat), dtype=np.float32)
    out, start = [], 0
    for group in texts:
        out.append(vectors[start:start + len(group)].mean(0))
        start += len(group)
    return _unit(np.stack(out))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8, None)


def center_within_groups(embeddings: np.ndarray, groups: Sequence[Any]) -> np.ndarray:
    """Subtract each group's mean embedding (groups of size 1 are left as they are)."""
    out = embeddings.copy()
    groups = np.asarray(groups, dtype=object)
    for g in set(groups.tolist()):
        idx = np.where(groups == g)[0]
        if len(idx) > 1:
            out[idx] -= embeddings[idx].mean(0)
    return _unit(out)


def cluster_embeddings(embeddings: np.ndarray, k: Optional[int] = None, k_range: tuple[int, int] = (2, 12),
                       seed: int = 0) -> tuple[np.ndarray, int, dict[int, float], np.ndarray]:
    """k-means labels, the k used, silhouette per k tried, and the centroids."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    if n == 0:
        raise ValueError("Cannot discover personas in an empty dataset.")
    if k is not None:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must be between 1 and the number of samples ({n}).")
        candidates = [k]
    else:
        low, high = k_range
        candidates = list(range(max(2, low), min(high, n - 1) + 1))
        if not candidates:
            raise ValueError(f"Need at least 3 samples to choose k by silhouette, got {n}.")
    scores: dict[int, float] = {}
    best = None
    for kk in candidates:
        model = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(embeddings)
        if 1 < kk < n:
            scores[kk] = float(silhouette_score(embeddings, model.labels_, metric="cosine"))
        if best is None or (kk in scores and scores[kk] > scores.get(best[0], -2)):
            best = (kk, model)
    kk, model = best  # type: ignore[misc]
    return model.labels_, kk, scores, model.cluster_centers_


def distinctive_terms(texts: Sequence[str], labels: np.ndarray, top: int = 5) -> dict[int, list[str]]:
    """c-TF-IDF: terms frequent in one cluster's documents and rare across clusters."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

    clusters = sorted(set(labels.tolist()))
    docs = [" ".join(t for t, lab in zip(texts, labels) if lab == c) for c in clusters]
    stop = sorted(ENGLISH_STOP_WORDS | CONTRACTIONS)
    vectorizer = CountVectorizer(stop_words=stop, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z']+\b")
    try:
        counts = vectorizer.fit_transform(docs).toarray().astype(float)
    except ValueError:  # only stop words
        return {c: [] for c in clusters}
    tf = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    idf = np.log(1 + counts.sum(1).mean() / np.clip(counts.sum(0), 1, None))
    scores = tf * idf
    vocab = np.array(vectorizer.get_feature_names_out())
    return {c: vocab[np.argsort(-scores[i])[:top]].tolist() for i, c in enumerate(clusters)}


def cluster_dialogues(
    units: Sequence[Any],
    k: Optional[int] = None,
    *,
    traits: Optional[Sequence[Sequence[float]]] = None,
    encoder: Any = None,
    embeddings: Optional[np.ndarray] = None,
    center_groups: Optional[Sequence[Any]] = None,
    k_range: tuple[int, int] = (2, 12),
    seed: int = 0,
    vector_embeddings: Optional[np.ndarray] = None,
) -> Discovery:
    """Cluster dialogue units into latent personas (see module docstring).

    `vector_embeddings` (default: the clustering embeddings before centring) are where the
    personas' vectors, the cluster centroids, are taken: they must live in the encoder's space
    to be usable as persona vectors.
    """
    if not len(units):
        raise ValueError("Cannot discover personas in an empty dataset.")
    emb = embed_units(units, encoder) if embeddings is None else _unit(np.asarray(embeddings, dtype=np.float32))
    if len(emb) != len(units):
        raise ValueError(f"{len(emb)} embeddings for {len(units)} units.")
    # centroids and nearest examples live in the uncentred space: that is a persona vector
    raw = emb if vector_embeddings is None else _unit(np.asarray(vector_embeddings, dtype=np.float32))
    if center_groups is not None:
        emb = center_within_groups(emb, center_groups)
    labels, kk, scores, _ = cluster_embeddings(emb, k, k_range, seed)
    texts = [" ".join(_texts_of(u)) for u in units]
    terms = distinctive_terms(texts, labels)
    personas, used = [], set()
    for c in sorted(set(labels.tolist())):
        idx = np.where(labels == c)[0]
        centroid = _unit(raw[idx].mean(0))
        nearest = idx[np.argsort(-(raw[idx] @ centroid))[:3]]
        words = terms.get(c) or []
        name = _unique_name(f"latent-{c}-{words[0]}" if words else f"latent-{c}", used)
        description = (f"a speaker whose replies stand out for: {', '.join(words)}" if words
                       else "a speaker with no distinctive vocabulary")
        personas.append(Persona(name=name, description=description, examples=[texts[i][:300] for i in nearest],
                                traits=_mean_traits(traits, idx), vector=_as_tensor(centroid)))
    return Discovery(personas, labels, kk, scores)


def discover_personas(units: Sequence[Any], k: Optional[int] = None, **kwargs: Any) -> list[Persona]:
    """Latent personas of `units` (replies, or lists of one speaker's replies), ready for
    `model.add_persona(p.name, p.description, vector=p.vector, tokenizer=...)`."""
    return cluster_dialogues(units, k, **kwargs).personas


def _mean_traits(traits: Optional[Sequence[Sequence[float]]], idx: np.ndarray) -> Optional[dict[str, float]]:
    if traits is None:
        return None
    values = np.asarray([traits[i] for i in idx], dtype=float)
    if values.ndim != 2 or values.shape[1] != len(TRAITS):
        raise ValueError(f"traits must be rows of {len(TRAITS)} values.")
    means = np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=0) if np.isfinite(values).any() else None
    if means is None:
        return None
    return {t: float(np.clip(v, 0, 1)) for t, v in zip(TRAITS, means) if np.isfinite(v)}


def _unique_name(name: str, used: set[str]) -> str:
    import re

    base = re.sub(r"[^A-Za-z0-9_.\-]", "", name)[:60] or "latent"
    candidate, i = base, 1
    while candidate in used:
        i += 1
        candidate = f"{base}-{i}"
    used.add(candidate)
    return candidate


def _as_tensor(x: np.ndarray):
    import torch

    return torch.as_tensor(np.asarray(x, dtype=np.float32))
