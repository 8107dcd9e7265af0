"""Train the description -> soft-vector map on many profile personas, and compare profile encodings.

Two encodings of a profile of 4-5 sentences:

- `whole`: one sentence-encoder vector of the joined text -> `PersonaEmbedding` (an MLP) -> k soft vectors;
- `per_sentence`: one vector per sentence, each through a shared MLP to its own soft vector(s)
  (`SentencePersonaEmbedding`), zero vectors for missing sentences.

Both keep the model's format: `SentencePersonaEmbedding.to_persona_embedding()` writes the per-sentence
map as one `PersonaEmbedding` with block-diagonal weights over the concatenated sentence vectors (the
persona vector is then that concatenation: `ProfileSentenceEncoder`), so the saved remote code, blends
and the seq2seq class need nothing new whichever encoding wins.

Training freezes the language model and learns the persona map only: the soft vectors are put in place
of `num_tokens` placeholder positions of the system turn (`inputs_embeds`), and the loss is the speaker's
reply given the partner's previous turn.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from personaweave.models import PersonaEmbedding
from personaweave.models.modeling_personaweave import end_of_turn_ids

ENCODINGS = ("whole", "per_sentence")
PROFILE_PROMPT = "You are a person with this profile: {profile} Stay in character."
_SENTINEL = "XQZSLOTS"


# --- encodings ----------------------------------------------------------------------------------


class SentencePersonaEmbedding(nn.Module):
    """Concatenated sentence vectors (P, S * d) -> (P, S * m, H): a shared MLP turns each sentence into m
    soft vectors; a learned per-slot bias starts at the mean token embedding, the MLP's output at zero
    (as in `PersonaEmbedding`, so an untrained map is neutral)."""

    def __init__(self, sentence_dim: int, hidden_size: int, max_sentences: int, tokens_per_sentence: int,
                 inner_size: int) -> None:
        super().__init__()
        self.sentence_dim, self.hidden_size = sentence_dim, hidden_size
        self.max_sentences, self.tokens_per_sentence, self.inner_size = max_sentences, tokens_per_sentence, inner_size
        self.num_tokens = max_sentences * tokens_per_sentence
        self.net = nn.Sequential(nn.Linear(sentence_dim, inner_size), nn.GELU(),
                                 nn.Linear(inner_size, tokens_per_sentence * hidden_size))
        self.slot_bias = nn.Parameter(torch.zeros(self.num_tokens, hidden_size))

    def reset_parameters(self, anchor: Optional[torch.Tensor] = None) -> None:
        PersonaEmbedding.reset_parameters(self, anchor)  # same scheme, same attribute names

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        x = vectors.view(-1, self.max_sentences, self.sentence_dim)  # (P, S, d)
        out = self.net(x)  # (P, S, m * H)
        return out.view(-1, self.num_tokens, self.hidden_size) + self.slot_bias

    @torch.no_grad()
    def to_persona_embedding(self) -> PersonaEmbedding:
        """The same map as one `PersonaEmbedding` over the concatenation (block-diagonal weights)."""
        s, d, inner, m, h = self.max_sentences, self.sentence_dim, self.inner_size, self.tokens_per_sentence, \
            self.hidden_size
        out = PersonaEmbedding(s * d, h, s * m, s * inner).to(self.slot_bias)
        first, last = self.net[0], self.net[2]
        out.net[0].weight.zero_()
        out.net[2].weight.zero_()
        for i in range(s):
            out.net[0].weight[i * inner:(i + 1) * inner, i * d:(i + 1) * d] = first.weight
            out.net[0].bias[i * inner:(i + 1) * inner] = first.bias
            out.net[2].weight[i * m * h:(i + 1) * m * h, i * inner:(i + 1) * inner] = last.weight
            out.net[2].bias[i * m * h:(i + 1) * m * h] = last.bias
        out.slot_bias.copy_(self.slot_bias)
        return out


def make_persona_map(encoding: str, sentence_dim: int, hidden_size: int, num_tokens: int, inner_size: int,
                     max_sentences: int = 5, anchor: Optional[torch.Tensor] = None) -> nn.Module:
    """A fresh (neutral) map for `encoding`; `per_sentence` gives num_tokens // max_sentences per sentence."""
    if encoding == "whole":
        layer = PersonaEmbedding(sentence_dim, hidden_size, num_tokens, inner_size)
    elif encoding == "per_sentence":
        if num_tokens % max_sentences:
            raise ValueError(f"per_sentence needs num_tokens ({num_tokens}) to be a multiple of max_sentences "
                             f"({max_sentences}).")
        layer = SentencePersonaEmbedding(sentence_dim, hidden_size, max_sentences, num_tokens // max_sentences,
                                         inner_size)
    else:
        raise ValueError(f"Unknown encoding {encoding!r}; encodings are {list(ENCODINGS)}.")
    layer.reset_parameters(anchor)
    return layer


