"""Rewards for persona consistency and conversation goals, and their multi-objective sum.

Components (each per reply, roughly in [0, 1]):
- `example_similarity`: max cosine (MiniLM) between the reply and the persona's example replies;
- `classifier_confidence`: the persona classifier's probability for the target persona;
- `persona_reward`: sigmoid of the trained persona reward model's score (`recipes/reward_model.py`,
  TRL `RewardTrainer`), the persona stated in words as in its training pairs (`PersonaRewardScorer`);
- `relevance`: cosine between the user turn and the reply;
- `length`: 1 inside 8-60 words, falling off outside;
- `sentiment`: VADER compound mapped to [0, 1];
- `repetition`: distinct-2 of the reply (1 = no repeated bigram);
- `complete`: 0 for an empty reply or one cut off mid-sentence.
The goal/engagement reward is the mean of relevance, length, sentiment, repetition and complete.

TRL's PPO scores with a reward *model*: it calls `getattr(model, model.base_model_prefix)` on the
token ids and reads `model.score(hidden_states[-1])` at the last response token. A rule- and
model-based reward has no such network, so `CombinedRewardModel` presents exactly that interface:
its "backbone" decodes the ids, splits prompt and reply at the chat template's assistant marker,
reads the persona from the reserved tokens, computes the combined reward and returns it as a
one-channel "hidden state" at every position; `score` is the identity. This keeps the reward
outside the policy's graph (no gradients flow through it, as with any PPO reward) and needs no
change to TRL. The same `combined_reward` callable serves `GRPOTrainer(reward_funcs=[...])`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from personaweave.evaluation.metrics import distinct_n
from personaweave.evaluation.signals import sentiment

DEFAULT_WEIGHTS = {"classifier_confidence": 1.0, "example_similarity": 0.5, "goal": 1.0}
# A PPO run writes the weights it trained with here (in its output_dir); its evaluation reads them back.
REWARD_WEIGHTS_FILE = "reward_weights.json"
GOAL_PARTS = ("relevance", "length", "sentiment", "repetition", "complete")


def length_score(text: str, low: int = 8, high: int = 60) -> float:
    n = len(text.split())
    if n == 0:
        return 0.0
    if n < low:
        return n / low
    return 1.0 if n <= high else max(0.0, 1.0 - (n - high) / high)


def complete_score(text: str) -> float:
    text = text.strip()
    return float(bool(text) and bool(re.search(r"[.!?…)\"']\s*$", text)))


@dataclass
class RewardContext:
    """What the components need: an encoder, the persona classifier, the personas' examples, and
    optionally a trained persona reward model (`PersonaRewardScorer`) with the personas' descriptions."""

    encoder: Any
    classifier: Any = None
    examples: Optional[Mapping[str, Sequence[str]]] = None
    reward_model: Any = None
    descriptions: Optional[Mapping[str, str]] = None


class PersonaRewardScorer:
    """A trained persona reward model (a `num_labels=1` sequence classifier from `recipes/reward_model.py`)
    as a scorer: `score(descriptions, prompts, replies)` -> sigmoid(score) in (0, 1), the conversation
    built exactly as in its training pairs (system "You are {description}.", user turn, assistant reply)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, max_length: int = 256) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs: Any) -> PersonaRewardScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder)
        if model.config.num_labels != 1:
            raise ValueError(f"{folder} is not a reward model (num_labels={model.config.num_labels}, expected 1).")
        return cls(model, AutoTokenizer.from_pretrained(folder), **kwargs)

    @torch.no_grad()
    def score(self, descriptions: Sequence[str], prompts: Sequence[str], replies: Sequence[str]) -> np.ndarray:
        if not (len(descriptions) == len(prompts) == len(replies)):
            raise ValueError("descriptions, prompts and replies must have the same length.")
        texts = [self.tokenizer.apply_chat_template(
            [{"role": "system", "content": f"You are {d}."}, {"role": "user", "content": p},
             {"role": "assistant", "content": r}], tokenize=False) for d, p, r in zip(descriptions, prompts, replies)]
        out = []
        self.tokenizer.padding_side = "right"
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False)
            out.append(torch.sigmoid(self.model(**enc).logits[:, 0].float()))
        return torch.cat(out).numpy() if out else np.zeros(0)


def reward_components(prompts: Sequence[str], replies: Sequence[str], personas: Sequence[str],
                      ctx: RewardContext) -> dict[str, np.ndarray]:
    n = len(replies)
    if not (len(prompts) == len(personas) == n):
        raise ValueError("prompts, replies and personas must have the same length.")
    known = set(ctx.examples or ()) | set(getattr(ctx.classifier, "labels", ()) or ()) | set(ctx.descriptions or ())
    unknown = sorted({p for p in personas if p and known and p not in known})
    if unknown:  # "" (no persona in the prompt) scores 0 on the persona components
        raise ValueError(f"Unknown personas {unknown}; the reward knows {sorted(known)}.")
    enc = lambda texts: np.asarray(ctx.encoder.encode(list(texts)))  # noqa: E731
    reply_vecs = enc([r if r.strip() else "." for r in replies])
    out = {
        "relevance": np.clip((reply_vecs * enc(prompts)).sum(1), 0, 1),
        "length": np.array([length_score(r) for r in replies]),
        "sentiment": np.array([(sentiment(r) + 1) / 2 for r in replies]),
        "repetition": np.array([distinct_n([r], 2) if len(r.split()) > 2 else 1.0 for r in replies]),
        "complete": np.array([complete_score(r) for r in replies]),
    }
    out["goal"] = np.mean([out[k] for k in GOAL_PARTS], axis=0)
    if ctx.examples is not None:
        sims = np.zeros(n)
        for name in set(personas):
            idx = [i for i, p in enumerate(personas) if p == name]
            if name in ctx.examples and ctx.examples[name]:
                sims[idx] = (reply_vecs[idx] @ enc(ctx.examples[name]).T).max(1)
        out["example_similarity"] = np.clip(sims, 0, 1)
    if ctx.classifier is not None:
        probs = ctx.classifier.predict_proba(list(replies))
        labels = ctx.classifier.labels
        out["classifier_confidence"] = np.array(
            [probs[i, labels.index(p)] if p in labels else 0.0 for i, p in enumerate(personas)])
    if ctx.reward_model is not None:
        if not ctx.descriptions:
            raise ValueError("The persona_reward component needs the personas' descriptions (RewardContext.descriptions).")
        scored = [i for i, p in enumerate(personas) if p in ctx.descriptions]
        values = np.zeros(n)
        if scored:
            values[scored] = ctx.reward_model.score([ctx.descriptions[personas[i]] for i in scored],
                                                    [prompts[i] for i in scored], [replies[i] for i in scored])
        out["persona_reward"] = values
    return out


def combined_reward(weights: Optional[Mapping[str, float]] = None, ctx: Optional[RewardContext] = None):
    """A callable (prompts, replies, personas) -> (total, components): the weighted sum of the
    components, every component kept for logging."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    if any(w < 0 for w in weights.values()):
        raise ValueError("Reward weights must be >= 0.")
    if ctx is None:
        raise ValueError("combined_reward needs a RewardContext (encoder, classifier, examples).")

    def reward(prompts, replies, personas):
        parts = reward_components(prompts, replies, personas, ctx)
        missing = [k for k in weights if k not in parts]
        if missing:
            raise ValueError(f"Reward components {missing} are not available with this context.")
        total = sum(w * parts[k] for k, w in weights.items())
        return np.asarray(total, dtype=np.float32), parts

    return reward


