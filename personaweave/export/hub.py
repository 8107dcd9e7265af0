"""Model cards from `model_cards/` templates, and pushing a model folder to the Hub."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Optional

from personaweave.loading import read_model_config

TEMPLATE = "personaweave_model.md"


def _template_path() -> str:
    # personaweave/export/templates/ links to the repository's model_cards/ (copied into wheels)
    return str(resources.files("personaweave.export").joinpath("templates", TEMPLATE))


DATASET_ID = "personaweave/persona-dialogues"


def eval_results(results: dict[str, Any]) -> list:
    """model-index entries from the evaluation harness's JSON (never typed by hand)."""
    from huggingface_hub import EvalResult

    entries = []
    for condition, metrics in results.get("summary", {}).items():
        for key in ("persona_accuracy", "example_similarity", "distinct_2"):
            if key in metrics:
                entries.append(EvalResult(
                    task_type="text-generation", dataset_type=DATASET_ID, dataset_name="persona dialogues (test)",
                    dataset_split="test", metric_type=key, metric_name=f"{key} ({condition})",
                    metric_value=round(float(metrics[key]), 4)))
    return entries


def evaluation_markdown(results: dict[str, Any]) -> str:
    rows = ["| condition | persona accuracy | example similarity | distinct-2 | mean words |", "| --- | --- | --- | --- | --- |"]
    for condition, m in results.get("summary", {}).items():
        rows.append(f"| {condition} | {m.get('persona_accuracy', float('nan')):.3f} | "
                    f"{m.get('example_similarity', float('nan')):.3f} | {m.get('distinct_2', float('nan')):.3f} | "
                    f"{m.get('mean_words', float('nan')):.1f} |")
    ppl = results.get("perplexity", {})
    text = "\n".join(rows)
    if ppl:
        text += "\n\nPerplexity without persona tokens on neutral text: " + ", ".join(
            f"{k} {v:.2f}" for k, v in ppl.items())
    return text


def hub_base_model(name_or_path: str) -> str:
    """The Hub id to record as a card's `base_model`: the shipped SmolLM2 (loaded from a local converted
    copy whose folder name starts with the zoo name) is SMOLLM2_HUB_ID; another local path is no Hub id ("")."""
    import re

    from personaweave.zoo import SMOLLM2, SMOLLM2_HUB_ID

    if not name_or_path:
        return ""
    if os.path.basename(os.path.normpath(name_or_path)).startswith(SMOLLM2):
        return SMOLLM2_HUB_ID
    if os.path.exists(name_or_path) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path):
        return ""
    return name_or_path


def model_card(model: Any, repo_id: str = "personaweave-model", base_model: Optional[str] = None,
               training: str = "", evaluation: str = "", sub_personalities: Optional[list[str]] = None,
               license: str = "apache-2.0", results: Optional[dict[str, Any]] = None):
    """A `huggingface_hub.ModelCard` with Hub metadata, rendered from the model_cards template.

    `results` (the evaluation harness's JSON) fills the model-index and the evaluation table.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_model = base_model or getattr(model.config.text_config, "_name_or_path", "") or "unknown base"
    hub_id = hub_base_model(base_model)  # never a local (cache) path in a public card
    base_model = hub_id or os.path.basename(os.path.normpath(base_model))
    personas = [{"name": p["name"], "description": p.get("description") or ""} for p in model.config.personas]
    data = ModelCardData(
        language="en", license=license, library_name="transformers", pipeline_tag="text-generation",
        tags=["personaweave", "persona", "dialogue", "custom_code"] + (["peft", "lora"] if sub_personalities else []),
        base_model=hub_id or None, datasets=[DATASET_ID],
        eval_results=eval_results(results) if results else None,
        model_name=repo_id.split("/")[-1] if results else None,
    )
    if results and not evaluation:
        evaluation = evaluation_markdown(results)
    return ModelCard.from_template(
        data, template_path=_template_path(), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        base_model=base_model, num_persona_tokens=model.config.num_persona_tokens, personas=personas,
        example_persona=personas[0]["name"] if personas else "NAME", sub_personalities=sub_personalities or [],
        training=training, evaluation=evaluation,
    )


def prepare_upload(model_dir: str, out_dir: str, repo_id: str, onnx_dir: Optional[str] = None,
                   results: Optional[dict[str, Any]] = None, training: str = "") -> str:
    """Assemble exactly what `push` uploads: the model folder (weights, remote code, tokenizer,
    adapters), an `onnx/` subfolder when given, and a model card."""
    import shutil

    from personaweave.models import PersonaWeaveForCausalLM
    from personaweave.sub_personalities import has_sub_personalities

    read_model_config(model_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir) or os.listdir(out_dir):  # never delete what the user already has there
            raise ValueError(f"{out_dir} already exists and is not an empty folder: give a new or empty folder.")
        os.rmdir(out_dir)
    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("checkpoint-*", "runs", ".*"))
    if onnx_dir:
        shutil.copytree(onnx_dir, os.path.join(out_dir, "onnx"))
    model = PersonaWeaveForCausalLM.from_pretrained(model_dir)
    adapters = sorted(os.listdir(os.path.join(model_dir, "adapters"))) if has_sub_personalities(model_dir) else []
    write_model_card(model, out_dir, repo_id=repo_id, results=results, training=training,
                     sub_personalities=[a for a in adapters if not a.startswith(".") and not a.endswith(".md")])
    return out_dir


def push_to_hub(model_dir: str, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload personaweave model") -> str:
    """Upload a prepared folder (weights, remote code, tokenizer, adapters, card) to `repo_id`."""
    from huggingface_hub import HfApi

    read_model_config(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "README.md")):
        raise ValueError(f"{model_dir} has no README.md: write a card with write_model_card() first.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=model_dir, repo_id=repo_id, commit_message=commit_message)
    return str(info)


def write_model_card(model: Any, model_dir: str, **kwargs: Any) -> str:
    path = os.path.join(model_dir, "README.md")
    model_card(model, **kwargs).save(path)
    return path
