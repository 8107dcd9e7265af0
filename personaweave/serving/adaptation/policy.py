"""Trait-adjustment policies: training with stable-baselines3, baselines, and a pickle-free export.

SB3 saves zip files that hold pickles: fine for our own checkpoints, not for what users download.
`export_policy` writes the deterministic policy network as safetensors + a JSON description, and
`load_policy` rebuilds it as a plain torch MLP (no SB3 needed to run it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from personaweave.models.personas import Persona
from personaweave.serving.adaptation.env import ConversationEnv

ACTIVATIONS = {"ReLU": nn.ReLU, "Tanh": nn.Tanh}


def policy_layers(model: Any) -> list[nn.Module]:
    """The deterministic action network of an SB3 DQN or PPO model, as a flat list of layers."""
    if hasattr(model, "q_net"):  # DQN: argmax of Q-values
        return list(model.q_net.q_net)
    policy = model.policy  # PPO: argmax of the action logits
    return list(policy.mlp_extractor.policy_net) + [policy.action_net]


def export_policy(model: Any, folder: str, algorithm: str) -> str:
    from safetensors.torch import save_file

    layers = policy_layers(model)
    spec, tensors = [], {}
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            spec.append({"type": "Linear", "in": layer.in_features, "out": layer.out_features})
            tensors[f"{i}.weight"] = layer.weight.detach().cpu().contiguous()
            tensors[f"{i}.bias"] = layer.bias.detach().cpu().contiguous()
        elif type(layer).__name__ in ACTIVATIONS:
            spec.append({"type": type(layer).__name__})
        else:
            raise ValueError(f"Cannot export layer {layer!r}.")
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "policy.safetensors"))
    with open(os.path.join(folder, "policy.json"), "w", encoding="utf-8") as handle:
        json.dump({"algorithm": algorithm, "layers": spec, "action": "argmax"}, handle, indent=2)
    return folder


def load_policy(folder: str) -> Callable[[np.ndarray], int]:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "policy.json"), encoding="utf-8") as handle:
        spec = json.load(handle)
    layers = [nn.Linear(s["in"], s["out"]) if s["type"] == "Linear" else ACTIVATIONS[s["type"]]()
              for s in spec["layers"]]
    net = nn.Sequential(*layers)
    net.load_state_dict(load_file(os.path.join(folder, "policy.safetensors")))
    net.eval()

    def act(observation: np.ndarray) -> int:
        with torch.no_grad():
            return int(net(torch.as_tensor(observation, dtype=torch.float32)[None]).argmax(-1))

    return act


def run_episodes(env: ConversationEnv, act: Callable[[np.ndarray], int], episodes: int, seed: int
                 ) -> tuple[list[float], list[int]]:
    returns, lengths = [], []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed * 100_000 + e)
        total, done, turns = 0.0, False, 0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += reward
            turns += 1
            done = terminated or truncated
        returns.append(total)
        lengths.append(turns)
    return returns, lengths


def fixed_persona_envs(users: Sequence[np.ndarray], personas: Sequence[Persona]) -> dict[str, ConversationEnv]:
    """One environment per bank persona, its traits fixed (the policy always holds)."""
    from personaweave.models.personas import TRAITS

    return {p.name: ConversationEnv(users, start_traits=np.array([p.traits[t] for t in TRAITS], np.float32))
            for p in personas if p.traits}
