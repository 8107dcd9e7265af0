"""`personaweave demo`: three personas and a blend answering the same prompts, side by side.

With the trained checkpoint shipped in the package, the columns are: the persona token on the
trained master, the token plus the persona's LoRA sub-personality, and the prompt-described
baseline. Without it, the persona layer is untrained and the demo says so.
"""

from __future__ import annotations

import textwrap
import time
from typing import Optional

import torch

from personaweave.zoo import SMOLLM2

PROMPTS = [
    "What should I read this weekend?",
    "I can't sleep before big exams. Any advice?",
    "What do you think about smartphones?",
]
SHOWN = ["pirate", "robot", "butler"]
# A blend of two shown personas at the weights `personaweave personas blend ... --calibrate` found for the shipped
# checkpoint (session 13; benchmarks/RESULTS.md): on held-out turns with tokens + LoRA, 72% pirate, 25% butler.
BLEND = ("pirate_butler", {"pirate": 0.39, "butler": 0.61})


def run_demo(base: str = SMOLLM2, model_dir: Optional[str] = None,
             max_new_tokens: int = 40, width: int = 38, checkpoint: str = "default") -> None:
    from personaweave.chat import chat, prompt_baseline_messages
    from personaweave.generation import DECODING, Replies, generate_replies
    from personaweave.loading import from_base, load_model, persona_layer_is_trained
    from personaweave.sub_personalities import (
        blend_sub_personalities,
        master_only,
        set_sub_personality,
        sub_personalities,
    )

    start = time.perf_counter()
    if model_dir or base == SMOLLM2:
        model, tokenizer, peft = load_model(model_dir, base=base, checkpoint=checkpoint)
    else:
        (model, tokenizer), peft = from_base(base, personas="default"), None
    name, weights = BLEND
    if name not in model.config.persona_names:
        model.add_persona(name, blend=weights, tokenizer=tokenizer)
    trained = persona_layer_is_trained(model)
    print(f"loaded {model_dir or base} ({'trained' if trained else 'UNTRAINED'} persona layer"
          f"{', LoRA sub-personalities ' + str(sub_personalities(peft)) if peft is not None else ''}) "
          f"with personas {model.config.persona_names} in {time.perf_counter() - start:.1f} s")
    if not trained:
        print("\nNOTE: the persona layer of this model is UNTRAINED: every persona token currently maps to the\n"
              "same neutral soft vectors, so the 'token' column shows the base model's own voice. The\n"
              "'prompt' column is the prompt-described baseline (the description as a system prompt).\n")
    bank = model.personas
    shown = SHOWN + [name]
    columns: dict[str, list[str]] = {}
    timings = {}

    def generate(label, chats, generator=None):
        torch.manual_seed(0)
        replies = generate_replies(generator or model, tokenizer, chats, max_new_tokens=max_new_tokens, **DECODING)
        columns[label] = replies.texts
        timings[label] = replies

    token_chats = [chat(p, q, model=model) for p in shown for q in PROMPTS]
    token_label = "persona token" + ("" if trained else " (untrained)")
    with master_only(peft):
        generate(token_label, token_chats)
        generate("prompt baseline", [prompt_baseline_messages(bank[p].description, q) for p in shown for q in PROMPTS])
    if peft is not None:
        texts, tokens, start = [], 0, time.perf_counter()
        for p in shown:
            if p == name:
                adapter = blend_sub_personalities(peft, weights, name=f"lora_{name}")
            else:
                set_sub_personality(peft, p)
            replies = generate_replies(peft, tokenizer, [chat(p, q, model=model) for q in PROMPTS],
                                       max_new_tokens=max_new_tokens, **DECODING)
            texts += replies.texts
            tokens += replies.new_tokens
        set_sub_personality(peft, SHOWN[0])  # deleting the active adapter makes peft warn
        peft.delete_adapter(adapter)
        columns["token + LoRA"] = texts
        timings["token + LoRA"] = Replies(texts, tokens, time.perf_counter() - start)
    labels = [label for label in (token_label, "token + LoRA", "prompt baseline") if label in columns]
    for i, persona in enumerate(shown):
        print("=" * ((width + 3) * len(labels)))
        print(f"[{persona}] {bank[persona].description}")
        for j, question in enumerate(PROMPTS):
            k = i * len(PROMPTS) + j
            print(f"\n  user: {question}")
            _side_by_side([(label, columns[label][k]) for label in labels], width)
    print("=" * ((width + 3) * len(labels)))
    for label, replies in timings.items():
        print(f"{label:>22}: {len(token_chats)} replies, {replies.new_tokens} new tokens in {replies.seconds:.1f} s "
              f"({replies.tokens_per_second:.1f} tokens/s, greedy + repetition penalty "
              f"{DECODING['repetition_penalty']}, batched)")


def _side_by_side(cells: list[tuple[str, str]], width: int) -> None:
    wrapped = [[title + ":"] + textwrap.wrap(text or "(empty)", width) for title, text in cells]
    for i in range(max(len(w) for w in wrapped)):
        print("  " + " | ".join(f"{(w[i] if i < len(w) else ''):<{width}}" for w in wrapped).rstrip())