def split_sentences(text: str) -> list[str]:
    """A profile's sentences: its lines, or else its sentences ('.', '!' or '?' then a space)."""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if len(lines) > 1:
        return lines
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def encode_profiles(profiles: Sequence[Sequence[str]], encoder: Any, encoding: str, max_sentences: int = 5
                    ) -> torch.Tensor:
    """(P, D) persona vectors of profiles given as sentence lists: D = d (whole) or max_sentences * d."""
    if any(not p for p in profiles):
        raise ValueError("Every profile needs at least one sentence.")
    if encoding == "whole":
        return torch.as_tensor(np.asarray(encoder.encode([" ".join(p) for p in profiles])), dtype=torch.float32)
    if encoding != "per_sentence":
        raise ValueError(f"Unknown encoding {encoding!r}; encodings are {list(ENCODINGS)}.")
    kept = [list(p)[:max_sentences] for p in profiles]
    flat = torch.as_tensor(np.asarray(encoder.encode([s for p in kept for s in p])), dtype=torch.float32)
    out = torch.zeros(len(kept), max_sentences, flat.shape[-1])
    row = 0
    for i, p in enumerate(kept):
        out[i, :len(p)] = flat[row:row + len(p)]
        row += len(p)
    return out.view(len(kept), -1)


class ProfileSentenceEncoder:
    """An encoder for `add_persona(description=profile, encoder=...)` on a model whose map is per-sentence:
    splits each description into sentences and concatenates their vectors (zeros past the last one)."""

    def __init__(self, encoder: Any, max_sentences: int = 5) -> None:
        self.encoder, self.max_sentences = encoder, max_sentences
        self.dim = max_sentences * encoder.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string.")
        vectors = encode_profiles([split_sentences(t) for t in texts], self.encoder, "per_sentence",
                                  self.max_sentences)
        return vectors.numpy()


# --- data: (persona, prompt, reply) -> token ids with placeholder slots ----------------------------


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    persona: int  # row of the persona vectors; -1 for none
    slots: int  # number of placeholder positions (at the start of the system turn)
    slot_start: int


def encode_turn(tokenizer: Any, prompt: str, reply: str, *, slots: int = 0, system: Optional[str] = None,
                persona: int = -1, slot_id: int = 0) -> Encoded:
    """Template ids of [system][user: prompt][assistant: reply + end of turn], labels on the reply only.

    `slots` > 0 puts that many placeholder ids at the start of the system turn (where a persona's reserved
    tokens go), followed by `system` if given; `system=None` and no slots: no system turn at all (the
    template's default, if it has one)."""
    messages = [{"role": "user", "content": prompt or "hello"}]
    if slots or system is not None:
        messages.insert(0, {"role": "system", "content": (_SENTINEL if slots else "") + (system or "")})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if slots:
        before, after = text.split(_SENTINEL, 1)
        head = tokenizer(before, add_special_tokens=False)["input_ids"]
        prompt_ids = head + [slot_id] * slots + tokenizer(after, add_special_tokens=False)["input_ids"]
        start = len(head)
    else:
        prompt_ids, start = tokenizer(text, add_special_tokens=False)["input_ids"], 0
    target = tokenizer(reply, add_special_tokens=False)["input_ids"] + end_of_turn_ids(tokenizer)
    return Encoded(prompt_ids + target, [-100] * len(prompt_ids) + target, persona, slots, start)


def collate(rows: Sequence[Encoded], pad_id: int, max_length: Optional[int] = None):
    """Right-padded ids, mask, labels, and per-position slot index (-1 where no slot)."""
    rows = [r if max_length is None or len(r.ids) <= max_length else
            Encoded(r.ids[:max_length], r.labels[:max_length], r.persona, r.slots, r.slot_start) for r in rows]
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    slot = torch.full_like(ids, -1)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = torch.tensor(r.ids)
        mask[i, :len(r.ids)] = 1
        labels[i, :len(r.labels)] = torch.tensor(r.labels)
        slot[i, r.slot_start:r.slot_start + r.slots] = torch.arange(r.slots)
    personas = torch.tensor([r.persona for r in rows])
    return ids, mask, labels, slot, personas


