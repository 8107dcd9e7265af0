"""`serve --backend onnx`: the continuous batcher driving ONNX Runtime on an exported graph."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from personaweave.chat import chat
from personaweave.serving.batching import ContinuousBatcher, Generation
from personaweave.serving.onnx_backend import OnnxDecoder, check_graph_matches
from personaweave.testing import tiny_persona_model

MESSAGES = ["hello what should i read ?", "what is the sea", "hello", "read me a book about the sea please",
            "what", "i like the sea and books and reading"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from personaweave.export.onnx import export_onnx

    model, tok = tiny_persona_model()
    model.eval()
    root = tmp_path_factory.mktemp("onnx_backend")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    export_onnx(str(root / "model"), str(root / "onnx"))
    prompts = []
    for i, text in enumerate(MESSAGES):
        rendered = tok.apply_chat_template(chat(["pirate", "robot"][i % 2], text, [], model=model),
                                           add_generation_prompt=True, tokenize=False)
        prompts.append(tok(rendered, add_special_tokens=False)["input_ids"])
    return model, tok, root, prompts


def test_onnx_decoder_under_the_batcher_gives_generates_greedy_tokens(exported):
    """Requests join and leave a running batch (padding, row selection, cache concatenation) with the
    forward pass in ONNX Runtime: each gets PyTorch `generate`'s greedy tokens for its prompt alone."""
    model, tok, root, prompts = exported
    decoder = OnnxDecoder(str(root / "onnx"), "model.onnx")
    eos = model.generation_config.eos_token_id
    batcher = ContinuousBatcher(decoder, max_batch=3, eos_token_id=eos)
    lengths = [4, 10, 6, 12, 2, 8]

    async def run():
        async def one(i):
            await asyncio.sleep(0.0 if i < 3 else 0.02 * i)
            return await batcher.submit(Generation(prompt=prompts[i], max_new_tokens=lengths[i], repetition_penalty=1.2))
        return await asyncio.gather(*[one(i) for i in range(len(prompts))])

    done = asyncio.run(run())
    stops = set([eos] if isinstance(eos, int) else eos)
    for i, gen in enumerate(done):
        ids = torch.tensor([prompts[i]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=lengths[i], do_sample=False,
                                 repetition_penalty=1.2, pad_token_id=0)[0, len(prompts[i]):].tolist()
        expected = out[:next((k for k, t in enumerate(out) if t in stops), len(out))]
        assert gen.tokens == expected, (i, gen.tokens, expected)
    assert batcher.failures == 0 and max(batcher.batch_sizes) == 3


def test_onnx_decoder_continues_from_a_kept_prefix(exported):
    """The prefix cache hands the graph a filled transformers cache as its past: a chat's next turn,
    prefilled from the last turn's kept rows, gets `generate`'s greedy tokens."""
    model, tok, root, prompts = exported
    batcher = ContinuousBatcher(OnnxDecoder(str(root / "onnx"), "model.onnx"), max_batch=3, prefix_cache_tokens=256)
    first = asyncio.run(batcher.submit(Generation(prompt=prompts[0], max_new_tokens=6, prefix_scope="u")))
    follow = list(prompts[0]) + first.tokens + list(prompts[3])
    second = asyncio.run(batcher.submit(Generation(prompt=follow, max_new_tokens=8, prefix_scope="u")))
    assert batcher.prefix_cache.hits == 1
    ids = torch.tensor([follow])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, len(follow):].tolist()
    eos = model.generation_config.eos_token_id
    stops = set([eos] if isinstance(eos, int) else eos)
    assert second.tokens == out[:next((k for k, t in enumerate(out) if t in stops), len(out))]


def test_graph_must_come_from_the_served_model(exported, tmp_path):
    model, tok, root, _ = exported
    assert check_graph_matches(model, str(root / "onnx")) == list(model.config.persona_names)
    config = json.loads((root / "onnx" / "config.json").read_text())
    config["personaweave"]["personas"][0]["token_ids"] = [1, 2]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not exported from this model"):
        check_graph_matches(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="export onnx"):
        OnnxDecoder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no persona bank"):
        check_graph_matches(model, str(tmp_path))


def test_graph_from_other_persona_weights_is_refused(exported, tmp_path):
    """Same names and token ids, other trained soft vectors (e.g. a graph exported from last month's
    checkpoint): refused by the fingerprint; a graph without one is served with a warning."""
    model, tok, root, _ = exported
    config = json.loads((root / "onnx" / "config.json").read_text())
    assert set(config["personaweave"]["soft_vector_fingerprint"]) == set(model.config.persona_names)
    retrained, _ = tiny_persona_model()
    with torch.no_grad():
        retrained.persona_embedding.slot_bias.add_(0.5)
    with pytest.raises(ValueError, match="soft vectors"):
        check_graph_matches(retrained, str(root / "onnx"))
    del config["personaweave"]["soft_vector_fingerprint"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no soft-vector fingerprint"):
        assert check_graph_matches(model, str(tmp_path)) == list(model.config.persona_names)


def test_service_on_the_onnx_backend_refuses_blends_and_auto(exported, tmp_path):
    from fastapi.testclient import TestClient

    from personaweave.serving.app import PersonaService, create_app
    from personaweave.serving.storage import Storage

    model, tok, root, _ = exported
    decoder = OnnxDecoder(str(root / "onnx"))
    service = PersonaService(model, tok, Storage(f"sqlite:///{tmp_path / 'db.sqlite'}"), decoder=decoder,
                             max_new_tokens=4, pool_size=2)
    client = TestClient(create_app(service))
    ok = client.post("/v1/chat/completions", json={"model": "pirate", "messages": [{"role": "user", "content": "hello"}]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] >= 1
    blend = client.post("/v1/chat/completions",
                        json={"model": "blend:pirate=0.5,robot=0.5", "messages": [{"role": "user", "content": "hello"}]})
    assert blend.status_code == 400 and "PyTorch backend" in blend.json()["error"]["message"]
    with pytest.raises(ValueError, match="adaptation engine"):
        PersonaService(model, tok, Storage(f"sqlite:///{tmp_path / 'db2.sqlite'}"), decoder=decoder, adapter=object())
