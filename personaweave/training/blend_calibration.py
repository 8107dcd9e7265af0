"""Balanced blends: the weights at which a blend's replies show each parent as often as asked.

A 50/50 mix of two persona vectors (and of their LoRA sub-personalities) is not a 50/50 mix of voices:
the persona layer and the adapters are non-linear in the weights, and the persona with the sharper voice
takes over (shipped checkpoint, pirate + butler at 0.5 / 0.5, tokens + LoRA: 94% of held-out replies read
as the pirate, 2% as the butler). `calibrate_blend` searches the first parent's weight by bisection so
that, among the replies a judge attributes to either parent, the first parent's share matches the weight
that was asked for; the same weights then mix the vectors and the adapters.

The judge is the *selection* judge and the turns are training turns: calibration chooses something, so the
evaluation judge (which only reports) must never be the one it reads. Two-parent blends only: the
search is one-dimensional.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from personaweave.models.personas import normalise_blend


@dataclass
class BlendProbe:
    """One measured point: the first parent's mixing weight and the share of replies read as each parent."""

    weight: float
    share_first: float
    share_second: float

    @property
    def parent_share(self) -> float:
        return self.share_first + self.share_second

    @property
    def first_ratio(self) -> float:
        """The first parent's share among replies read as either parent (0.5 when neither is read)."""
        return self.share_first / self.parent_share if self.parent_share > 0 else 0.5


@dataclass
class BlendCalibration:
    """`weights` mix the vectors (and adapters); `requested` is what was asked for; `probes` every point measured."""

    requested: dict[str, float]
    weights: dict[str, float]
    probes: list[BlendProbe] = field(default_factory=list)

    @property
    def best(self) -> BlendProbe:
        first = next(iter(self.weights.values()))
        return next(p for p in self.probes if p.weight == first)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"requested": self.requested, "weights": self.weights,
                "shares": dict(zip(self.weights, (best.share_first, best.share_second))),
                "probes": [{"weight": p.weight, "share_first": p.share_first, "share_second": p.share_second}
                           for p in self.probes]}


def balance_weight(measure: Callable[[float], tuple[float, float]], target: float, rounds: int = 5,
                   low: float = 0.05, high: float = 0.95) -> tuple[float, list[BlendProbe]]:
    """Bisection on the first parent's weight x in [low, high] so that share_first / (share_first +
    share_second) approaches `target`. `measure(x)` returns the two shares at x. Starts at `target`
    itself; returns the measured x whose ratio is closest (ties: the larger parent share) and all probes."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target!r}.")
    if not 0.0 < low < high < 1.0:
        raise ValueError(f"Need 0 < low < high < 1, got low={low!r}, high={high!r}.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}.")
    probes: list[BlendProbe] = []
    x = min(max(target, low), high)
    for _ in range(rounds):
        first, second = measure(x)
        probes.append(BlendProbe(round(x, 4), float(first), float(second)))
        if probes[-1].first_ratio > target:
            high = x
        else:
            low = x
        x = (low + high) / 2
    best = min(probes, key=lambda p: (abs(p.first_ratio - target), -p.parent_share))
    return best.weight, probes


def blend_parent_shares(model: Any, tokenizer: Any, name: str, weights: Mapping[str, float], judge: Any,
                        turns: Sequence[str], *, peft: Any = None, adapters: bool = True, max_new_tokens: int = 48,
                        batch_size: int = 32) -> dict[str, float]:
    """Share of replies to `turns` that `judge` reads as each parent, for the blend `weights` made as the
    demo makes it: blended persona tokens, plus the blend of the parents' LoRA sub-personalities when
    `peft` (the PeftModel around `model`) is given, unless `adapters=False`: then the tokens alone, with
    every adapter off (as `serve` answers blends). The blend is added as persona `name` (not yet in the bank) and
    removed afterwards, with its adapter; `name`'s persona tokens stay reserved in the tokenizer, as they
    are for the persona that is then added under that name."""
    from personaweave.chat import chat
    from personaweave.generation import DECODING, generate_replies
    from personaweave.sub_personalities import blend_sub_personalities, master_only

    weights = normalise_blend(weights, model.config.persona_names)
    unknown = sorted(set(weights) - set(judge.names))
    if unknown:
        raise KeyError(f"The judge does not know the parent(s) {unknown}; it knows {judge.names}.")
    if name in model.config.persona_names:
        raise ValueError(f"Persona {name!r} already exists; remove_persona({name!r}) first.")
    model.add_persona(name, blend=weights, tokenizer=tokenizer)
    adapter, active = None, (peft.active_adapter if peft is not None else None)
    try:
        conversations = [chat(name, t, model=model) for t in turns]
        if peft is not None and adapters:
            adapter = blend_sub_personalities(peft, weights, name=f"{name}_lora")
            texts = generate_replies(peft, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, **DECODING).texts
        else:
            with master_only(peft):
                texts = generate_replies(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, **DECODING).texts
    finally:
        model.remove_persona(name)
        if adapter is not None:
            peft.delete_adapter(adapter)
            peft.set_adapter(active)  # deleting the active adapter leaves peft on another one
    probs = judge.persona_probs(texts)
    read = [judge.names[i] if t.strip() else "" for i, t in zip(probs.argmax(-1), texts)]
    return {parent: sum(r == parent for r in read) / max(1, len(read)) for parent in weights}


def calibrate_blend(model: Any, tokenizer: Any, name: str, weights: Mapping[str, float], judge: Any,
                    turns: Sequence[str], *, peft: Any = None, adapters: bool = True, rounds: int = 5,
                    max_new_tokens: int = 48, batch_size: int = 32,
                    log: Optional[Callable[[str], None]] = None) -> BlendCalibration:
    """The two-parent blend weights whose replies (tokens, plus LoRA with `peft` unless `adapters=False`)
    `judge` reads as the parents in the requested proportion, measured as persona `name` (see `blend_parent_shares`). Use the
    selection judge and training turns. Then `model.add_persona(name, blend=result.weights, tokenizer=...)`
    and, with LoRA, `blend_sub_personalities(peft, result.weights)`."""
    requested = normalise_blend(weights, model.config.persona_names)
    requested = {k: v for k, v in requested.items() if v > 0}
    if len(requested) != 2:
        raise ValueError(f"calibrate_blend balances two parents with weights > 0, got {sorted(requested)}.")
    if not turns:
        raise ValueError("calibrate_blend needs at least one user turn to generate replies to.")
    first, second = requested

    def measure(x: float) -> tuple[float, float]:
        shares = blend_parent_shares(model, tokenizer, name, {first: x, second: 1.0 - x}, judge, turns, peft=peft,
                                     adapters=adapters, max_new_tokens=max_new_tokens, batch_size=batch_size)
        if log is not None:
            log(f"{first}={x:.3f}: {first} {shares[first]:.3f}, {second} {shares[second]:.3f}")
        return shares[first], shares[second]

    x, probes = balance_weight(measure, requested[first], rounds=rounds)
    return BlendCalibration(requested, {first: x, second: round(1.0 - x, 4)}, probes)
