"""Two judges with separate jobs: one selects training data (and serves as reward), one reports results.

- `SelectionJudge` picks training data: persona evidence from the personas' *example lines* (a
  contrastive nearest-prototype score over the bank, MiniLM), relevance to the user turn, fluency
  (the bare base model's per-token log-likelihood of the reply given the turn), and penalties for
  empty, cut-off, looping, description-restating or character-breaking replies.
- `EvaluationJudge` never selects or trains anything. It is zero-shot: each persona's prototype is
  built from its description and the hand-written held-out lines in `personaweave/data/eval_anchors.json`,
  which no training or selection code reads (tests/test_judges.py fails if one does). It reports
  relevance and fluency beside persona accuracy for every row, so that keyword stuffing or off-topic
  replies cannot pass as "in character".

Conclusions are drawn from the evaluation judge; the selection judge's numbers are shown beside it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

import numpy as np
import torch

ANCHORS_FILE = "eval_anchors.json"
STYLE_ANCHORS_FILE = "eval_anchors_style.json"
HARD_PENALTIES = ("empty", "repetition", "restates_description", "breaks_character")


def load_eval_anchors() -> dict[str, list[str]]:
    """The held-out, hand-written in-voice lines of the default personas (evaluation only)."""
    text = resources.files("personaweave.data").joinpath(ANCHORS_FILE).read_text("utf-8")
    return {name: list(lines) for name, lines in json.loads(text)["anchors"].items()}


def load_style_eval_anchors(names: Sequence[str]) -> dict[str, list[str]]:
    """Held-out lines for composed style personas (`role-temperament-habit`, see
    `personaweave.zoo.load_style_personas`): the role's and the temperament's anchor lines."""
    text = resources.files("personaweave.data").joinpath(STYLE_ANCHORS_FILE).read_text("utf-8")
    spec = json.loads(text)
    out = {}
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] not in spec["roles"] or parts[1] not in spec["temperaments"]:
            raise KeyError(f"{name!r} is not a composed style persona (role-temperament-habit).")
        out[name] = [*spec["roles"][parts[0]], *spec["temperaments"][parts[1]]]
    return out


# --- shared measurements ------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def penalties(reply: str, description: Optional[str] = None) -> dict[str, bool]:
    """Which defects a reply has: empty, cut off mid-sentence, a repetition loop, restating the
    persona's description (4 consecutive words of it), or breaking character ("as an AI")."""
    words = reply.split()
    trigrams = list(zip(words, words[1:], words[2:]))
    looping = bool(trigrams) and (max(Counter(trigrams).values()) >= 3 or len(set(trigrams)) / len(trigrams) < 0.75)
    restates = False
    if description:
        desc = _normalise(description).split()
        low = " " + _normalise(reply) + " "
        restates = any(" " + " ".join(desc[i:i + 4]) + " " in low for i in range(len(desc) - 3))
    return {
        "empty": len(words) < 3,
        "cut_off": bool(words) and not re.search(r"[.!?]['\")\]]*\s*$", reply.strip()),
        "repetition": looping,
        "restates_description": restates,
        "breaks_character": bool(re.search(r"\b(as an ai|language model|i am smollm|i'm smollm)\b", reply.lower())),
    }


def relevance(encoder: Any, prompts: Sequence[str], replies: Sequence[str]) -> np.ndarray:
    """Cosine similarity (MiniLM, unit vectors) between each reply and the user turn it answers."""
    if not replies:
        return np.zeros(0, dtype=np.float32)
    p, r = np.asarray(encoder.encode(list(prompts))), np.asarray(encoder.encode(list(replies)))
    return (p * r).sum(1)


