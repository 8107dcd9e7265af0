"""The ConvAI2 / PersonaChat benchmark: does the profile help the model predict what the human said?

For each gold reply of the (human-written) ConvAI2 validation set, under four conditions:

- `none`: no persona (the chat template's default system prompt);
- `prompt`: the profile sentences written in the system prompt;
- `tokens`: the profile through persona tokens (`add_persona(description=profile)`, nothing else);
- `both`: persona tokens and the profile text.

Metrics, as ConvAI2 defined them (Dinan et al. 2019, arXiv:1902.00098; ParlAI's `F1Metric`):

- perplexity of the gold reply (teacher-forced, token-level over the whole set; our tokens are the
  model's BPE tokens and the end-of-turn token, so the value is not comparable digit for digit with
  ParlAI's word-level dictionaries);
- unigram F1 of the greedy reply against the gold one, over ParlAI-normalised words (lower case,
  punctuation and the articles a/an/the removed), averaged over replies;
- prompt tokens per request (persona tokens count one each).

`PUBLISHED` holds the competition's final automatic leaderboard for context: larger models trained on
PersonaChat itself, scored on the hidden test set.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional

import torch

from personaweave.chat import chat
from personaweave.data.convai2 import ConvAI2Example
from personaweave.models.modeling_personaweave import end_of_turn_ids

CONDITIONS = ("none", "prompt", "tokens", "both")
PROFILE_PROMPT = "You are a person with this profile: {profile} Stay in character."

# Final automatic-evaluation leaderboard (hidden test set) of ConvAI2, http://convai.io/2018 ("Automatic
# Evaluation Leaderboard (hidden test set)"), the same figures as Dinan et al. 2019 (arXiv:1902.00098).
PUBLISHED_SOURCE = "http://convai.io/2018 (final automatic leaderboard, hidden test set); Dinan et al. 2019"
PUBLISHED = (
    {"model": "Hugging Face (TransferTransfo, GPT fine-tuned on PersonaChat)", "ppl": 16.28, "hits@1": 80.7,
     "f1": 19.5},
    {"model": "ADAPT Centre", "ppl": 31.4, "hits@1": None, "f1": 18.39},
    {"model": "Lost in Conversation (winner of the human evaluation)", "ppl": None, "hits@1": 17.1, "f1": 17.77},
    {"model": "Happy Minions", "ppl": 29.01, "hits@1": None, "f1": 16.01},
    {"model": "ParlAI baseline: Seq2Seq + attention", "ppl": 29.8, "hits@1": 12.6, "f1": 16.18},
    {"model": "ParlAI baseline: language model", "ppl": 46.0, "hits@1": None, "f1": 15.02},
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,-./:;<=>?@\[\]\\^`{|}~_']")


# --- F1 as ParlAI computes it -------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """ParlAI's normalisation: lower case, punctuation -> spaces, articles removed, whitespace collapsed."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def unigram_f1(guess: str, gold: str) -> float:
    """Unigram F1 of `guess` against `gold` over normalised words (multiset overlap), 0 when none."""
    g, a = normalize_answer(guess).split(), normalize_answer(gold).split()
    same = sum((Counter(g) & Counter(a)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(g), same / len(a)
    return 2 * precision * recall / (precision + recall)


# --- the four conditions -------------------------------------------------------------------------


def persona_name(example: ConvAI2Example) -> str:
    return f"convai2-{example.dialogue}"


def _history_messages(example: ConvAI2Example, history_turns: Optional[int]) -> list[dict[str, str]]:
    """The last `history_turns` exchanges (partner turn + reply) before the gold reply; None: all."""
    history = example.history
    if history_turns is not None:
        history = history[max(0, len(history) - 2 * history_turns):] if history_turns > 0 else []
    roles = ("user", "assistant")  # the history alternates partner, reply, starting with the partner
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(history)]


def condition_messages(example: ConvAI2Example, condition: str, model: Any = None,
                       history_turns: Optional[int] = None) -> list[dict[str, str]]:
    """Chat messages for one gold reply under one condition (the reply itself is not included)."""
    history = _history_messages(example, history_turns)
    profile = PROFILE_PROMPT.format(profile=example.profile_text)
    if condition == "none":
        return history + [{"role": "user", "content": example.partner}]
    if condition == "prompt":
        return [{"role": "system", "content": profile}] + history + [{"role": "user", "content": example.partner}]
    if condition in ("tokens", "both"):
        return chat(persona_name(example), example.partner, history, model=model,
                    description=profile if condition == "both" else None)
    raise ValueError(f"Unknown condition {condition!r}; conditions are {list(CONDITIONS)}.")


def add_profile_personas(model: Any, tokenizer: Any, examples: Sequence[ConvAI2Example], encoder: Any = None,
                         batch_size: int = 256) -> list[str]:
    """Add one persona per dialogue (description = its profile text) to `model`; returns the new names.

    The reserved tokens of all of them go into the tokenizer first and the embeddings are resized once,
    not once per persona."""
    from personaweave.models.personas import Persona, persona_token

    first: dict[str, ConvAI2Example] = {}
    for example in examples:
        first.setdefault(persona_name(example), example)
    names = [n for n in first if n not in model.config.persona_names]
    if not names:
        return []
    k = model.config.num_persona_tokens
    tokenizer.add_special_tokens({"additional_special_tokens": [persona_token(n, i) for n in names for i in range(k)]},
                                 replace_additional_special_tokens=False)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for i in range(0, len(names), batch_size):
        chunk = names[i:i + batch_size]
        model.add_personas([Persona(n, description=first[n].profile_text) for n in chunk], tokenizer=tokenizer,
                           encoder=encoder)
    return names


# --- scoring ------------------------------------------------------------------------------------


def encode_pairs(tokenizer: Any, conversations: Sequence[list[dict[str, str]]], replies: Sequence[str]
                 ) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, target ids) per request: the templated prompt with the generation prompt, and the
    reply followed by the end-of-turn token."""
    end = end_of_turn_ids(tokenizer)
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = [ids + end for ids in tokenizer(list(replies), add_special_tokens=False)["input_ids"]]
    return prompt_ids, target_ids


@torch.no_grad()
def target_nll(model: Any, prompt_ids: Sequence[list[int]], target_ids: Sequence[list[int]], pad_id: int,
               batch_size: int = 16, bf16: bool = False) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of each target given its prompt, teacher-forced.

    Left-padded batches sorted by length (positions from the attention mask); logits are computed only
    for the last `max target + 1` positions, which is where every row's targets are."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(target_ids[i]))
    total, count = 0.0, 0
    device = model.device
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seqs = [list(prompt_ids[i]) + list(target_ids[i]) for i in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, width - len(seq):] = torch.tensor(seq)
            mask[r, width - len(seq):] = 1
        keep = max(len(target_ids[i]) for i in rows) + 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device.type == "cpu"):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=keep).logits.float()
        logprobs = torch.log_softmax(logits, -1)  # (B, keep, V)
        for r, i in enumerate(rows):
            n = len(target_ids[i])
            target = ids[r, width - n:].to(device)
            total -= float(logprobs[r, keep - 1 - n:keep - 1].gather(-1, target[:, None]).sum())
            count += n
    return total, count


def evaluate_convai2(model: Any, tokenizer: Any, examples: Sequence[ConvAI2Example], *,
                     f1_examples: Optional[Sequence[ConvAI2Example]] = None,
                     conditions: Sequence[str] = CONDITIONS, history_turns: Optional[int] = None,
                     encoder: Any = None, batch_size: int = 16, max_new_tokens: int = 32, bf16: bool = False,
                     log=print) -> dict[str, Any]:
    """Perplexity of the gold replies of `examples` and F1 of greedy replies on `f1_examples` (default:
    the same examples; empty: no generation), per condition, with prompt tokens per request.

    Adds one persona per dialogue to `model` (in memory) for the `tokens` and `both` conditions."""
    from personaweave.generation import generate_replies

    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"Unknown conditions {unknown}; conditions are {list(CONDITIONS)}.")
    if not examples:
        raise ValueError("No ConvAI2 examples to evaluate.")
    f1_examples = list(examples if f1_examples is None else f1_examples)
    if {"tokens", "both"} & set(conditions):
        add_profile_personas(model, tokenizer, list(examples) + f1_examples, encoder=encoder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: dict[str, Any] = {"num_replies_ppl": len(examples), "num_replies_f1": len(f1_examples),
                               "history_turns": "all" if history_turns is None else history_turns,
                               "bf16": bf16, "profile_prompt": PROFILE_PROMPT, "conditions": {}}
    for condition in conditions:
        start = time.perf_counter()
        conversations = [condition_messages(e, condition, model, history_turns) for e in examples]
        prompt_ids, target_ids = encode_pairs(tokenizer, conversations, [e.reply for e in examples])
        nll, count = target_nll(model, prompt_ids, target_ids, pad_id, batch_size=batch_size, bf16=bf16)
        row: dict[str, Any] = {
            "ppl": math.exp(nll / max(count, 1)),
            "target_tokens": count,
            "prompt_tokens_per_request": sum(map(len, prompt_ids)) / len(prompt_ids),
            "ppl_seconds": round(time.perf_counter() - start, 1),
        }
        if f1_examples:
            start = time.perf_counter()
            f1_conversations = [condition_messages(e, condition, model, history_turns) for e in f1_examples]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and model.device.type == "cpu"):
                guesses = generate_replies(model, tokenizer, f1_conversations, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size).texts
            scores = [unigram_f1(g, e.reply) for g, e in zip(guesses, f1_examples)]
            row["f1"] = sum(scores) / len(scores)
            row["f1_seconds"] = round(time.perf_counter() - start, 1)
            row["samples"] = [{"gold": e.reply, "guess": g} for e, g in list(zip(f1_examples, guesses))[:3]]
        results["conditions"][condition] = row
        log(f"convai2 {condition}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items() if k != "samples"))
    results["published"] = {"source": PUBLISHED_SOURCE, "note": "larger models trained on PersonaChat itself, "
                            "scored on the hidden test set with their own tokenisers (perplexity not comparable "
                            "digit for digit)", "rows": list(PUBLISHED)}
    return results


__all__ = ["CONDITIONS", "PUBLISHED", "condition_messages", "evaluate_convai2", "normalize_answer", "target_nll",
           "unigram_f1"]
