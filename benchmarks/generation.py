"""Generation speed of PersonaWeave vs the bare base model, and model load time.

Prints one JSON line per measurement. Both models generate exactly `--new_tokens` tokens
(greedy, min = max new tokens) on the same prompts; runs are interleaved and the median of
`--repeats` is reported, so the ratio is robust to the machine's other load.

    python benchmarks/generation.py [--base smollm2-135m-instruct] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "What should I read this weekend?",
    "I can't sleep before big exams. Any advice?",
    "What do you think about smartphones?",
    "How do I start running?",
    "Tell me about the ocean.",
    "Why is the sky blue?",
    "What is your favourite food?",
    "Can you recommend a hobby?",
]


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def timed_generate(model, batch, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import personaweave
    from personaweave import PersonaWeaveForCausalLM, from_base
    from personaweave.zoo import load_base

    if args.base == "smollm2-135m-instruct":
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PERSONAWEAVE_CACHE"] = cache
            start = time.perf_counter()
            load_base(args.base)
            emit(name="load_base_from_gguf", seconds=round(time.perf_counter() - start, 2))
        os.environ.pop("PERSONAWEAVE_CACHE")
        load_base(args.base)  # make sure the shared cache exists before timing it
    start = time.perf_counter()
    bare, tokenizer = load_base(args.base)
    base_load = time.perf_counter() - start
    start = time.perf_counter()
    model, persona_tok = from_base(args.base, personas="default")
    persona_load = time.perf_counter() - start
    emit(name="load_time", base_seconds=round(base_load, 2), personaweave_from_base_seconds=round(persona_load, 2),
         note="from_base also loads MiniLM and encodes 8 descriptions")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        persona_tok.save_pretrained(folder)
        start = time.perf_counter()
        PersonaWeaveForCausalLM.from_pretrained(folder)
        emit(name="load_saved_personaweave", seconds=round(time.perf_counter() - start, 2))
    bare.eval()

    names = model.config.persona_names
    for batch_size in (1, 8):
        prompts = PROMPTS[:batch_size]
        plain = [[{"role": "user", "content": p}] for p in prompts]
        with_persona = [personaweave.chat(names[i % len(names)], p, model=model) for i, p in enumerate(prompts)]
        batches = {
            "base": (bare, tokenizer, plain),
            "personaweave_no_persona": (model, persona_tok, plain),
            "personaweave_persona": (model, persona_tok, with_persona),
        }
        encoded = {}
        for key, (_, tok, chats) in batches.items():
            tok.padding_side = "left"
            texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded[key] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "pad_token_id": tok.pad_token_id}
        times: dict[str, list[float]] = {k: [] for k in batches}
        for key, (m, _, _) in batches.items():  # warm-up
            timed_generate(m, encoded[key], 4)
        for _ in range(args.repeats):
            for key, (m, _, _) in batches.items():
                times[key].append(timed_generate(m, encoded[key], args.new_tokens))
        medians = {k: statistics.median(v) for k, v in times.items()}
        tokens = batch_size * args.new_tokens
        for key, seconds in medians.items():
            emit(name="generate", model=key, batch_size=batch_size, new_tokens=tokens,
                 tokens_per_s=round(tokens / seconds, 1), ms_per_step=round(1000 * seconds / args.new_tokens, 1),
                 ratio_to_base=round(medians["base"] / seconds, 3))


if __name__ == "__main__":
    main()
