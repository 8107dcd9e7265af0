"""Writing files and folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

WEIGHT_FILES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def save_folder_atomically(model: Any, tokenizer: Any, directory: str | os.PathLike, *, keep_other_files: bool = False,
                           **save_kwargs: Any) -> str:
    """`save_pretrained` model and tokenizer into a temp folder beside `directory`, then swap it in.

    If anything fails, `directory` keeps its previous content (or does not exist). With `keep_other_files`
    (rewriting a model folder in place), what the save did not write is copied over from the old folder:
    `adapters/`, the model card, ...; old top-level weight files are not (the new weights replace them, even
    when sharded differently).
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
    try:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if keep_other_files and os.path.isdir(directory):
            for entry in os.listdir(directory):
                old, new = os.path.join(directory, entry), os.path.join(tmp, entry)
                if os.path.lexists(new) or (os.path.isfile(old) and entry.endswith(WEIGHT_FILES)):
                    continue
                if os.path.isdir(old) and not os.path.islink(old):
                    shutil.copytree(old, new, symlinks=True)
                else:
                    shutil.copy2(old, new, follow_symlinks=False)
        replace_folder(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def replace_folder(new: str, target: str) -> None:
    """Put the finished folder `new` at `target` (keeping the old `target` if the swap fails).

    `new` usually comes from `tempfile.mkdtemp` (mode 0700): it gets the usual folder mode
    (0777 less the umask) so a saved model is readable like any other folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)
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


def write_json(data: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """Write `data` as JSON to a temp file beside `path`, then rename it into place."""
    import json

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=indent, default=float)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
