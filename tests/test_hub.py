"""Model cards render with Hub metadata; pushing uploads the folder (HfApi mocked: no network)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from personaweave import hub


def test_model_card_has_metadata_and_personas(tmp_path, persona_model):
    model, tok = persona_model
    path = hub.write_model_card(model, str(tmp_path), repo_id="me/my-personas",
                                base_model="HuggingFaceTB/SmolLM2-135M-Instruct", sub_personalities=["robot"])
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert "personaweave" in card.data.tags and "lora" in card.data.tags
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "| robot | a robot |" in card.text and "trust_remote_code=True" in card.text
    assert "has not been trained" in card.text  # no training info given: the card says so


def test_push_uploads_the_folder(tmp_path, persona_model, monkeypatch):
    model, tok = persona_model
    model.save_pretrained(tmp_path)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return "ok"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    with pytest.raises(ValueError, match="README.md"):
        hub.push_to_hub(str(tmp_path), "me/x")
    hub.write_model_card(model, str(tmp_path), repo_id="me/x")
    hub.push_to_hub(str(tmp_path), "me/x")
    assert calls == [("create", "me/x"), ("upload", str(tmp_path), "me/x")]
