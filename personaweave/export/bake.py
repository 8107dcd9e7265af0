"""Bake a PersonaWeave model into a plain checkpoint of its base architecture.

For a fixed bank the persona soft vectors are constants, so persona token `<|persona:NAME:i|>` is
just a token whose input-embedding row *is* soft vector `i` of persona NAME. The baked folder is
an ordinary `LlamaForCausalLM` (or whatever the wrapped LM is): no remote code, no personaweave,
so transformers, stock Optimum, vLLM, TGI and llama.cpp run it as they run the base model.

What `bake` writes (to a temp folder beside `out_dir`, renamed into place when complete):

- `model.safetensors` + `config.json`: the wrapped LM with
  - input rows of the persona tokens = the soft vectors (blends included), exactly what
    `PersonaWeaveForCausalLM` substitutes at its embedding step;
  - the output side untouched for every ordinary token: tied embeddings are untied (the head
    keeps the original rows) and the persona tokens' output rows are zeroed;
- `generation_config.json` with every persona token in `suppress_tokens`, so `generate()` never
  emits one (PersonaWeave masks them in its forward; a plain LM cannot, hence the config);
- the tokenizer with the reserved tokens of the baked personas (other personas' tokens removed);
- `adapters/<persona>/`: the LoRA sub-personalities as standard peft adapters of the plain LM
  (what vLLM `--enable-lora` and TGI load per request), or, with `merge_lora=NAME`, that one
  adapter merged into the weights (W += alpha / r * B @ A) and no adapters beside it;
- `persona_tokens.json`: each persona's prompt, token ids, description, blend and adapter.

Selecting persona X with the baked checkpoint is what `personaweave.chat("X", text)` builds: a
system message whose content is exactly X's reserved tokens in order,
`<|persona:X:0|><|persona:X:1|>...<|persona:X:{k-1}|>`, then the user turn, through the folder's
chat template. In later turns the same tokens are also put in front of the latest user message.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from personaweave.loading import has_shipped_checkpoint, load_model, load_pretrained_personas, read_model_config
from personaweave.models.personas import check_name, normalise_blend, persona_prompt, persona_token
from personaweave.sub_personalities import ADAPTERS_DIR

PERSONA_TOKENS_FILE = "persona_tokens.json"
_PERSONA_TOKEN_RE = re.compile(r"^<\|persona:[^|]+:\d+\|>$")
# peft saves the LoRA weights of a PersonaWeave model under the wrapper's attribute; a plain LM has none.
_WRAPPED_PREFIX = "base_model.model.language_model."
_PLAIN_PREFIX = "base_model.model."


def bake(model_dir_or_model: Any = None, out_dir: str = "", personas: Optional[Sequence[str]] = None,
         merge_lora: Optional[str] = None, *, tokenizer: Any = None,
         blends: Optional[Mapping[str, Mapping[str, float]]] = None, adapters: bool = True) -> str:
    """Write a plain checkpoint of the base architecture to `out_dir`; returns `out_dir`.

    Args:
        model_dir_or_model: a saved PersonaWeave folder, a shipped-format persona checkpoint folder
            (`persona_layer.safetensors`), None for the trained personas shipped in the package, or a
            `PersonaWeaveForCausalLM` (with `tokenizer=`), optionally inside a peft model with adapters.
        out_dir: the folder to write; it must not exist or be empty.
        personas: names to bake (default: the whole bank; with `merge_lora`, that persona only).
        merge_lora: merge this persona's LoRA sub-personality into the weights (no adapters beside).
        tokenizer: the model's tokenizer, when a model object is given.
        blends: new blends to bake, name -> {parent: weight}, mixed as `add_persona(blend=)` does.
        adapters: copy the LoRA sub-personalities of the baked personas (ignored with `merge_lora`).
    """
    import torch

    if not out_dir:
        raise ValueError("bake needs out_dir, the folder to write.")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not empty: bake writes a new folder; remove it or "
                              "choose another --out.")
    with tempfile.TemporaryDirectory(prefix="personaweave-bake-") as scratch:
        model, tok, adapter_root = _resolve_source(model_dir_or_model, tokenizer, scratch)
        bank = model.personas
        names = _choose_personas(bank.names, personas, merge_lora)
        new_blends = []
        for name, weights in (blends or {}).items():
            check_name(name)
            if name in bank or any(name == b.name for b in new_blends):
                raise ValueError(f"Blend name {name!r} is already taken; known personas: {bank.names}.")
            new_blends.append(bank.blend(name, normalise_blend(dict(weights), bank.names)))
        available = _adapter_names(adapter_root)
        if merge_lora is not None and merge_lora not in available:
            raise KeyError(f"No LoRA sub-personality {merge_lora!r} to merge; available: {available or 'none'}.")

        # The tokenizer: new blend tokens first (so ids never collide), then drop the tokens of personas
        # that are not baked (their rows stay, zeroed and suppressed, so the ids of the rest are unchanged).
        tok = copy.deepcopy(tok)
        k = model.config.num_persona_tokens
        blend_tokens = [persona_token(b.name, i) for b in new_blends for i in range(k)]
        if blend_tokens:
            tok.add_special_tokens({"additional_special_tokens": blend_tokens},
                                   replace_additional_special_tokens=False)
        baked_ids = {n: ids for n, ids in zip(model.config.persona_names, model.config.persona_token_ids)
                     if n in names}
        for b in new_blends:
            baked_ids[b.name] = tok.convert_tokens_to_ids([persona_token(b.name, i) for i in range(k)])
        keep = {persona_token(n, i) for n in baked_ids for i in range(k)}
        all_persona = {t: i for t, i in tok.get_added_vocab().items() if _PERSONA_TOKEN_RE.match(t)}
        dropped = sorted(t for t in all_persona if t not in keep)
        suppress = sorted(set(all_persona.values()) | {i for ids in model.config.persona_token_ids for i in ids})

        # The weights: the wrapped LM's own, untied; persona input rows = soft vectors, output rows = 0.
        with torch.no_grad():
            state = _plain_state_dict(model.language_model)
            emb_key, head_key = _embedding_keys(model.language_model, state)
            emb = state[emb_key].clone()
            head = (state[head_key] if head_key in state else emb).clone()
            rows = max(emb.shape[0], len(tok), max(suppress, default=-1) + 1)
            if rows > emb.shape[0]:
                emb = torch.cat([emb, emb.new_zeros(rows - emb.shape[0], emb.shape[1])])
                head = torch.cat([head, head.new_zeros(rows - head.shape[0], head.shape[1])])
            # One batch of the bank's vectors and the new blends', as the model computes them after add_persona.
            vectors = torch.cat([model.persona_vectors]
                                + [b.vector.to(model.persona_vectors)[None] for b in new_blends])
            soft = model.persona_embedding(vectors.to(model.persona_embedding.net[0].weight.dtype)).to(emb.dtype)
            emb[suppress] = 0.0
            head[suppress] = 0.0
            order = model.config.persona_names + [b.name for b in new_blends]
            for name, ids in baked_ids.items():
                emb[ids] = soft[order.index(name)]
            state[emb_key], state[head_key] = emb, head
            if merge_lora is not None:
                _merge_lora(state, os.path.join(adapter_root, ADAPTERS_DIR, merge_lora))

        config = copy.deepcopy(model.language_model.config)
        config.tie_word_embeddings = False
        config.vocab_size = rows
        plain = _build_plain(type(model.language_model), config, state)
        generation_config = copy.deepcopy(model.generation_config)
        generation_config.suppress_tokens = sorted(set(generation_config.suppress_tokens or []) | set(suppress))
        plain.generation_config = generation_config

        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
        try:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _drop_added_tokens(tmp, dropped)
            copied = []
            if adapters and merge_lora is None:
                for name in names:
                    if name in available:
                        _copy_adapter(os.path.join(adapter_root, ADAPTERS_DIR, name),
                                      os.path.join(tmp, ADAPTERS_DIR, name), out_dir)
                        copied.append(name)
            meta = {
                "format": "personaweave-bake/1",
                "architecture": type(plain).__name__,
                "num_persona_tokens": k,
                "usage": ("Select persona NAME with a system message whose content is exactly its `prompt` (its "
                          "reserved tokens in order), then the user turn, through this folder's chat template; in "
                          "later turns put the same tokens in front of the latest user message too (what "
                          "personaweave.chat builds). Persona tokens are inputs only: they are in "
                          "generation_config.suppress_tokens; engines that ignore it take the same ids as a "
                          "logit bias of -100 (their output rows are zero)."),
                "suppress_token_ids": suppress,
                "merged_lora": merge_lora,
                "personas": [_persona_entry(bank[n] if n in bank else next(b for b in new_blends if b.name == n),
                                            k, baked_ids[n], n in copied) for n in baked_ids],
            }
            with open(os.path.join(tmp, PERSONA_TOKENS_FILE), "w", encoding="utf-8") as handle:
                json.dump(meta, handle, indent=1)
            from personaweave.files import replace_folder

            umask = os.umask(0)
            os.umask(umask)
            for folder, _, files in os.walk(tmp):  # readable like any saved model (some writers use 0600)
                for name in files:
                    os.chmod(os.path.join(folder, name), 0o666 & ~umask)
            if os.path.isdir(out_dir) and not os.listdir(out_dir):
                os.rmdir(out_dir)
            replace_folder(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def persona_token_ids(baked_dir: str) -> dict[str, list[int]]:
    """persona name -> its reserved token ids in a baked folder (for logit biases, tests)."""
    with open(os.path.join(baked_dir, PERSONA_TOKENS_FILE), encoding="utf-8") as handle:
        return {p["name"]: p["token_ids"] for p in json.load(handle)["personas"]}


# --- the source ---------------------------------------------------------------------------------


def _resolve_source(source: Any, tokenizer: Any, scratch: str):
    """(PersonaWeaveForCausalLM, tokenizer, folder holding adapters/<name>/ or None)."""
    from personaweave.models import PersonaWeaveForCausalLM, PersonaWeaveForConditionalGeneration

    if source is None or isinstance(source, (str, os.PathLike)):
        path = None if source is None else os.fspath(source)
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{path} is not a PersonaWeave model folder: it does not exist.")
        if path is None or has_shipped_checkpoint(path):
            model, tok, _ = load_pretrained_personas(path, with_adapters=False)
            from personaweave.loading import shipped_checkpoint_dir

            return model, tok, path or shipped_checkpoint_dir()
        config = read_model_config(path)  # a clear ValueError for anything but a PersonaWeave folder
        if config.get("is_encoder_decoder"):
            raise ValueError(f"{path} holds an encoder-decoder PersonaWeave model: bake supports causal LMs only "
                             "(the persona prefix of T5/BART is not a token).")
        model, tok, _ = load_model(path, with_adapters=False)
        return model, tok, path
    peft = None
    if hasattr(source, "peft_config") and hasattr(source, "get_base_model"):
        peft, source = source, source.get_base_model()
    if isinstance(source, PersonaWeaveForConditionalGeneration):
        raise ValueError("bake supports causal LMs only (the persona prefix of T5/BART is not a token).")
    if not isinstance(source, PersonaWeaveForCausalLM):
        raise ValueError(f"bake takes a PersonaWeave model folder or a PersonaWeaveForCausalLM, "
                         f"not a {type(source).__name__}.")
    if tokenizer is None:
        raise ValueError("bake(model) needs tokenizer=, the tokenizer holding the model's persona tokens.")
    root = None
    if peft is not None:
        from personaweave.sub_personalities import save_sub_personalities

        save_sub_personalities(peft, scratch)
        root = scratch
    return source, tokenizer, root


def _choose_personas(known: list[str], personas: Optional[Sequence[str]], merge_lora: Optional[str]) -> list[str]:
    if not known:
        raise ValueError("The model has no personas to bake: add personas first.")
    if personas is None:
        personas = [merge_lora] if merge_lora is not None else known
    personas = list(dict.fromkeys(personas))
    unknown = [n for n in personas if n not in known]
    if unknown:
        raise KeyError(f"Unknown persona(s) {unknown}; known personas: {known}.")
    if not personas:
        raise ValueError("Give at least one persona to bake.")
    return personas


def _adapter_names(root: Optional[str]) -> list[str]:
    folder = os.path.join(root, ADAPTERS_DIR) if root else None
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "adapter_config.json")))


# --- the weights ----------------------------------------------------------------------------------


def _plain_state_dict(language_model: Any) -> dict[str, Any]:
    """The wrapped LM's weights without peft's injected LoRA layers (when a peft model holds it)."""
    state = {}
    for key, value in language_model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()
    return state


def _embedding_keys(language_model: Any, state: dict[str, Any]) -> tuple[str, str]:
    """State-dict keys of the input embedding and the output head of a plain causal LM."""
    def key_of(module: Any) -> Optional[str]:
        for name, sub in language_model.named_modules():
            if sub is module:
                return f"{name}.weight"
        return None

    emb_key = key_of(language_model.get_input_embeddings())
    head_key = key_of(language_model.get_output_embeddings()) or "lm_head.weight"
    if emb_key not in state:
        raise ValueError("Could not find the input embedding of the wrapped language model.")
    return emb_key, head_key


def _build_plain(model_class: Any, config: Any, state: dict[str, Any]):
    """The base architecture (e.g. LlamaForCausalLM) holding `state`, untied."""
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        plain = model_class(config)
    plain = plain.to(next(iter(state.values())).dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
        raise ValueError(f"The baked weights do not fit {model_class.__name__}: missing {missing}, "
                         f"unexpected {unexpected}.")
    if plain.get_output_embeddings() is not None and \
            plain.get_output_embeddings().weight.data_ptr() == plain.get_input_embeddings().weight.data_ptr():
        raise ValueError("The baked model's embeddings are still tied.")
    return plain.eval()


def _lora_pairs(adapter_dir: str):
    """(config, {target module weight key: (A, B)}) of a PersonaWeave adapter, keys of the plain LM."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in weights.items():
        match = re.match(rf"^{re.escape(_WRAPPED_PREFIX)}(.+)\.lora_([AB])\.weight$", key)
        if not match:
            raise ValueError(f"{adapter_dir}: cannot merge adapter weight {key!r} (only LoRA A/B matrices "
                             "of the wrapped LM are supported).")
        pairs.setdefault(f"{match.group(1)}.weight", {})[match.group(2)] = value
    return config, {k: (v["A"], v["B"]) for k, v in pairs.items()}