@torch.no_grad()
def fluency(model: Any, tokenizer: Any, prompts: Sequence[str], replies: Sequence[str], batch_size: int = 16,
            max_reply_tokens: int = 96) -> np.ndarray:
    """Mean log-likelihood per reply token under the *bare* base model, given only the user turn
    (chat template, no persona, no system prompt). Empty replies get -inf."""
    out = np.full(len(replies), -math.inf, dtype=np.float64)
    eos = tokenizer.eos_token_id
    for start in range(0, len(replies), batch_size):
        rows, spans = [], []
        for i in range(start, min(start + batch_size, len(replies))):
            reply_ids = tokenizer(replies[i], add_special_tokens=False)["input_ids"][:max_reply_tokens]
            if not reply_ids:
                continue
            prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompts[i]}],
                                                       add_generation_prompt=True, tokenize=True)
            rows.append((i, list(prompt_ids) + reply_ids))
            spans.append((len(prompt_ids), len(reply_ids)))
        if not rows:
            continue
        width = max(len(ids) for _, ids in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (_, ids) in enumerate(rows):  # right padding: positions stay 0..n-1
            input_ids[j, :len(ids)] = torch.tensor(ids)
            mask[j, :len(ids)] = 1
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
        for j, ((i, ids), (p_len, r_len)) in enumerate(zip(rows, spans)):
            targets = torch.tensor(ids[p_len:p_len + r_len])
            picked = logprobs[j, p_len - 1:p_len - 1 + r_len].gather(-1, targets[:, None]).squeeze(-1)
            out[i] = float(picked.mean())
    return out


def _prototypes(encoder: Any, texts_by_persona: Mapping[str, Sequence[str]]) -> tuple[list[str], np.ndarray]:
    names = list(texts_by_persona)
    protos = []
    for name in names:
        vecs = np.asarray(encoder.encode(list(texts_by_persona[name])))
        mean = vecs.mean(0)
        protos.append(mean / (np.linalg.norm(mean) + 1e-8))
    return names, np.stack(protos)


def _softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x / temperature
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@dataclass
class Verdicts:
    """Per-reply judgements; `summary()` averages them (the numbers in a results table)."""

    personas: list[str]
    predicted: list[str]
    persona_prob: np.ndarray
    relevance: np.ndarray
    fluency: np.ndarray
    defects: list[dict[str, bool]] = field(default_factory=list)
    scores: Optional[np.ndarray] = None

    def summary(self) -> dict[str, float]:
        correct = [p == t for p, t in zip(self.predicted, self.personas)]
        finite = self.fluency[np.isfinite(self.fluency)]
        out = {
            "n": len(self.personas),
            "persona_accuracy": float(np.mean(correct)) if correct else float("nan"),
            "persona_prob": float(self.persona_prob.mean()) if len(self.persona_prob) else float("nan"),
            "relevance": float(self.relevance.mean()) if len(self.relevance) else float("nan"),
            "fluency": float(finite.mean()) if len(finite) else float("nan"),
        }
        for name in ("empty", "cut_off", "repetition", "restates_description", "breaks_character"):
            out[f"rate_{name}"] = float(np.mean([d[name] for d in self.defects])) if self.defects else 0.0
        if self.scores is not None and len(self.scores):
            out["score"] = float(np.mean(self.scores))
        return out


class _Judge:
    temperature = 0.05

    def __init__(self, names: list[str], prototypes: np.ndarray, encoder: Any, descriptions: Mapping[str, str],
                 base_model: Any = None, tokenizer: Any = None) -> None:
        self.names, self.prototypes, self.encoder = names, prototypes, encoder
        self.descriptions = dict(descriptions)
        self.base_model, self.tokenizer = base_model, tokenizer

    def persona_probs(self, replies: Sequence[str]) -> np.ndarray:
        """(len(replies), len(personas)) softmax over cosine similarity to each persona's prototype."""
        if not replies:
            return np.zeros((0, len(self.names)))
        vecs = np.asarray(self.encoder.encode(list(replies)))
        return _softmax(vecs @ self.prototypes.T, self.temperature)

    def judge(self, prompts: Sequence[str], replies: Sequence[str], personas: Sequence[str]) -> Verdicts:
        if not len(prompts) == len(replies) == len(personas):
            raise ValueError("prompts, replies and personas must have the same length.")
        unknown = sorted(set(personas) - set(self.names))
        if unknown:
            raise KeyError(f"Unknown persona(s) {unknown}; this judge knows {self.names}.")
        probs = self.persona_probs(replies)
        index = [self.names.index(p) for p in personas]
        rel = relevance(self.encoder, prompts, replies)
        flu = (fluency(self.base_model, self.tokenizer, prompts, replies) if self.base_model is not None
               else np.full(len(replies), np.nan))
        defects = [penalties(r, self.descriptions.get(p)) for r, p in zip(replies, personas)]
        # an empty reply identifies nobody: it counts as wrong
        predicted = [self.names[i] if r.strip() else "" for i, r in zip(probs.argmax(-1), replies)] if len(probs) else []
        return Verdicts(list(personas), predicted,
                        probs[np.arange(len(index)), index] if len(index) else np.zeros(0), rel, flu, defects)


class EvaluationJudge(_Judge):
    """Zero-shot persona identification from descriptions + held-out hand-written anchor lines.

    Never used to select or train anything. A persona's prototype is the normalised mean of the
    MiniLM embeddings of its description and its anchor lines; a reply is identified as the persona
    whose prototype it is closest to (accuracy), with relevance and fluency reported beside it.
    """

    @classmethod
    def from_default_personas(cls, encoder: Any = None, base_model: Any = None, tokenizer: Any = None,
                              anchors: Optional[Mapping[str, Sequence[str]]] = None) -> EvaluationJudge:
        from personaweave.zoo import load_default_personas

        return cls.from_personas(load_default_personas(), anchors or load_eval_anchors(), encoder, base_model, tokenizer)

    @classmethod
    def from_personas(cls, personas: Sequence[Any], anchors: Mapping[str, Sequence[str]], encoder: Any = None,
                      base_model: Any = None, tokenizer: Any = None) -> EvaluationJudge:
        """A judge over any closed set of personas: each one's description + its held-out anchor lines."""
        from personaweave.encoders import default_encoder

        encoder = encoder or default_encoder()
        descriptions = {p.name: p.description for p in personas}
        missing = sorted(set(descriptions) - set(anchors))
        if missing:
            raise ValueError(f"No evaluation anchors for {missing}.")
        texts = {name: [descriptions[name], *anchors[name]] for name in descriptions}
        names, protos = _prototypes(encoder, texts)
        return cls(names, protos, encoder, descriptions, base_model, tokenizer)

    @classmethod
    def from_style_personas(cls, personas: Sequence[Any], encoder: Any = None, base_model: Any = None,
                            tokenizer: Any = None) -> EvaluationJudge:
        """A judge over composed style personas, from `eval_anchors_style.json`."""
        anchors = load_style_eval_anchors([p.name for p in personas])
        return cls.from_personas(personas, anchors, encoder, base_model, tokenizer)


class SelectionJudge(_Judge):
    """Scores candidate replies to choose training data (best-of-N) and preference pairs; a reward.

        on_topic = clip(relevance / relevance_target, 0, 1)
        score = persona * P(persona | reply) * on_topic          (in character AND answering the turn)
              + relevance * min(relevance, relevance_cap)         (a small tie-break towards on-topic)
              - fluency * max(0, fluency_floor - log-likelihood)  (only clearly disfluent text pays)
              - hard_penalty * (empty + looping + restating the description + breaking character)
              - cut_off * (ends mid-sentence)

    P(persona | reply) is a softmax over the bank of cosine similarity to each persona's *example
    lines* (`default_personas.json`); the evaluation anchors are never read. The product makes an
    in-character reply that ignores the user worth little, and a bland on-topic one too; raw
    log-likelihood is not rewarded (a 135M model finds any stylised voice unlikely), only a floor.
    """

    def __init__(self, *args: Any, weights: Optional[Mapping[str, float]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights = {"persona": 1.0, "relevance": 0.2, "relevance_target": 0.3, "relevance_cap": 0.5,
                        "fluency": 0.2, "fluency_floor": -4.0, "hard_penalty": 1.0, "cut_off": 0.3,
                        **(weights or {})}

    @classmethod
    def from_personas(cls, personas: Sequence[Any], encoder: Any = None, base_model: Any = None,
                      tokenizer: Any = None, weights: Optional[Mapping[str, float]] = None) -> SelectionJudge:
        from personaweave.encoders import default_encoder

        encoder = encoder or default_encoder()
        if any(not p.examples for p in personas):
            raise ValueError("The selection judge needs example lines for every persona.")
        names, protos = _prototypes(encoder, {p.name: list(p.examples) for p in personas})
        return cls(names, protos, encoder, {p.name: p.description or "" for p in personas}, base_model, tokenizer,
                   weights=weights)

    def judge(self, prompts: Sequence[str], replies: Sequence[str], personas: Sequence[str]) -> Verdicts:
        verdicts = super().judge(prompts, replies, personas)
        w = self.weights
        flu = np.nan_to_num(np.where(np.isfinite(verdicts.fluency), verdicts.fluency, -10.0), nan=w["fluency_floor"])
        hard = np.array([sum(d[k] for k in HARD_PENALTIES) for d in verdicts.defects], dtype=float)
        cut = np.array([d["cut_off"] for d in verdicts.defects], dtype=float)
        on_topic = np.clip(verdicts.relevance / w["relevance_target"], 0.0, 1.0)
        verdicts.scores = (w["persona"] * verdicts.persona_prob * on_topic
                           + w["relevance"] * np.minimum(verdicts.relevance, w["relevance_cap"])
                           - w["fluency"] * np.maximum(0.0, w["fluency_floor"] - flu)
                           - w["hard_penalty"] * hard - w["cut_off"] * cut)
        return verdicts




def habit_score(reply: str, habit: str) -> float:
    """1.0 when a reply shows a composed persona's speech habit, else 0.25 (a soft gate):
    `asks` = its last sentence is a question; `short` = at most 9 words per sentence on average."""
    text = reply.strip()
    if habit == "asks":
        return 1.0 if text.endswith("?") else 0.25
    if habit == "short":
        sentences = [x for x in re.split(r"[.!?]+", text) if x.strip()]
        words = len(text.split()) / max(1, len(sentences))
        return 1.0 if sentences and words <= 9 else 0.25
    raise KeyError(f"Unknown speech habit {habit!r}.")


class StyleSelectionJudge(SelectionJudge):
    """The selection judge for composed style personas (`role-temperament-habit`).

    A softmax over 64 near-duplicate prototypes spreads P(persona | reply) thin (mean 0.037 on real
    candidates, so almost nothing clears the threshold). Here a persona's probability factorises:
    P(role | reply) over the roles' example lines x P(temperament | reply) over the temperaments'
    example lines x a rule check of the speech habit (`habit_score`). Example lines come from
    `style_personas.json`; the evaluation anchors are never read.
    """

    @classmethod
    def from_style_personas(cls, personas: Sequence[Any], encoder: Any = None, base_model: Any = None,
                            tokenizer: Any = None, weights: Optional[Mapping[str, float]] = None) -> StyleSelectionJudge:
        from personaweave.encoders import default_encoder
        from personaweave.zoo import STYLE_PERSONAS_FILE

        encoder = encoder or default_encoder()
        spec = json.loads(resources.files("personaweave.data").joinpath(STYLE_PERSONAS_FILE).read_text("utf-8"))
        judge = cls([p.name for p in personas], np.zeros((len(personas), 1)), encoder,
                     {p.name: p.description or "" for p in personas}, base_model, tokenizer, weights=weights)
        judge.roles, judge.role_protos = _prototypes(encoder, {k: v["examples"] for k, v in spec["roles"].items()})
        judge.tempers, judge.temper_protos = _prototypes(
            encoder, {k: v["examples"] for k, v in spec["temperaments"].items()})
        return judge

    def persona_probs(self, replies: Sequence[str]) -> np.ndarray:
        if not replies:
            return np.zeros((0, len(self.names)))
        vecs = np.asarray(self.encoder.encode(list(replies)))
        roles = _softmax(vecs @ self.role_protos.T, self.temperature)
        tempers = _softmax(vecs @ self.temper_protos.T, self.temperature)
        out = np.zeros((len(replies), len(self.names)))
        for j, name in enumerate(self.names):
            role, temper, habit = name.split("-")
            out[:, j] = (roles[:, self.roles.index(role)] * tempers[:, self.tempers.index(temper)]
                         * np.array([habit_score(r, habit) for r in replies]))
        return out


__all__ = ["EvaluationJudge", "SelectionJudge", "StyleSelectionJudge", "Verdicts", "fluency", "habit_score",
           "load_eval_anchors", "penalties", "relevance"]
