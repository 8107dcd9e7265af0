"""Reward and KL curves of a PPO run, from its logs, as one PNG.

Reads `<run>/log_history.json` (TRL's per-step metrics: objective/scores, objective/kl,
objective/rlhf_reward) and `<run>/reward_components.jsonl` (each reward component per step).

    python recipes/plot_ppo.py --config recipes/configs/plot_ppo.yaml [--run outputs/ppo]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from trl import TrlParser


@dataclass
class PlotPPOArguments:
    run: str = field(default="outputs/ppo", metadata={"help": "The PPO run folder (its output_dir)."})
    out: str = field(default="docs/figures/ppo_curves.png", metadata={"help": "The PNG to write."})


def make_parser() -> TrlParser:
    return TrlParser((PlotPPOArguments,))


def smooth(values: list[float], window: int = 5) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main(args: PlotPPOArguments) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(args.run, "log_history.json"), encoding="utf-8") as handle:
        logs = [row for row in json.load(handle) if "objective/kl" in row]
    with open(os.path.join(args.run, "reward_components.jsonl"), encoding="utf-8") as handle:
        parts = [json.loads(line) for line in handle]
    steps = np.arange(1, len(logs) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, label in (("objective/scores", "combined reward"), ("objective/rlhf_reward", "reward - KL penalty")):
        axes[0].plot(steps, [r[key] for r in logs], alpha=0.3)
        axes[0].plot(steps[len(steps) - len(smooth([r[key] for r in logs])):], smooth([r[key] for r in logs]),
                     label=label)
    axes[0].set_title("reward per step (5-step mean)")
    for key in ("classifier_confidence", "example_similarity", "goal"):
        series = [r[key] for r in parts]
        axes[1].plot(np.arange(len(series) - len(smooth(series)) + 1, len(series) + 1), smooth(series), label=key)
    axes[1].set_title("reward components (5-step mean)")
    axes[2].plot(steps, [r["objective/kl"] for r in logs], color="tab:red")
    axes[2].set_title("KL(policy || reference) per reply")
    for ax in axes:
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    (plot_args,) = make_parser().parse_args_and_config()
    main(plot_args)
