"""Persona-stage training throughput, LoRA adapter switch latency, and generation speed with a
LoRA adapter active vs merged into the weights. JSON lines; baselines are measured in the same run.

    python benchmarks/training.py [--batch_size 8] [--seq_len 136] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def fwd_bwd_tokens_per_s(step, batch_size: int, seq_len: int, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size * seq_len / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=136)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=24)
    args = parser.parse_args()

    import personaweave
    from personaweave import from_base
    from personaweave.sub_personalities import add_sub_personality, lora_config, set_sub_personality
    from personaweave.training.sft import freeze_base

    model, tok = from_base(personas="default")
    model.train()
    freeze_base(model)
    k = model.config.num_persona_tokens
    ids = torch.randint(100, 40000, (args.batch_size, args.seq_len))
    ids[:, :k] = torch.tensor(model.config.persona_token_ids[0])  # persona tokens up front

    def persona_step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    def soft_prompt_step():
        # the least a trainable prefix can cost: the frozen base, gradients flowing to its inputs
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model.language_model(inputs_embeds=embeds, labels=ids).loss.backward()

    ours = fwd_bwd_tokens_per_s(persona_step, args.batch_size, args.seq_len, args.steps)
    floor = fwd_bwd_tokens_per_s(soft_prompt_step, args.batch_size, args.seq_len, args.steps)
    emit(name="persona_stage_train", device="cpu", dtype="fp32", batch_size=args.batch_size, seq_len=args.seq_len,
         tokens_per_s=round(ours, 1), soft_prompt_baseline_tokens_per_s=round(floor, 1),
         ratio_to_baseline=round(ours / floor, 3))

    model.eval()
    names = model.config.persona_names
    peft = None
    for name in names:
        peft = add_sub_personality(peft or model, name, lora_config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    switches = []
    for i in range(40):
        start = time.perf_counter()
        set_sub_personality(peft, names[i % len(names)])
        switches.append(time.perf_counter() - start)
    emit(name="adapter_switch", adapters=len(names), ms_median=round(1000 * statistics.median(switches), 3),
         ms_max=round(1000 * max(switches), 3))

    set_sub_personality(peft, "pirate")
    prompt = tok.apply_chat_template(personaweave.chat("pirate", "What should I read?", model=model),
                                     add_generation_prompt=True, return_tensors="pt")
    kwargs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "do_sample": False,
              "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}

    def gen_tokens_per_s(generator) -> float:
        with torch.no_grad():
            generator.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
            times = []
            for _ in range(3):
                start = time.perf_counter()
                generator.generate(**kwargs)
                times.append(time.perf_counter() - start)
        return args.new_tokens / statistics.median(times)

    active = gen_tokens_per_s(peft)
    with peft.disable_adapter():
        master = gen_tokens_per_s(peft)
    merged_model = copy.deepcopy(peft)
    merged = merged_model.merge_and_unload(adapter_names=["pirate"])
    merged_speed = gen_tokens_per_s(merged)
    emit(name="generate_with_lora", batch_size=1, master_tokens_per_s=round(master, 1),
         lora_active_tokens_per_s=round(active, 1), lora_merged_tokens_per_s=round(merged_speed, 1),
         active_ratio_to_master=round(active / master, 3), merged_ratio_to_master=round(merged_speed / master, 3))


if __name__ == "__main__":
    main()
