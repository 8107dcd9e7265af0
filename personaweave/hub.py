"""Model cards from `model_cards/` templates, and pushing a model folder to the Hub."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Optional

TEMPLATE = "personaweave_model.md"


def _template_path() -> str:
    # personaweave/templates/ links to the repository's model_cards/ (copied into wheels)
    return str(resources.files("personaweave").joinpath("templates", TEMPLATE))


def model_card(model: Any, repo_id: str = "personaweave-model", base_model: Optional[str] = None,
               training: str = "", evaluation: str = "", sub_personalities: Optional[list[str]] = None,
               license: str = "apache-2.0"):
    """A `huggingface_hub.ModelCard` with Hub metadata, rendered from the model_cards template."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = base_model or getattr(model.config.text_config, "_name_or_path", "") or "unknown base"
    personas = [{"name": p["name"], "description": p.get("description") or ""} for p in model.config.personas]
    data = ModelCardData(
        language="en", license=license, library_name="transformers", pipeline_tag="text-generation",
        tags=["personaweave", "persona", "dialogue", "custom_code"] + (["peft", "lora"] if sub_personalities else []),
        base_model=base_model if "/" in base_model else None,
    )
    return ModelCard.from_template(
        data, template_path=_template_path(), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        base_model=base_model, num_persona_tokens=model.config.num_persona_tokens, personas=personas,
        example_persona=personas[0]["name"] if personas else "NAME", sub_personalities=sub_personalities or [],
        training=training, evaluation=evaluation,
    )


def push_to_hub(model_dir: str, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload personaweave model") -> str:
    """Upload a saved model folder (weights, remote code, tokenizer, adapters, card) to `repo_id`."""
    from huggingface_hub import HfApi

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir} is not a model folder (no config.json).")
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
