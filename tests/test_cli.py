"""The `personaweave` command on a tiny saved model folder."""

from __future__ import annotations

import json

import pytest
from conftest import make_persona_model

from personaweave.cli import main


@pytest.fixture
def model_dir(tmp_path):
    model, tok = make_persona_model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_personas_list_and_blend(model_dir, capsys):
    assert main(["personas", "blend", str(model_dir), "mix", "robot=0.7", "pirate=0.3"]) == 0
    assert main(["personas", "list", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "mix" in out and "'robot': 0.7" in out
    config = json.loads((model_dir / "config.json").read_text())
    assert [p["name"] for p in config["personas"]] == ["robot", "pirate", "mix"]


def test_bad_blend_is_an_error_and_leaves_the_folder_alone(model_dir, capsys):
    before = (model_dir / "config.json").read_text()
    assert main(["personas", "blend", str(model_dir), "mix", "robot=-1", "pirate=2"]) == 2
    assert "negative" in capsys.readouterr().err
    assert main(["personas", "remove", str(model_dir), "ghost"]) == 2
    assert (model_dir / "config.json").read_text() == before


def test_chat_with_a_saved_model(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--persona", "robot", "--max-new-tokens", "4", "hello"]) == 0
    assert capsys.readouterr().out.startswith("robot> ")
    with pytest.raises(SystemExit, match="unknown persona"):
        main(["chat", "--model", str(model_dir), "--persona", "ghost", "hello"])


def test_not_a_personaweave_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SystemExit, match="not a PersonaWeave model"):
        main(["personas", "list", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a model folder"):
        main(["personas", "list", str(tmp_path / "missing")])


def test_chat_description_that_does_not_fit_the_model_is_a_clear_error(model_dir):
    before = (model_dir / "config.json").read_text()
    # the tiny model's persona vectors have 8 dimensions, the shipped MiniLM's 384
    with pytest.raises(SystemExit, match="shape"):
        main(["chat", "--model", str(model_dir), "--persona", "bard", "--description",
              "a wandering bard who answers in rhyme", "--max-new-tokens", "4", "hello"])
    assert (model_dir / "config.json").read_text() == before  # nothing written


def test_chat_persona_from_example_lines(model_dir, tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("arr matey , the sea !\n\nahoy , the ship !\narr , a ship .\nthe sea ! arr .\nahoy ahoy .\n")
    before = (model_dir / "config.json").read_text()
    assert main(["chat", "--model", str(model_dir), "--persona", "sailor", "--examples", str(lines),
                 "--max-new-tokens", "3", "hello"]) == 0
    assert capsys.readouterr().out.startswith("sailor> ")
    assert (model_dir / "config.json").read_text() == before  # for this chat only: nothing written
    lines.write_text("arr\nahoy\n")
    with pytest.raises(SystemExit, match="at least 5 example lines; got 2"):
        main(["chat", "--model", str(model_dir), "--persona", "sailor", "--examples", str(lines), "hello"])
    with pytest.raises(SystemExit, match="cannot read --examples"):
        main(["chat", "--model", str(model_dir), "--persona", "sailor", "--examples", str(tmp_path / "no"), "hi"])
    with pytest.raises(SystemExit, match="not both"):
        main(["chat", "--model", str(model_dir), "--persona", "sailor", "--examples", str(lines),
              "--description", "a sailor", "hi"])


@pytest.mark.slow
def test_chat_adds_a_persona_from_a_description_on_the_descriptions_checkpoint(capsys):
    assert main(["chat", "--checkpoint", "descriptions", "--persona", "bard", "--description",
                 "a wandering bard who answers in rhyme", "--max-new-tokens", "4", "hello"]) == 0
    assert capsys.readouterr().out.startswith("bard> ")
    with pytest.raises(SystemExit, match="give --description"):
        main(["chat", "--checkpoint", "descriptions", "--persona", "bard", "hello"])


def test_chat_answers_with_the_personas_lora_sub_personality(tmp_path, capsys):
    """A folder with LoRA sub-personalities: `chat --persona robot` answers as plain `generate` does with the
    robot adapter and the deployed decoding; `--no-adapters` as the master alone."""
    from test_adapters import CONFIG, perturb

    from personaweave.chat import chat
    from personaweave.generation import DECODING, generate_replies
    from personaweave.loading import load_model
    from personaweave.sub_personalities import add_sub_personality, lora_config, save_sub_personalities

    model, tok = make_persona_model()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    peft = add_sub_personality(model, "robot", lora_config(**CONFIG))
    perturb(peft, "robot", 0)
    save_sub_personalities(peft, str(folder))
    master, tok, peft = load_model(str(folder))
    conversation = [chat("robot", "hello", model=master)]
    peft.set_adapter("robot")
    with_lora = generate_replies(peft, tok, conversation, max_new_tokens=6, **DECODING).texts[0]
    with peft.disable_adapter():
        without = generate_replies(peft, tok, conversation, max_new_tokens=6, **DECODING).texts[0]
    assert with_lora != without
    for flags, expected in (([], with_lora), (["--no-adapters"], without)):
        assert main(["chat", "--model", str(folder), "--persona", "robot", "--max-new-tokens", "6", *flags, "hello"]) == 0
        assert capsys.readouterr().out == f"robot> {expected}\n", flags


def folder_with_adapters(tmp_path, model_and_tokenizer=None):
    """A saved tiny model (default: robot and pirate without example lines) with robot and pirate LoRA
    sub-personalities and a model card."""
    from test_adapters import CONFIG, perturb

    from personaweave.sub_personalities import add_sub_personality, lora_config, save_sub_personalities

    model, tok = model_and_tokenizer or make_persona_model()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    peft = add_sub_personality(model, "robot", lora_config(**CONFIG))
    peft = add_sub_personality(peft, "pirate", lora_config(**CONFIG))
    perturb(peft, "robot", 0)
    perturb(peft, "pirate", 1)
    save_sub_personalities(peft, str(folder))
    (folder / "README.md").write_text("my model card")
    return folder


def test_editing_personas_keeps_the_folders_adapters_and_card(tmp_path):
    """`personas add/blend/remove` rewrite the master: the LoRA sub-personalities and other files stay."""
    folder = folder_with_adapters(tmp_path)
    adapters = sorted(p.name for p in (folder / "adapters").iterdir())
    weights = (folder / "adapters" / "robot" / "adapter_model.safetensors").read_bytes()
    assert main(["personas", "blend", str(folder), "mix", "robot=0.7", "pirate=0.3"]) == 0
    assert main(["personas", "remove", str(folder), "mix"]) == 0
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == adapters == ["pirate", "robot"]
    assert (folder / "adapters" / "robot" / "adapter_model.safetensors").read_bytes() == weights
    assert (folder / "README.md").read_text() == "my model card"


def test_calibrated_blend_is_saved_with_its_weights_and_blended_adapter(tmp_path, monkeypatch, capsys):
    """`personas blend --calibrate`: the weights calibration returns mix the vectors and the parents'
    adapters; the blend is saved as a persona with that adapter; the master keeps no LoRA layers."""
    import torch

    from personaweave.loading import load_model
    from personaweave.sub_personalities import blend_sub_personalities
    from personaweave.testing import tiny_persona_model
    from personaweave.training import blend_calibration

    folder = folder_with_adapters(tmp_path, tiny_persona_model())  # the default personas, with example lines

    # a real (tiny) run end to end: generation, the selection judge, the save
    assert main(["personas", "blend", str(folder), "smoke", "robot=0.5", "pirate=0.5", "--calibrate",
                 "--calibration-turns", "3", "--calibration-rounds", "1"]) == 0
    assert "smoke" in [p["name"] for p in json.loads((folder / "config.json").read_text())["personas"]]
    assert (folder / "adapters" / "smoke").is_dir()

    calls = []

    def fixed(model, tokenizer, name, weights, judge, turns, **kwargs):
        calls.append((name, weights, len(turns), kwargs["adapters"], kwargs["rounds"]))
        return blend_calibration.BlendCalibration(dict(weights), {"robot": 0.3, "pirate": 0.7},
                                                  [blend_calibration.BlendProbe(0.3, 0.4, 0.4)])

    monkeypatch.setattr(blend_calibration, "calibrate_blend", fixed)
    assert main(["personas", "blend", str(folder), "mix", "robot=1", "pirate=1", "--calibrate",
                 "--calibration-turns", "5", "--calibration-rounds", "2"]) == 0
    assert calls == [("mix", {"robot": 0.5, "pirate": 0.5}, 5, True, 2)]
    assert "mix = {'robot': 0.3, 'pirate': 0.7}" in capsys.readouterr().out
    saved, tok, saved_peft = load_model(str(folder))
    entry = next(p for p in saved.config.personas if p["name"] == "mix")
    assert entry["blend"] == {"robot": 0.3, "pirate": 0.7}
    vectors = dict(zip(saved.config.persona_names, saved.persona_vectors))
    torch.testing.assert_close(vectors["mix"], 0.3 * vectors["robot"] + 0.7 * vectors["pirate"])
    blend_sub_personalities(saved_peft, {"robot": 0.3, "pirate": 0.7}, name="by_hand", activate=False)
    state = saved_peft.state_dict()
    for key in [k for k in state if ".mix." in k]:
        torch.testing.assert_close(state[key], state[key.replace(".mix.", ".by_hand.")])
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if "lora" in k]


def test_calibrate_needs_example_lines_and_a_blend(tmp_path, capsys):
    folder = folder_with_adapters(tmp_path)  # robot and pirate without example lines
    before = (folder / "config.json").read_text()
    with pytest.raises(SystemExit, match="example lines"):
        main(["personas", "blend", str(folder), "mix", "robot=0.5", "pirate=0.5", "--calibrate"])
    with pytest.raises(SystemExit, match="applies to"):
        main(["personas", "remove", str(folder), "robot", "--calibrate"])
    assert (folder / "config.json").read_text() == before
