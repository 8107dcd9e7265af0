"""`personaweave demo`: three personas and a blend answering the same prompts, side by side."""

from __future__ import annotations

import textwrap
import time
from typing import Optional

import torch

PROMPTS = [
    "What should I read this weekend?",
    "I can't sleep before big exams. Any advice?",
    "What do you think about smartphones?",
]
SHOWN = ["pirate", "robot", "butler"]
BLEND = ("librarian_robot", {"librarian": 0.5, "robot": 0.5})


def persona_layer_is_trained(model) -> bool:
    """An untrained PersonaEmbedding has an all-zero output layer (every persona maps alike)."""
    return bool(model.persona_embedding.net[2].weight.detach().abs().max() > 0)


def run_demo(base: str = "smollm2-135m-instruct", model_dir: Optional[str] = None,
             max_new_tokens: int = 40, width: int = 58) -> None:
    from transformers import AutoTokenizer

    from . import PersonaWeaveForCausalLM, chat, describe
    from .generation import generate_replies

    torch.manual_seed(0)
    start = time.perf_counter()
    if model_dir:
        model = PersonaWeaveForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        model, tokenizer = PersonaWeaveForCausalLM.from_base(base, personas="default")
    name, weights = BLEND
    if name not in model.config.persona_names:
        model.add_persona(name, blend=weights, tokenizer=tokenizer)
    print(f"loaded {base if not model_dir else model_dir} with personas {model.config.persona_names} "
          f"in {time.perf_counter() - start:.1f} s")
    trained = persona_layer_is_trained(model)
    if not trained:
        print("\nNOTE: the persona layer of this model is UNTRAINED: every persona token currently maps to the\n"
              "same neutral soft vectors, so the 'token' column shows the base model's own voice. The\n"
              "'prompt' column is the prompt-described baseline (the description as a system prompt).\n")
    bank = model.personas
    shown = SHOWN + [name]
    token_chats = [chat(p, q, model=model) for p in shown for q in PROMPTS]
    prompt_chats = [describe(bank[p].description, q) for p in shown for q in PROMPTS]
    by_token = generate_replies(model, tokenizer, token_chats, max_new_tokens=max_new_tokens)
    by_prompt = generate_replies(model, tokenizer, prompt_chats, max_new_tokens=max_new_tokens)
    left = "persona token" + (" (untrained)" if not trained else "")
    for i, persona in enumerate(shown):
        print("=" * (2 * width + 3))
        print(f"[{persona}] {bank[persona].description}")
        for j, question in enumerate(PROMPTS):
            k = i * len(PROMPTS) + j
            print(f"\n  user: {question}")
            _side_by_side(left, by_token.texts[k], "prompt baseline", by_prompt.texts[k], width)
    print("=" * (2 * width + 3))
    for label, replies in (("persona token", by_token), ("prompt baseline", by_prompt)):
        print(f"{label:>16}: {len(token_chats)} replies, {replies.new_tokens} new tokens in "
              f"{replies.seconds:.1f} s ({replies.tokens_per_second:.1f} tokens/s, greedy, batched)")


def _side_by_side(left_title: str, left: str, right_title: str, right: str, width: int) -> None:
    a = [left_title + ":"] + textwrap.wrap(left or "(empty)", width)
    b = [right_title + ":"] + textwrap.wrap(right or "(empty)", width)
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else ""
        y = b[i] if i < len(b) else ""
        print(f"  {x:<{width}} | {y}")
