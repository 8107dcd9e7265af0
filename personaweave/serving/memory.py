"""Long-term memory: each user's past turns embedded with MiniLM; the most relevant come back.

Embeddings are stored with the turns in the database. The top-k search runs in the database
with pgvector when the database is PostgreSQL with the `vector` extension; otherwise it is an
exact cosine search in Python over the user's own turns (a user has hundreds, not millions: a
matrix product is exact and fast). See `Storage.search_memories`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np


class Memory:
    def __init__(self, encoder: Any = None, k: int = 3, min_similarity: float = 0.3) -> None:
        self._encoder = encoder
        self.k = k
        self.min_similarity = min_similarity
        self._lock = threading.Lock()  # the service embeds from several threads; fast tokenizers are not thread-safe

    @property
    def encoder(self):
        if self._encoder is None:
            from personaweave.encoders import default_encoder

            self._encoder = default_encoder()
        return self._encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            vectors = np.asarray(self.encoder.encode(list(texts)), dtype=np.float32)
        return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8, None)

    def recall(self, query: str, storage: Any, user_id: str) -> list[str]:
        """The user's top-k stored turns most similar to `query` (above `min_similarity`), best first."""
        return storage.search_memories(user_id, self.embed([query])[0], self.k, self.min_similarity)

    @staticmethod
    def as_context(memories: Sequence[str]) -> Optional[str]:
        if not memories:
            return None
        return "Things the user said before: " + " | ".join(m[:200] for m in memories)
