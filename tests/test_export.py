"""ONNX export of a tiny PersonaWeave model: parity with PyTorch, int8, and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_modeling import encode

pytest.importorskip("optimum.onnxruntime")
from optimum.onnxruntime import ORTModelForCausalLM  # noqa: E402

from personaweave import chat  # noqa: E402
from personaweave.cli import main  # noqa: E402
from personaweave.export.onnx import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_persona_model

    model, tok = make_persona_model()
    root = tmp_path_factory.mktemp("export")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    export_onnx(str(root / "model"), str(root / "onnx"), quantize="int8")
    return model, tok, root


def test_fp32_onnx_matches_pytorch(exported):
    model, tok, root = exported
    ort = ORTModelForCausalLM.from_pretrained(root / "onnx")
    assert json.loads((root / "onnx" / "config.json").read_text())["personaweave"]["logits"] == "last position"
    for persona in ("robot", "pirate"):
        ids = encode(tok, persona, model=model)
        mask = torch.ones_like(ids)
        got = ort(input_ids=ids, attention_mask=mask).logits
        assert got.shape == (1, 1, model.config.text_config.vocab_size)  # the next token's logits only
        diff = (got - model(ids).logits[:, -1:]).abs().max()
        assert diff < 1e-3
        torch.testing.assert_close(
            ort.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False),
            model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


def test_int8_graph_sits_beside_and_loads(exported):
    import onnx

    model, tok, root = exported
    assert (root / "onnx" / "model_quantized.onnx").is_file()
    ops = {n.op_type for n in onnx.load(root / "onnx" / "model_quantized.onnx").graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops  # really int8, not the fp32 graph again
    ort = ORTModelForCausalLM.from_pretrained(root / "onnx", file_name="model_quantized.onnx")
    vocab = int(model.persona_token_table.min())
    for persona in ("robot", "pirate"):
        ids = encode(tok, persona, model=model)
        with torch.no_grad():
            want = model(ids).logits[:, -1:, :vocab]
        got = ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[..., :vocab]
        # Dynamic int8 rounds each weight to 1/254 of its channel's largest |w| and each activation to
        # 1/255 of its tensor's range: on this 2-layer model the logits move by ~0.5% of their range
        # (measured 0.0046-0.0057 on a range of ~1.03). 2% of the range leaves room for other CPUs'
        # kernels, and is still 10x below what losing the persona layer or mis-scaled weights does.
        tolerance = 0.02 * float(want.max() - want.min())
        assert float((got - want).abs().max()) < tolerance, (persona, float((got - want).abs().max()), tolerance)
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
        # the same greedy token wherever fp32's top choice leads by more than the tolerance allows to flip
        top2 = want.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * tolerance
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    config = json.loads((root / "onnx" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert [p["name"] for p in config["personaweave"]["personas"]] == ["robot", "pirate"]


def test_batched_prompts_with_padding_match(exported):
    model, tok, root = exported
    ort = ORTModelForCausalLM.from_pretrained(root / "onnx")
    batch = tok.apply_chat_template([chat("robot", "hi", num_persona_tokens=2),
                                     chat("pirate", "what is the sea ?", num_persona_tokens=2)],
                                    add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True)
    torch.testing.assert_close(ort.generate(**batch, max_new_tokens=6, do_sample=False),
                               model.generate(**batch, max_new_tokens=6, do_sample=False))


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, exported):
    model, tok, root = exported
    (tmp_path / "llama").mkdir()
    model.language_model.config.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="not a PersonaWeave model"):
        export_onnx(str(tmp_path / "llama"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no config.json"):
        export_onnx(str(tmp_path / "missing"), str(tmp_path / "out"))
    empty = json.loads((root / "model" / "config.json").read_text())
    empty["personas"] = []
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(empty))
    with pytest.raises(ValueError, match="no persona bank"):
        export_onnx(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="Unsupported task"):
        export_onnx(str(root / "model"), str(tmp_path / "out"), task="image-classification")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".onnx-export-*"))
    assert main(["export", "onnx", str(tmp_path / "llama"), "--out", str(tmp_path / "out")]) == 2


def test_classifier_export(tmp_path):
    """The persona classifier (a BERT-style sequence classifier) exports through the stock path."""
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import BertConfig, BertForSequenceClassification

    from personaweave.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    clf = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    export_onnx(str(tmp_path / "clf"), str(tmp_path / "clf_onnx"), task="text-classification", quantize="int8")
    ort = ORTModelForSequenceClassification.from_pretrained(tmp_path / "clf_onnx")
    enc = tok(["hello what should i read ?"], return_tensors="pt")
    torch.testing.assert_close(ort(**enc).logits, clf(**enc).logits, rtol=1e-4, atol=1e-4)


def test_trait_model_exports_with_its_heads_and_the_torch_free_predictor_matches(tmp_path):
    from transformers import BertConfig

    from personaweave import PersonaTraitConfig, PersonaTraitModel
    from personaweave.testing import tiny_tokenizer
    from personaweave.traits.onnx_runtime import OnnxTraitModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = PersonaTraitModel(PersonaTraitConfig(encoder_config=BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))).eval()
    model.save_pretrained(tmp_path / "traits")
    tok.save_pretrained(tmp_path / "traits")
    main(["export", "onnx", str(tmp_path / "traits"), "--out", str(tmp_path / "traits_onnx"), "--quantize", "int8"])
    texts = ["hello what should i read ?", "why is the sea good ?", "hello"]
    from transformers import AutoTokenizer

    expected = model.predict_traits(texts, AutoTokenizer.from_pretrained(tmp_path / "traits"))  # as saved
    for file_name, tol in (("model.onnx", 1e-5), ("model_quantized.onnx", 0.05)):
        lite = OnnxTraitModel.from_pretrained(str(tmp_path / "traits_onnx"), file_name=file_name)
        got = lite.predict_traits(texts)
        assert list(got[0]) == list(expected[0])  # the ten trait names, in order
        np.testing.assert_allclose([list(g.values()) for g in got], [list(e.values()) for e in expected], atol=tol)
    with pytest.raises(ValueError, match="feature-extraction"):
        export_onnx(str(tmp_path / "traits"), str(tmp_path / "bad"), task="text-classification")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match="No model.onnx"):
        OnnxTraitModel.from_pretrained(str(tmp_path / "traits"))  # the PyTorch folder


def test_int8_variant_keeps_chosen_nodes_and_gathers_in_fp32(exported, tmp_path):
    import shutil

    import onnx

    from personaweave.export.onnx import quantize_onnx_int8

    model, tok, root = exported
    folder = tmp_path / "onnx"
    shutil.copytree(root / "onnx", folder)  # the module's shared export stays as it is
    path = quantize_onnx_int8(str(folder), suffix="quantized_mm", operators_to_quantize=["MatMul"],
                         keep_fp32=("rotary_emb", "persona_embedding"))
    graph = onnx.load(path).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert [name for name in ops if "rotary_emb" in name and ops[name] == "MatMul"]  # still float MatMuls
    assert not any("persona_embedding" in name and op == "MatMulInteger" for name, op in ops.items())
    assert any(op == "MatMulInteger" for op in ops.values())  # the layers' weight MatMuls are int8
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in
               {i.name for i in graph.initializer}]
    assert gathers and all(n.input[0] in floats for n in gathers)  # embedding tables stay fp32
    ort = ORTModelForCausalLM.from_pretrained(folder, file_name=os.path.basename(path))
    ids = encode(tok, "robot", model=model)
    diff = (ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - model(ids).logits[:, -1:]).abs().max()
    assert diff < 0.5  # int8 weights: close, not equal


def test_int8_quantizes_weights_only_and_attention_never_repeats_the_cache(exported):
    """Attention is traced from `grouped_query_attention`: no Expand of the cache per query head (the
    SDPA export's `repeat_kv`), and int8 leaves the products of two activations (Q.K^T, weights.V) in
    float32, so the cache is never re-quantized at a step."""
    import onnx

    model, tok, root = exported
    for file_name in ("model.onnx", "model_quantized.onnx"):
        graph = onnx.load(root / "onnx" / file_name).graph
        attention = [n for n in graph.node if "self_attn" in n.name]
        assert attention and not [n.name for n in attention if n.op_type == "Expand"], file_name
        weights = {i.name for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "MatMulInteger":  # B is a quantized weight, never an activation
                assert node.input[1] in weights, node.name
    # the same attention in PyTorch: grouped_query_attention == transformers' eager attention (repeat_kv)
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from personaweave.export.onnx import grouped_query_attention

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    allowed = torch.rand(2, 1, 5, 7) > 0.3
    allowed[..., 0] = True
    module = type("Attention", (torch.nn.Module,), {})()
    module.num_key_value_groups, module.training = 3, False
    want, _ = eager_attention_forward(module, query, key, value, torch.zeros(2, 1, 5, 7).masked_fill(~allowed, -1e9),
                                      scaling=0.3)
    for mask in (allowed, torch.zeros(2, 1, 5, 7).masked_fill(~allowed, -1e9)):
        got, _ = grouped_query_attention(module, query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(got, want)


def test_all_logits_keeps_every_position(exported, tmp_path):
    model, tok, root = exported
    export_onnx(str(root / "model"), str(tmp_path / "onnx"), all_logits=True)
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["personaweave"]["logits"] == "all positions"
    ort = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")
    ids = encode(tok, "robot", model=model)
    torch.testing.assert_close(ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits,
                               rtol=1e-3, atol=1e-3)


def test_export_without_a_folder_exports_the_shipped_checkpoints_master(tmp_path, monkeypatch, exported):
    """`personaweave export onnx --out DIR` (no folder): the shipped checkpoint's master, loaded as `chat` and
    `serve` load it (without LoRA adapters), is saved and exported; here a tiny model stands in for it."""
    import personaweave.loading

    model, tok, _ = exported
    calls = []

    def fake_load_model(source=None, *, with_adapters=True, checkpoint="default", **_):
        calls.append((source, with_adapters, checkpoint))
        return model, tok, None

    monkeypatch.setattr(personaweave.loading, "load_model", fake_load_model)
    assert main(["export", "onnx", "--out", str(tmp_path / "shipped"), "--checkpoint", "descriptions"]) == 0
    assert calls == [(None, False, "descriptions")]
    config = json.loads((tmp_path / "shipped" / "config.json").read_text())
    assert [p["name"] for p in config["personaweave"]["personas"]] == model.config.persona_names
    assert (tmp_path / "shipped" / "model.onnx").is_file()
