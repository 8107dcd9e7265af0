"""What a new user trips over (issue 18): fast start-up, paths checked first, clear errors with exit
status 2, warnings for untrained layers, the serve address and model list, a card's base model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_persona_model

from personaweave.cli import UsageError, _say_when_listening, main
from personaweave.files import save_folder_atomically


@pytest.fixture
def model_dir(tmp_path):
    model, tok = make_persona_model()
    save_folder_atomically(model, tok, tmp_path / "model")
    return tmp_path / "model"


def test_importing_the_package_and_cli_loads_neither_torch_nor_transformers():
    code = ("import sys, personaweave, personaweave.cli; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_still_resolve_and_register_the_auto_classes():
    code = ("import personaweave; from transformers import AutoConfig, AutoModel; "
            "cls = personaweave.PersonaWeaveForCausalLM; "
            "assert AutoModel._model_mapping[personaweave.PersonaWeaveConfig] is cls; "
            "assert AutoConfig.for_model('personaweave').__class__ is personaweave.PersonaWeaveConfig; "
            "assert callable(personaweave.chat) and callable(personaweave.load_model); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_chat_function_is_not_hidden_by_its_submodule():
    code = ("import personaweave.chat, personaweave; from personaweave.chat import chat; "
            "assert personaweave.chat is chat, personaweave.chat; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_saved_folders_get_the_usual_folder_mode(model_dir):
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(model_dir).st_mode & 0o777 == 0o777 & ~umask


def test_a_list_as_a_blend_is_a_clear_error():
    model, tok = make_persona_model()
    with pytest.raises(ValueError, match="dict of persona name -> weight"):
        model.add_persona("mix", blend=["robot", "pirate"], tokenizer=tok)
    assert "mix" not in model.config.persona_names


def test_eval_checks_the_model_path_first_and_fails_fast(tmp_path, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tmp_path / "outputs/sft/final"), "--classifier", str(tmp_path / "clf")])
    assert exit_info.value.code == 2
    assert time.perf_counter() - start < 5
    assert "does not exist" in capsys.readouterr().err


def test_eval_without_a_classifier_says_how_to_get_one(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_dir), "--classifier", str(tmp_path / "clf")])
    assert exit_info.value.code == 2
    assert "--train-classifier" in capsys.readouterr().err


def test_untrained_folders_are_told_apart_without_loading_them(tmp_path, model_dir):
    from personaweave.loading import folder_persona_layer_is_trained

    model, tok = make_persona_model()
    torch.nn.init.zeros_(model.persona_embedding.net[2].weight)  # as from_base builds it
    save_folder_atomically(model, tok, tmp_path / "untrained")
    assert folder_persona_layer_is_trained(str(model_dir))
    assert not folder_persona_layer_is_trained(str(tmp_path / "untrained"))


@pytest.mark.parametrize("argv, message", [
    (["chat", "--model", "{model}", "--persona", "ghost", "hi"], "unknown persona"),
    (["personas", "list", "{missing}"], "does not exist"),
    (["personas", "blend", "{model}", "mix", "robot"], "NAME=WEIGHT"),
    (["chat", "--persona"], None),  # argparse's own usage error
])
def test_usage_and_input_errors_exit_with_status_2(model_dir, tmp_path, capsys, argv, message):
    argv = [a.format(model=model_dir, missing=tmp_path / "missing") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    if message:
        assert message in capsys.readouterr().err


def test_a_plain_system_exit_message_becomes_status_2(monkeypatch, capsys):
    import personaweave.cli as cli

    def refuse(_args):
        raise SystemExit("error: refusing to do that")

    monkeypatch.setattr(cli, "cmd_personas", refuse)
    with pytest.raises(UsageError) as exit_info:
        main(["personas", "list", "somewhere"])
    assert exit_info.value.code == 2 and "refusing to do that" in capsys.readouterr().err


def test_export_errors_name_the_cli_option(tmp_path, capsys):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert main(["export", "onnx", str(folder), "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "pass --task" in err and "task=" not in err


def test_serve_help_shows_the_ab_experiment_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "default: persona-ab" in " ".join(capsys.readouterr().out.split())


def test_serve_says_when_it_is_ready(capfd):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        _say_when_listening("127.0.0.1", port, ["pirate", "robot"])
        deadline = time.time() + 10
        err = ""
        while "ready" not in err and time.time() < deadline:
            time.sleep(0.1)
            err += capfd.readouterr().err
    finally:
        listener.close()
    assert f"ready: OpenAI-compatible API at http://127.0.0.1:{port}/v1" in err
    assert "models: pirate, robot" in err


def test_models_list_offers_auto_only_with_the_adaptation_engine(tmp_path):
    from fastapi.testclient import TestClient

    from personaweave.serving import PersonaService, Storage, create_app

    model, tok = make_persona_model()
    service = PersonaService(model, tok, Storage(f"sqlite:///{tmp_path}/db.sqlite"), memory=None, max_new_tokens=4)
    ids = {m["id"] for m in TestClient(create_app(service)).get("/v1/models").json()["data"]}
    assert ids == {"robot", "pirate"}


def test_a_card_names_the_hub_base_model_not_a_local_cache_path(model_dir, tmp_path):
    from personaweave.export.hub import prepare_upload
    from personaweave.zoo import SMOLLM2_HUB_ID

    config = json.loads((model_dir / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "/root/.cache/personaweave/smollm2-135m-instruct-q4_1-106223872"
    (model_dir / "config.json").write_text(json.dumps(config))
    out = prepare_upload(str(model_dir), str(tmp_path / "upload"), "me/personas")
    card = (tmp_path / "upload" / "README.md").read_text()
    assert f"base_model: {SMOLLM2_HUB_ID}" in card
    assert "/root/.cache" not in card and out == str(tmp_path / "upload")


def test_bfloat16_is_only_called_fast_where_the_cpu_has_it(monkeypatch):
    from personaweave.generation import cpu_has_fast_bfloat16

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not cpu_has_fast_bfloat16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_has_fast_bfloat16()


def test_rewriting_a_folder_in_place_keeps_other_files_but_not_stale_weights(tmp_path):
    """`keep_other_files`: adapters and a model card survive a rewrite; a weight file the new save did not
    write (e.g. an old unsharded `pytorch_model.bin`) does not; without the flag the folder is replaced whole."""
    model, tok = make_persona_model()
    folder = tmp_path / "model"
    save_folder_atomically(model, tok, folder)
    (folder / "adapters" / "robot").mkdir(parents=True)
    (folder / "adapters" / "robot" / "adapter_config.json").write_text("{}")
    (folder / "README.md").write_text("card")
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    save_folder_atomically(model, tok, folder, keep_other_files=True)
    assert (folder / "adapters" / "robot" / "adapter_config.json").read_text() == "{}"
    assert (folder / "README.md").read_text() == "card"
    assert not (folder / "pytorch_model.bin").exists() and (folder / "model.safetensors").exists()
    save_folder_atomically(model, tok, folder)
    assert not (folder / "adapters").exists() and not (folder / "README.md").exists()
