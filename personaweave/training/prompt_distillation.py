"""Prompt distillation of personas: persona tokens trained to reproduce what the description in the
prompt does, token by token.

The teacher is the frozen base LM with the persona's description in its system prompt (no persona
tokens); the student is the same base with the persona's reserved tokens instead of the description.
On the teacher's own sampled replies, the student's next-token distribution at every reply position is
pulled towards the teacher's (KL(teacher || student), "Learning by Distilling Context", Snell et al.
2022). Unlike SFT on a few selected replies, every position of every reply carries the teacher's whole
distribution, so many descriptions can be learnt from a few replies each - which is what a description
-> soft-vector map needs to generalise to descriptions it never saw.

TRL's `GKDTrainer` distils with one input for teacher and student; here the two prompts differ (the
description vs the reserved tokens), hence this small `Trainer` subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import Trainer

from personaweave.chat import chat

TEACHER_TEMPLATE = "You are {description}. Stay in character."


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left-padded so every row's reply ends at the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


class PromptDistillationCollator:
    """Rows {persona, description, prompt, reply[, finished]} -> teacher and student batches.

    The teacher sees `teacher_template` (with the description) as its system prompt; the student sees
    the persona's reserved tokens (`personaweave.chat.chat`, no description). Both end with the same
    reply tokens (plus the end-of-turn token when the reply finished), left-padded, so reply position j
    of a row is the same column in both; `reply_mask` (B, R) marks the real reply targets of each row
    among the last R columns.
    """

    def __init__(self, tokenizer: Any, num_persona_tokens: int, *, teacher_template: str = TEACHER_TEMPLATE,
                 max_prompt_tokens: int = 192, max_reply_tokens: int = 64) -> None:
        from personaweave.models.modeling_personaweave import end_of_turn_ids

        if "{description}" not in teacher_template:
            raise ValueError("teacher_template must contain '{description}'.")
        self.tokenizer = tokenizer
        self.num_persona_tokens = num_persona_tokens
        self.teacher_template = teacher_template
        self.max_prompt_tokens = max_prompt_tokens
        self.max_reply_tokens = max_reply_tokens
        self.end_of_turn = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)[-self.max_prompt_tokens:]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        teacher, student, replies = [], [], []
        for row in rows:
            if not row["description"] or not row["reply"]:
                raise ValueError(f"Row for persona {row.get('persona')!r} has an empty description or reply.")
            reply = self.tokenizer(row["reply"], add_special_tokens=False)["input_ids"]
            if row.get("finished", True):
                reply = reply + self.end_of_turn
            reply = reply[: self.max_reply_tokens]
            system = self.teacher_template.format(description=row["description"])
            teacher.append(self._prompt_ids([{"role": "system", "content": system},
                                             {"role": "user", "content": row["prompt"]}]) + reply)
            student.append(self._prompt_ids(chat(row["persona"], row["prompt"],
                                                 num_persona_tokens=self.num_persona_tokens)) + reply)
            replies.append(len(reply))
        width = max(replies)
        reply_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, n in enumerate(replies):
            reply_mask[i, width - n:] = True
        t_ids, t_mask, t_pos = _left_pad(teacher, self.pad_id)
        s_ids, s_mask, s_pos = _left_pad(student, self.pad_id)
        return {"input_ids": s_ids, "attention_mask": s_mask, "position_ids": s_pos,
                "teacher_input_ids": t_ids, "teacher_attention_mask": t_mask, "teacher_position_ids": t_pos,
                "reply_mask": reply_mask}


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student) of the next-token distributions (B, R, V)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # Blocked tokens (reserved persona ids) have -finfo.max logits in both: exp(log_t) = 0 there, and the
    # finite difference keeps 0 * (log_t - log_s) at 0 (no inf - inf).
    per_token = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0) * temperature**2


class PromptDistillationTrainer(Trainer):
    """`Trainer` whose loss is `distillation_kl` between the base with the description in the prompt
    (teacher, no gradient) and the persona model with persona tokens (student). Only the persona
    layer should have `requires_grad` (see `personaweave.training.sft.freeze_base`)."""

    def __init__(self, *args: Any, temperature: float = 1.0, **kwargs: Any) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        super().__init__(*args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Optional[int] = None):
        mask = inputs["reply_mask"]
        keep = mask.shape[1] + 1  # logits at the last R + 1 columns; the first R of them predict the reply
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad():
            teacher = unwrapped.language_model(
                input_ids=inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"],
                position_ids=inputs["teacher_position_ids"], logits_to_keep=keep, use_cache=False).logits
            teacher = unwrapped.mask_persona_logits(teacher)[:, :-1]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        position_ids=inputs["position_ids"], logits_to_keep=keep, use_cache=False)
        loss = distillation_kl(outputs.logits[:, :-1], teacher, mask, self.temperature)
        return (loss, outputs) if return_outputs else loss


__all__ = ["TEACHER_TEMPLATE", "PromptDistillationCollator", "PromptDistillationTrainer", "distillation_kl"]
