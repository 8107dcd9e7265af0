"""Deployment graphs of a tiny model: weight-only MatMulNBits beside our export, and the baked folder
through Optimum's stock export (no custom OnnxConfig); each loads with ORTModelForCausalLM and generates."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("onnx_ir", reason="onnxruntime's MatMulNBits quantizer needs onnx-ir (the onnx extra)")
import onnx  # noqa: E402
from optimum.onnxruntime import ORTModelForCausalLM  # noqa: E402
from test_bake import BLEND, QUESTIONS, prompt_ids, trained_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from personaweave.cli import main  # noqa: E402
from personaweave.export.bake import bake  # noqa: E402
from personaweave.export.onnx import export_onnx, quantize_onnx_nbits  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model, tok = trained_tiny_model()
    root = tmp_path_factory.mktemp("deploy")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    bake(str(root / "model"), str(root / "baked"), blends={"mix": BLEND})
    model.add_persona("mix", blend=BLEND, tokenizer=tok)
    return model, tok, root


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_weight_only_graphs_load_and_generate(folders):
    model, tok, root = folders
    export_onnx(str(root / "model"), str(root / "ours"), quantize="w4")
    quantize_onnx_nbits(str(root / "ours"), bits=8)
    vocab = int(model.persona_token_table.min())
    ids = prompt_ids(tok, "pirate", QUESTIONS[0])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(ids).logits[:, -1:, :vocab]  # the graph returns the next token's logits
    errors = {}
    for name, bits in (("model_w4.onnx", 4), ("model_w8.onnx", 8)):
        graph = onnx.load(str(root / "ours" / name)).graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 2 * 7  # every decoder projection of the 2 layers
        assert all(a.i in (bits, 32) for n in nbits for a in n.attribute if a.name in ("bits", "block_size"))
        # the tied head, the embedding table and the persona layer stay fp32
        assert any(n.op_type == "MatMul" and "lm_head" in n.name for n in graph.node)
        assert any(n.op_type == "Gather" and "embed_tokens" in n.name for n in graph.node)
        assert all("persona_embedding" not in n.name for n in nbits)
        ort = ORTModelForCausalLM.from_pretrained(root / "ours", file_name=name)
        with torch.no_grad():
            errors[bits] = float((ort(input_ids=ids, attention_mask=mask).logits[..., :vocab] - expected).abs().max())
        out = ort.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 8
    # really quantized, and 8-bit closer than 4-bit (this tiny model's weights are 10x a real LM's, so its
    # absolute errors say little: persona accuracy of the real model is measured in benchmarks/deploy.py)
    assert 0 < errors[8] < errors[4] and errors[8] < 0.25 * float(expected.std()), errors


def test_baked_folder_through_stock_optimum_export(folders):
    model, tok, root = folders
    out = root / "stock"
    export_onnx(str(root / "baked"), str(out), quantize="w8")  # a plain Llama: Optimum's own LlamaOnnxConfig
    assert json.load(open(out / "config.json"))["model_type"] == "llama"
    assert (out / "persona_tokens.json").is_file() and "MatMulNBits" in op_types(out / "model_w8.onnx")
    baked = AutoModelForCausalLM.from_pretrained(root / "baked").eval()
    blocked = baked.generation_config.suppress_tokens
    vocab = [i for i in range(baked.config.vocab_size) if i not in set(blocked)]
    ort = ORTModelForCausalLM.from_pretrained(out)
    assert ort.generation_config.suppress_tokens == blocked
    for name in ("pirate", "mix"):
        ids = prompt_ids(tok, name, QUESTIONS[0])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            diff = (ort(input_ids=ids, attention_mask=mask).logits[..., vocab] - model(ids).logits[..., vocab]).abs()
        assert diff.max() < 1e-4
        torch.testing.assert_close(ort.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False),
                                   model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
    w8 = ORTModelForCausalLM.from_pretrained(out, file_name="model_w8.onnx")
    ids = prompt_ids(tok, "pirate", QUESTIONS[0]).repeat(4, 1)
    torch.manual_seed(0)
    sampled = w8.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=50, min_new_tokens=50,
                          do_sample=True, temperature=1.5)[:, ids.shape[1]:]
    assert sampled.numel() == 200 and not torch.isin(sampled, torch.tensor(blocked)).any()


def test_cli_export_quantize_choices(folders, tmp_path, capsys):
    _, _, root = folders
    assert main(["export", "onnx", str(root / "baked"), "--out", str(tmp_path / "w4"), "--quantize", "w4"]) == 0
    assert "model_w4.onnx" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", "onnx", str(root / "baked"), "--out", str(tmp_path / "x"), "--quantize", "int3"])
    from personaweave.cli import build_parser

    args = ["export", "onnx", "m", "--out", "o"]  # a bare --quantize is the benchmark's winner, dynamic int8
    assert build_parser().parse_args(args + ["--quantize"]).quantize == "int8"
    assert build_parser().parse_args(args).quantize is None
