"""Torch-free prediction with exported ONNX graphs: onnxruntime + tokenizers only.

For serving where memory matters (the trait model behind the adaptation engine): this module
imports neither torch nor transformers. Load it without the package's own `__init__` (which
imports torch) when that matters, e.g. `importlib` by file path, or copy the file: it stands alone.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np


def _padding(folder: str, tokenizer: Any) -> dict[str, Any]:
    """The saved tokenizer's pad token and side (absolute positions make the side matter)."""
    path = os.path.join(folder, "tokenizer_config.json")
    settings = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            settings = json.load(handle)
    pad = settings.get("pad_token") or "[PAD]"
    pad = pad["content"] if isinstance(pad, dict) else pad
    pad_id = tokenizer.token_to_id(pad)
    return {"direction": settings.get("padding_side", "right"), "pad_token": pad,
            "pad_id": 0 if pad_id is None else pad_id}


def _remember(cache: OrderedDict, rows: dict, size: int) -> None:
    """Insert or refresh `rows` as the most recent entries, then evict the oldest beyond `size`."""
    for text, row in rows.items():
        cache[text] = row
        cache.move_to_end(text)
    while len(cache) > size:
        cache.popitem(last=False)


class OnnxTraitModel:
    """`predict_traits(texts) -> list[dict]` over an exported trait model folder
    (`personaweave export onnx TRAIT_DIR --out DIR [--quantize int8]`)."""

    def __init__(self, session: Any, tokenizer: Any, trait_names: Sequence[str], cache_size: int = 4096) -> None:
        self.session, self.tokenizer, self.trait_names = session, tokenizer, list(trait_names)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, list[float]] = OrderedDict()

    @classmethod
    def from_pretrained(cls, folder: str, file_name: str = "model.onnx", max_length: int = 128,
                        threads: int | None = None) -> OnnxTraitModel:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        if config.get("model_type") != "personaweave_traits":
            raise ValueError(f"{folder} does not hold an exported trait model (model_type "
                             f"{config.get('model_type')!r}).")
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {file_name} in {folder}.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(**_padding(folder, tokenizer))
        return cls(session, tokenizer, config["trait_names"])

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(traits (B, 10), engagement (B,)) for a batch of texts."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        traits, engagement = self.session.run(["traits", "engagement"], {"input_ids": ids, "attention_mask": mask})
        return traits, engagement

    def predict_traits(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, float]]:
        """Trait dicts for `texts`, batched, with an LRU cache for repeated inputs."""
        if isinstance(texts, str):
            raise TypeError("predict_traits takes a list of strings.")
        found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            found.update(zip(chunk, self(chunk)[0].tolist()))
        _remember(self._cache, found, self.cache_size)
        return [dict(zip(self.trait_names, found[text])) for text in texts]
