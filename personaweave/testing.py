"""Tiny random PersonaWeave models and tokenizers, built in-process (tests, smoke recipes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("hello hi what should i read today the a book robot pirate sea ship ahoy arr matey beep logic human "
         "coffee tea please thank you yes no why how is are good bad sir indeed certainly ? ! . ,").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def tiny_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a ChatML-like template; unknown words map to <unk>."""
    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    words = list(dict.fromkeys(WORDS + list(extra_words) + ["system", "user", "assistant"]))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32, initializer_range: float = 0.02
               ) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(initializer_range=initializer_range,
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=2, eos_token_id=4, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def vocabulary(texts, size: int = 600) -> tuple[str, ...]:
    """The `size` most frequent lower-cased words and punctuation marks of `texts`."""
    import re
    from collections import Counter

    counts = Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    return tuple(w for w, _ in counts.most_common(size))


def tiny_persona_model(num_persona_tokens: int = 2, persona_dim: int = 8, seed: int = 0, personas=None,
                       extra_words: tuple[str, ...] = ()):
    """(model, tokenizer): a tiny Llama with the default personas (random vectors, untrained layer)."""
    from personaweave.models import PersonaWeaveConfig, PersonaWeaveForCausalLM
    from personaweave.zoo import load_default_personas

    tok = tiny_tokenizer(extra_words)
    # Wider initial weights than a real LM's 0.02, so that a few smoke-test steps move the loss.
    base = tiny_llama(len(tok), seed, hidden_size=64, initializer_range=0.2)
    config = PersonaWeaveConfig(text_config=base.config, persona_dim=persona_dim,
                                num_persona_tokens=num_persona_tokens, persona_hidden_size=16)
    model = PersonaWeaveForCausalLM(config, language_model=base)
    model.persona_embedding.reset_parameters(model.get_input_embeddings().weight.detach().mean(0))
    g = torch.Generator().manual_seed(seed)
    for persona in personas or load_default_personas():
        model.add_persona(persona.name, persona.description, vector=torch.randn(persona_dim, generator=g),
                          traits=persona.traits, examples=persona.examples, tokenizer=tok)
    return model, tok


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it; the socket is closed again)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields the base URL."""
    import threading
    import time

    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class BagOfWordsEncoder:
    """A deterministic stand-in for MiniLM in tests: hashed bag of words, unit vectors."""

    dim = 256

    def encode(self, texts):
        import re
        import zlib

        import numpy

        out = numpy.zeros((len(texts), self.dim), dtype=numpy.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z']+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = numpy.linalg.norm(out, axis=1, keepdims=True)
        return out / numpy.maximum(norms, 1e-8)
