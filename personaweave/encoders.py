"""Sentence encoder: a description, profile or reply -> a unit-norm vector (persona vectors, similarity)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Optional

import numpy as np

from personaweave.zoo import minilm_path


class SentenceEncoder:
    """A sentence-transformers encoder; by default the all-MiniLM-L6-v2 shipped on PyPI (384-d).

    Vectors are L2-normalised, so cosine similarity is a dot product and blends of unit vectors
    stay comparable.
    """

    def __init__(self, model_name_or_path: Optional[str] = None, device: Optional[str] = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_name_or_path = model_name_or_path or minilm_path()
        self.model = SentenceTransformer(self.model_name_or_path, device=device or "cpu")
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"{self.model_name_or_path} does not report an embedding size.")
        self.dim = int(dim)

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
        """(len(texts), dim) float32 array of unit-norm embeddings."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string.")
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.model.encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=show_progress_bar,
        ).astype(np.float32)


@lru_cache(maxsize=4)
def cached_encoder(model_name_or_path: Optional[str] = None) -> SentenceEncoder:
    """One encoder per path per process: loading MiniLM takes about a second."""
    return SentenceEncoder(model_name_or_path)


def default_encoder() -> SentenceEncoder:
    """The shipped MiniLM encoder (one per process)."""
    return cached_encoder(None)


def _install_as_model_default() -> None:
    """Descriptions given to `add_persona` without an `encoder=` are encoded by the shipped MiniLM.

    The model files know nothing about weights (they are saved as remote code); this layer plugs the
    default in, on import of `personaweave.encoders` (which `personaweave.loading` and the package's
    model names import)."""
    from personaweave.models import modeling_personaweave

    modeling_personaweave.DEFAULT_ENCODER_FACTORY = default_encoder


_install_as_model_default()