def _merge_lora(state: dict[str, Any], adapter_dir: str) -> None:
    """W += scale * B @ A for every LoRA pair (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    config, pairs = _lora_pairs(adapter_dir)
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    if unsupported or config.get("rank_pattern") or config.get("alpha_pattern") or config.get("lora_bias"):
        raise ValueError(f"{adapter_dir}: merging supports plain LoRA only (not {unsupported or 'per-layer ranks'}).")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    for key, (a, b) in pairs.items():
        if key not in state:
            raise ValueError(f"{adapter_dir}: LoRA target {key!r} is not a weight of the language model.")
        weight = state[key]
        state[key] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def _copy_adapter(src: str, dst: str, base: str) -> None:
    """A PersonaWeave adapter as a standard peft adapter of the plain LM (keys without `language_model.`)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(src, "adapter_model.safetensors"))
    renamed = {}
    for key, value in weights.items():
        if not key.startswith(_WRAPPED_PREFIX):
            raise ValueError(f"{src}: adapter weight {key!r} does not belong to the wrapped LM; cannot bake it.")
        renamed[_PLAIN_PREFIX + key[len(_WRAPPED_PREFIX):]] = value.contiguous()
    with open(os.path.join(src, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        raise ValueError(f"{src}: adapters with modules_to_save or trainable tokens cannot be baked as plain LoRA.")
    # The baked folder (AutoPeftModelForCausalLM reads it; vLLM and TGI take the base model separately).
    config["base_model_name_or_path"] = base
    os.makedirs(dst)
    save_file(renamed, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "adapter_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)


# --- the tokenizer --------------------------------------------------------------------------------


def _drop_added_tokens(folder: str, tokens: Sequence[str]) -> None:
    """Remove added tokens from a saved fast tokenizer (their ids stay unused, so no id moves)."""
    if not tokens:
        return
    drop = set(tokens)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError("Baking a subset of personas needs a fast tokenizer (tokenizer.json).")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in drop]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if "added_tokens_decoder" in data:
            data["added_tokens_decoder"] = {i: t for i, t in data["added_tokens_decoder"].items()
                                            if t["content"] not in drop}
        if "additional_special_tokens" in data:
            data["additional_special_tokens"] = [t for t in data["additional_special_tokens"]
                                                 if (t if isinstance(t, str) else t.get("content")) not in drop]
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)


def _persona_entry(persona: Any, k: int, ids: list[int], has_adapter: bool) -> dict[str, Any]:
    return {"name": persona.name, "prompt": persona_prompt(persona.name, k), "token_ids": list(ids),
            "description": persona.description, "blend": persona.blend, "traits": persona.traits,
            "adapter": f"{ADAPTERS_DIR}/{persona.name}" if has_adapter else None}


__all__ = ["bake", "persona_token_ids", "PERSONA_TOKENS_FILE"]
