"""Saving model folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any


def save_folder_atomically(model: Any, tokenizer: Any, directory: str | os.PathLike, **save_kwargs: Any) -> str:
    """`save_pretrained` model and tokenizer into a temp folder beside `directory`, then swap it in.

    If anything fails, `directory` keeps its previous content (or does not exist).
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
    try:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _swap_in(new: str, target: str) -> None:
    if not os.path.exists(target):
        os.replace(new, target)
        return
    old = target + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
