"""Before/after table for the PPO policy, on held-out test prompts with the same seeds.

"before" is the starting policy (the master, PPO adapter disabled: the PPO reference); "after" is
the master with the PPO LoRA adapter. For each: persona accuracy (the evaluation classifier), every
reward component, KL to the reference, distinct-2, and perplexity on neutral text.

Replies are sampled the way TRL's PPO samples them (temperature 0.7, no top-k/top-p, no
repetition penalty), and KL is its estimate: the mean over replies of the sum, over the sampled
reply tokens (EOS included), of log pi(token) - log pi_ref(token), both on logits divided by the
temperature, for replies sampled from the policy being measured (0 for the reference itself).
The ids are kept as generated (never decoded and re-encoded).

Caveat: persona accuracy is judged by the same classifier whose confidence PPO was rewarded
with; a held-out judge would guard against reward hacking (see the example replies in the JSON).

Usage:
    python recipes/ppo_eval.py --model outputs/sft_persona/final --adapter outputs/ppo/final \
        --output outputs/ppo/eval.json
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from personaweave import chat
from personaweave.evaluation import PersonaClassifier, distinct_n, perplexity
from personaweave.files import write_json
from personaweave.sub_personalities import master_only
from personaweave.training.rewards import DEFAULT_WEIGHTS, RewardContext, reward_components

TEMPERATURE = 0.7  # recipes/configs/ppo.yaml


@torch.no_grad()
def sample(policy: Any, tokenizer: Any, conversations: list, seed: int, max_new_tokens: int = 48,
           batch_size: int = 16) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
    """Replies sampled as PPO samples them: (texts, (prompt ids, reply ids up to and with EOS))."""
    torch.manual_seed(seed)
    texts, samples = [], []
    eos = tokenizer.eos_token_id
    for i in range(0, len(conversations), batch_size):
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations[i:i + batch_size]]
        batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        width = batch["input_ids"].shape[1]
        out = policy.generate(**batch, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for prompt, row in zip(prompts, out[:, width:].tolist()):
            reply = row[: row.index(eos) + 1] if eos in row else row
            samples.append((prompt, reply))
            texts.append(tokenizer.decode(reply, skip_special_tokens=True).strip())
    return texts, samples


def _reply_logprobs(model: Any, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """Log-probabilities of the reply tokens after the prompt, on temperature-scaled logits."""
    ids = torch.tensor([prompt + reply])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:ids.shape[1] - 1].float() / (TEMPERATURE + 1e-7)
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)


@torch.no_grad()
def sequence_kl(policy: Any, samples: list[tuple[list[int], list[int]]]) -> float:
    """Mean over replies of sum_t [log pi(y_t) - log pi_ref(y_t)] (pi_ref = adapters disabled)."""
    totals = []
    for prompt, reply in samples:
        if not reply:
            totals.append(0.0)
            continue
        current = _reply_logprobs(policy, prompt, reply)
        with master_only(policy):
            reference = _reply_logprobs(policy, prompt, reply)
        totals.append(float((current - reference).sum()))
    return float(np.mean(totals))


def evaluate(policy: Any, tokenizer: Any, model: Any, classifier: PersonaClassifier, ctx: RewardContext,
             prompts: list[str], neutral: list[str], seed: int, reference: bool) -> dict[str, Any]:
    personas = [p for p in model.config.persona_names if p in classifier.labels]
    rows = [(p, q) for p in personas for q in prompts]
    conversations = [chat(p, q, model=model) for p, q in rows]
    with master_only(policy) if reference else torch.no_grad():
        replies, samples = sample(policy, tokenizer, conversations, seed)
        ppl = perplexity(policy, tokenizer, neutral)
    parts = reward_components([q for _, q in rows], replies, [p for p, _ in rows], ctx)
    probs = classifier.predict_proba(replies)
    hits = [classifier.labels[i] == p for i, (p, _) in zip(probs.argmax(-1), rows)]
    total = sum(w * parts[k] for k, w in DEFAULT_WEIGHTS.items())
    out = {"persona_accuracy": float(np.mean(hits)), "combined_reward": float(total.mean()),
           **{k: float(v.mean()) for k, v in parts.items()}, "distinct_2": distinct_n(replies, 2),
           "mean_words": float(np.mean([len(r.split()) for r in replies])), "perplexity_neutral": ppl,
           "kl_to_reference": 0.0 if reference else sequence_kl(policy, samples),
           "per_persona_accuracy": {p: float(np.mean([hit for hit, (who, _) in zip(hits, rows) if who == p]))
                                    for p in personas}}
    out["examples"] = [{"persona": p, "prompt": q, "reply": r} for (p, q), r in list(zip(rows, replies))[::25]]
    return out


def main() -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from personaweave import PersonaWeaveForCausalLM
    from personaweave.data import load_persona_dialogues
    from personaweave.encoders import default_encoder

    parser = argparse.ArgumentParser(description="Before/after PPO evaluation on held-out prompts.")
    parser.add_argument("--model", default="outputs/sft_persona/final")
    parser.add_argument("--adapter", default="outputs/ppo/final")
    parser.add_argument("--classifier", default="outputs/persona_classifier")
    parser.add_argument("--num_prompts", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/ppo/eval.json")
    args = parser.parse_args()

    model = PersonaWeaveForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    policy = PeftModel.from_pretrained(model, args.adapter).eval()
    classifier = PersonaClassifier.from_pretrained(args.classifier)
    ctx = RewardContext(encoder=default_encoder(), classifier=classifier,
                        examples={p.name: p.examples for p in model.personas})
    test = sorted(set(load_persona_dialogues("test")["prompt"]))
    prompts = test[: args.num_prompts]
    results = {"num_prompts": len(prompts), "seed": args.seed, "adapter": args.adapter}
    for name, reference in (("before", True), ("after", False)):
        print(f"evaluating {name} PPO")
        results[name] = evaluate(policy, tokenizer, model, classifier, ctx, prompts, test, args.seed, reference)
        print({k: v for k, v in results[name].items() if not isinstance(v, (dict, list))})
    write_json(results, args.output)


if __name__ == "__main__":
    main()
