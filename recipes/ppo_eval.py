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

The combined reward uses the weights the run trained with (`<run_dir>/reward_weights.json`, written
by recipes/ppo.py; for a run folder without it, `reward_weights` of the PPO config `ppo_config`).

Usage:
    python recipes/ppo_eval.py --config recipes/configs/ppo_eval.yaml [--run_dir outputs/ppo]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import yaml
from trl import TrlParser

from personaweave import chat
from personaweave.evaluation import PersonaClassifier, distinct_n, perplexity
from personaweave.files import write_json
from personaweave.sub_personalities import master_only
from personaweave.training.rewards import (
    DEFAULT_WEIGHTS,
    REWARD_WEIGHTS_FILE,
    RewardContext,
    load_reward_weights,
    reward_components,
)

TEMPERATURE = 0.7  # recipes/configs/ppo.yaml


@dataclass
class PPOEvalArguments:
    run_dir: str = field(default="outputs/ppo", metadata={"help": "The PPO run folder (its output_dir)."})
    model: str = field(default="outputs/sft_persona/final", metadata={"help": "The trained master (PPO's model)."})
    adapter: Optional[str] = field(default=None, metadata={"help": "The PPO LoRA adapter (default: <run_dir>/final)."})
    ppo_config: str = field(default="recipes/configs/ppo.yaml", metadata={
        "help": f"PPO config whose reward_weights are used when <run_dir>/{REWARD_WEIGHTS_FILE} is missing."})
    classifier: str = field(default="outputs/persona_classifier", metadata={"help": "Persona classifier folder."})
    num_prompts: int = field(default=25, metadata={"help": "Held-out test prompts (x every persona)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for before and after)."})
    output: Optional[str] = field(default=None, metadata={"help": "The JSON report (default: <run_dir>/eval.json)."})


def make_parser() -> TrlParser:
    return TrlParser((PPOEvalArguments,))


def run_reward_weights(run_dir: str, ppo_config: Optional[str] = None) -> dict[str, float]:
    """The weights the run trained with: its saved file, else the PPO config it was launched with."""
    if os.path.isfile(os.path.join(run_dir, REWARD_WEIGHTS_FILE)):
        return load_reward_weights(run_dir)
    if ppo_config and os.path.isfile(ppo_config):
        with open(ppo_config, encoding="utf-8") as handle:
            weights = (yaml.safe_load(handle) or {}).get("reward_weights")
        if weights:
            return {k: float(v) for k, v in weights.items()}
    raise FileNotFoundError(f"No reward weights for {run_dir}: neither {REWARD_WEIGHTS_FILE} there nor "
                            f"reward_weights in {ppo_config}.")


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
             prompts: list[str], neutral: list[str], seed: int, reference: bool,
             weights: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    personas = [p for p in model.config.persona_names if p in classifier.labels]
    rows = [(p, q) for p in personas for q in prompts]
    conversations = [chat(p, q, model=model) for p, q in rows]
    with master_only(policy) if reference else torch.no_grad():
        replies, samples = sample(policy, tokenizer, conversations, seed)
        ppl = perplexity(policy, tokenizer, neutral)
    parts = reward_components([q for _, q in rows], replies, [p for p, _ in rows], ctx)
    probs = classifier.predict_proba(replies)
    hits = [classifier.labels[i] == p for i, (p, _) in zip(probs.argmax(-1), rows)]
    total = sum(w * parts[k] for k, w in (DEFAULT_WEIGHTS if weights is None else weights).items())
    out = {"persona_accuracy": float(np.mean(hits)), "combined_reward": float(total.mean()),
           **{k: float(v.mean()) for k, v in parts.items()}, "distinct_2": distinct_n(replies, 2),
           "mean_words": float(np.mean([len(r.split()) for r in replies])), "perplexity_neutral": ppl,
           "kl_to_reference": 0.0 if reference else sequence_kl(policy, samples),
           "per_persona_accuracy": {p: float(np.mean([hit for hit, (who, _) in zip(hits, rows) if who == p]))
                                    for p in personas}}
    out["examples"] = [{"persona": p, "prompt": q, "reply": r} for (p, q), r in list(zip(rows, replies))[::25]]
    return out


def main(args: PPOEvalArguments) -> dict:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from personaweave import PersonaWeaveForCausalLM
    from personaweave.data import load_persona_dialogues
    from personaweave.encoders import default_encoder

    adapter = args.adapter or os.path.join(args.run_dir, "final")
    weights = run_reward_weights(args.run_dir, args.ppo_config)
    model = PersonaWeaveForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    policy = PeftModel.from_pretrained(model, adapter).eval()
    classifier = PersonaClassifier.from_pretrained(args.classifier)
    ctx = RewardContext(encoder=default_encoder(), classifier=classifier,
                        examples={p.name: p.examples for p in model.personas})
    test = sorted(set(load_persona_dialogues("test")["prompt"]))
    prompts = test[: args.num_prompts]
    results = {"num_prompts": len(prompts), "seed": args.seed, "adapter": adapter, "reward_weights": weights}
    for name, reference in (("before", True), ("after", False)):
        print(f"evaluating {name} PPO")
        results[name] = evaluate(policy, tokenizer, model, classifier, ctx, prompts, test, args.seed, reference,
                                 weights=weights)
        print({k: v for k, v in results[name].items() if not isinstance(v, (dict, list))})
    write_json(results, args.output or os.path.join(args.run_dir, "eval.json"))
    return results


if __name__ == "__main__":
    (eval_args,) = make_parser().parse_args_and_config()
    main(eval_args)
