"""Text metrics: distinct-n, similarity to example lines, perplexity; the trait metrics for `evaluate`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

TRAIT_METRICS_PATH = os.path.join(os.path.dirname(__file__), "trait_metrics", "trait_metrics.py")


def load_trait_metrics():
    """The trait metrics as an `evaluate` module, loaded offline from this package."""
    import evaluate

    return evaluate.load(TRAIT_METRICS_PATH)


# --- text metrics ------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the replies (Li et al. 2016)."""
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / len(grams) if grams else 0.0


def example_similarity(encoder: Any, replies: Sequence[str], examples: Sequence[str]) -> np.ndarray:
    """For each reply, the max cosine to the persona's example responses."""
    if not replies:
        return np.zeros(0)
    r, e = encoder.encode(list(replies)), encoder.encode(list(examples))
    return (np.asarray(r) @ np.asarray(e).T).max(1)


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
               vocab_limit: Optional[int] = None) -> float:
    """Token-level perplexity of plain text (no persona tokens, no chat template).

    `vocab_limit` keeps only the first logits: the bare base's vocabulary, before persona tokens
    were appended to it.
    """
    total, count = 0.0, 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=128)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            logits = logits[..., :vocab_limit] if vocab_limit else logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    finally:
        tokenizer.padding_side = side
    return math.exp(total / max(count, 1))