def lm_nll(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, slot: torch.Tensor,
           soft: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed NLL of the labels, label count) with `soft` (B, k, H) in the slot positions."""
    embeds = lm.get_input_embeddings()(ids)
    if soft is not None and (slot >= 0).any():
        gathered = soft.to(embeds.dtype).gather(1, slot.clamp(min=0)[..., None].expand(-1, -1, embeds.shape[-1]))
        embeds = torch.where((slot >= 0)[..., None], gathered, embeds)
    logits = lm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
    return nll, int((target != -100).sum())


# --- training and evaluation ---------------------------------------------------------------------


def train_persona_map(lm: nn.Module, layer: nn.Module, vectors: torch.Tensor, rows: Sequence[Encoded], *,
                      pad_id: int, steps: int, batch_size: int = 8, lr: float = 1e-3, bf16: bool = False,
                      max_length: int = 256, seed: int = 0, log_every: int = 25, log=print) -> list[float]:
    """Train `layer` (the LM frozen) on `rows` with an Accelerate loop; returns the per-step losses.

    bf16 is plain `torch.autocast` rather than Accelerate's mixed precision, so this loop leaves the
    process-wide Accelerate state as it found it (other loops in the same process may want fp32)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.eval()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    layer, optimizer = accelerator.prepare(layer, optimizer)
    device = accelerator.device
    lm, vectors = lm.to(device), vectors.to(device)
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        batch = collate(rng.sample(list(rows), batch_size), pad_id, max_length)
        ids, mask, labels, slot, personas = (t.to(device) for t in batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            soft = layer(vectors[personas])  # (B, k, H)
            nll, count = lm_nll(lm, ids, mask, labels, slot, soft)
        loss = nll / max(count, 1)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
    return losses


@torch.no_grad()
def evaluate_nll(lm: nn.Module, rows: Sequence[Encoded], *, pad_id: int, layer: Optional[nn.Module] = None,
                 vectors: Optional[torch.Tensor] = None, batch_size: int = 16, bf16: bool = False) -> dict[str, float]:
    """Per-token NLL and perplexity of the replies in `rows` (soft vectors from `layer` where rows have slots)."""
    total, count = 0.0, 0
    device = next(lm.parameters()).device
    for i in range(0, len(rows), batch_size):
        ids, mask, labels, slot, personas = (t.to(device) for t in collate(rows[i:i + batch_size], pad_id))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            soft = layer(vectors.to(device)[personas.clamp(min=0)]) if layer is not None else None
            nll, n = lm_nll(lm, ids, mask, labels, slot, soft)
        total += float(nll)
        count += n
    return {"loss": total / max(count, 1), "ppl": math.exp(total / max(count, 1)), "tokens": count}


def save_persona_layer(layer: nn.Module, out_dir: str, base: str, extra: Optional[dict[str, Any]] = None) -> str:
    """Write `layer` in the shipped checkpoint's format (persona_layer.safetensors + persona_config.json, no
    personas), so `personaweave.loading.load_pretrained_personas(out_dir)` builds a model around it."""
    import json
    import os

    from safetensors.torch import save_file

    from personaweave.loading import CONFIG_FILE, LAYER_FILE

    if isinstance(layer, SentencePersonaEmbedding):
        layer = layer.to_persona_embedding()
    os.makedirs(out_dir, exist_ok=True)
    tensors = {f"persona_embedding.{k}": v.detach().float().contiguous().cpu() for k, v in layer.state_dict().items()}
    dim = layer.net[0].in_features
    tensors["persona_vectors"] = torch.zeros(0, dim)
    save_file(tensors, os.path.join(out_dir, LAYER_FILE))
    meta = {"persona_dim": dim, "num_persona_tokens": layer.num_tokens, "persona_hidden_size": layer.net[0].out_features,
            "base": base, "personas": [], **(extra or {})}
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1)
    return out_dir


__all__ = ["ENCODINGS", "ProfileSentenceEncoder", "SentencePersonaEmbedding", "encode_profiles", "encode_turn",
           "evaluate_nll", "make_persona_map", "save_persona_layer", "split_sentences", "train_persona_map"]