def save_reward_weights(weights: Mapping[str, float], folder: str) -> str:
    """Write a run's reward weights to `folder/reward_weights.json`; returns the path."""
    import os

    from personaweave.files import write_json

    path = os.path.join(folder, REWARD_WEIGHTS_FILE)
    write_json({k: float(v) for k, v in weights.items()}, path)
    return path


def load_reward_weights(folder: str) -> dict[str, float]:
    """The reward weights a PPO run trained with (written by `save_reward_weights`)."""
    import json
    import os

    path = os.path.join(folder, REWARD_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {REWARD_WEIGHTS_FILE} in {folder}: not a PPO run folder of this version.")
    with open(path, encoding="utf-8") as handle:
        return {k: float(v) for k, v in json.load(handle).items()}


class CombinedRewardConfig(PretrainedConfig):
    model_type = "personaweave_reward"

    def __init__(self, num_labels: int = 1, **kwargs: Any) -> None:
        super().__init__(num_labels=num_labels, **kwargs)


class _RewardBackbone(nn.Module):
    def __init__(self, owner: CombinedRewardModel) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: no parameters, no recursion

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutput

        rewards = self.owner.reward_for_ids(input_ids, attention_mask)
        hidden = rewards[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1).contiguous()
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=(hidden,))


class CombinedRewardModel(PreTrainedModel):
    """The multi-objective reward behind TRL PPO's reward-model interface (see module docstring)."""

    config_class = CombinedRewardConfig
    base_model_prefix = "backbone"

    def __init__(self, config: CombinedRewardConfig, reward_fn=None, tokenizer: Any = None,
                 persona_token_ids: Optional[Mapping[str, Sequence[int]]] = None,
                 assistant_marker: str = "<|im_start|>assistant") -> None:
        super().__init__(config)
        self.backbone = _RewardBackbone(self)
        self.score = nn.Identity()
        self._anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the model a device/dtype
        self.reward_fn, self.tokenizer, self.assistant_marker = reward_fn, tokenizer, assistant_marker
        self.token_to_persona = {t: name for name, ids in (persona_token_ids or {}).items() for t in ids}
        self.last_components: dict[str, np.ndarray] = {}

    def split(self, text: str) -> tuple[str, str]:
        head, sep, reply = text.rpartition(self.assistant_marker)
        if not sep:
            return text, ""
        user = head.rsplit("<|im_start|>user", 1)[-1]
        clean = lambda s: re.sub(r"<\|[^|]*\|>", "", s).strip()  # noqa: E731
        return clean(user), clean(reply)

    def reward_for_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        prompts, replies, personas = [], [], []
        for row, mask in zip(input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids)):
            ids = row[mask.bool()].tolist()
            personas.append(next((self.token_to_persona[t] for t in ids if t in self.token_to_persona), ""))
            prompt, reply = self.split(self.tokenizer.decode(ids, skip_special_tokens=False))
            prompts.append(prompt)
            replies.append(reply)
        total, parts = self.reward_fn(prompts, replies, personas)
        self.last_components = parts
        return torch.as_tensor(total, dtype=self._anchor.dtype, device=input_ids.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.backbone(input_ids, attention_mask).last_hidden_state
        lengths = (attention_mask.sum(1) - 1) if attention_mask is not None else input_ids.new_full(
            (input_ids.shape[0],), input_ids.shape[1] - 1)
        return SequenceClassifierOutput(logits=hidden[torch.arange(hidden.shape[0]), lengths])
