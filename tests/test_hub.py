"""Model cards render with Hub metadata; pushing uploads the folder (HfApi mocked: no network)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from personaweave.export import hub


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


def test_card_model_index_comes_from_the_eval_json(persona_model):
    model, _ = persona_model
    results = {"summary": {"persona_token": {"persona_accuracy": 0.5, "example_similarity": 0.3, "distinct_2": 0.8,
                                             "mean_words": 20.0}}, "perplexity": {"master": 10.0, "base": 10.0}}
    card = hub.model_card(model, repo_id="me/x", results=results)
    entries = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert entries["persona_accuracy (persona_token)"] == 0.5
    assert "| persona_token | 0.500 |" in card.text


def test_push_dry_run_folder_loads_everywhere(tmp_path, persona_model):
    """The dry-run folder has a valid card, loads with remote code, and its ONNX subfolder with ORT."""
    import os
    import subprocess
    import sys

    import torch

    from personaweave.cli import main
    from personaweave.export.onnx import export_onnx

    model, tok = persona_model
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    export_onnx(str(tmp_path / "model"), str(tmp_path / "onnx"))
    out = tmp_path / "upload"
    assert main(["push", "--model", str(tmp_path / "model"), "--repo-id", "me/x", "--onnx", str(tmp_path / "onnx"),
                 "--dry-run", str(out)]) == 0
    ModelCard.load(out / "README.md")
    ids = tok.apply_chat_template(__import__("personaweave").chat("robot", "hello", model=model),
                                  add_generation_prompt=True, return_tensors="pt")
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    from optimum.onnxruntime import ORTModelForCausalLM

    ort = ORTModelForCausalLM.from_pretrained(out / "onnx")
    assert torch.equal(ort.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False),
                       expected)
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'personaweave': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "print(m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False).tolist())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(expected.tolist())


def test_push_offline_is_a_clear_error(tmp_path, persona_model, capsys, monkeypatch):
    from personaweave.cli import main

    model, tok = persona_model
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", "--model", str(tmp_path / "model"), "--repo-id", "me/x"]) == 2
    assert "could not push" in capsys.readouterr().err
