"""Tiny in-process models and tokenizers: fast tests never download or load real weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import personaweave  # noqa: F401  (registers the Auto classes)
from personaweave import Persona, PersonaWeaveConfig, PersonaWeaveForCausalLM, PersonaWeaveForConditionalGeneration
from personaweave.testing import tiny_llama
from personaweave.testing import tiny_tokenizer as make_tokenizer

PERSONA_DIM = 8


def random_vector(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(PERSONA_DIM, generator=g)


def make_persona_model(seed: int = 0, num_tokens: int = 2, names=("robot", "pirate")):
    """A tiny PersonaWeaveForCausalLM with a trained-looking (random, non-zero) persona layer."""
    tok = make_tokenizer()
    base = tiny_llama(len(tok), seed)
    config = PersonaWeaveConfig(text_config=base.config, persona_dim=PERSONA_DIM,
                                num_persona_tokens=num_tokens, persona_hidden_size=16)
    model = PersonaWeaveForCausalLM(config, language_model=base)
    torch.manual_seed(seed + 1)
    for p in model.persona_embedding.parameters():  # non-zero, so personas differ
        torch.nn.init.normal_(p, std=0.5)
    for i, name in enumerate(names):
        model.add_persona(name, f"a {name}", vector=random_vector(i), tokenizer=tok)
    return model.eval(), tok


def make_t5_persona_model(seed: int = 0):
    tok = make_tokenizer()
    torch.manual_seed(seed)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=4, decoder_start_token_id=0,
    )).eval()
    config = PersonaWeaveConfig(text_config=t5.config, persona_dim=PERSONA_DIM, num_persona_tokens=2,
                                persona_hidden_size=16)
    model = PersonaWeaveForConditionalGeneration(config, language_model=t5)
    torch.manual_seed(seed + 1)
    for p in model.persona_embedding.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.add_persona("robot", "a robot", vector=random_vector(0), tokenizer=tok)
    model.add_persona("pirate", "a pirate", vector=random_vector(1), tokenizer=tok)
    return model.eval(), tok


@pytest.fixture
def persona_model():
    return make_persona_model()


@pytest.fixture
def t5_persona_model():
    return make_t5_persona_model()


class HashEncoder:
    """A deterministic stand-in encoder for plumbing tests (the real MiniLM runs in slow tests)."""

    dim = PERSONA_DIM

    def encode(self, texts):
        out = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(map(ord, text)) % (2**31))
            out.append(torch.randn(self.dim, generator=g).numpy())
        return out


@pytest.fixture
def hash_encoder():
    return HashEncoder()


__all__ = ["Persona", "make_persona_model", "make_t5_persona_model", "tiny_llama", "make_tokenizer"]
