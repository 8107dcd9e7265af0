"""Engagement signals and the simulated conversation environment."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from personaweave.evaluation.signals import SIGNAL_NAMES, extract_signals
from personaweave.serving.adaptation.env import ConversationEnv, profile_traits


def test_signals():
    happy = extract_signals("I love this, tell me more! 😀 What else?", latency_s=3)
    assert happy.sentiment > 0.5 and happy.continuation == 1 and happy.emoji > 0 and happy.questions > 0
    assert happy.latency == pytest.approx(0.05)
    curt = extract_signals("whatever.")
    assert curt.disengagement == 1 and curt.latency == 0.5
    angry = extract_signals("You are annoying and wrong")
    assert angry.negative_feedback == 1 and angry.sentiment < 0
    assert happy.vector().shape == (len(SIGNAL_NAMES),)
    with pytest.raises(TypeError):
        extract_signals(None)


def test_profile_heuristic():
    traits = profile_traits("I love to party with friends.\nI tell funny jokes.")
    assert traits[0] > 0.5 and traits[5] > 0.5 and traits[3] == pytest.approx(0.3)


def make_env(**kw):
    users = [profile_traits("I love to party"), profile_traits("I work as a lawyer in a suit")]
    return ConversationEnv(users, **kw)


def test_env_passes_gymnasium_checks():
    check_env(make_env(), skip_render_check=True)


def test_actions_clamp_and_episodes_end():
    env = make_env()
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(9 * 5 + 4)  # supportiveness +0.2, five times
    assert obs[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Invalid action"):
        env.step(50)
    env = make_env(max_turns=3, noise=0.0)
    env.reset(seed=1)
    done = False
    turns = 0
    while not done:
        _, _, terminated, truncated, _ = env.step(2)  # no change
        done = terminated or truncated
        turns += 1
    assert turns <= 3


def test_reward_components():
    base = {"sentiment": 0.0, "length": 0.5, "continuation": 0.0, "negative_feedback": 0.0}
    assert ConversationEnv.reward(base) == pytest.approx(0.3)
    assert ConversationEnv.reward({**base, "continuation": 1.0}) == pytest.approx(0.6)
    assert ConversationEnv.reward({**base, "negative_feedback": 1.0}) == pytest.approx(-0.2)
    assert ConversationEnv.reward(base, blocked=True) == pytest.approx(-0.7)
    with pytest.raises(ValueError):
        ConversationEnv([])


def test_matching_traits_earn_more_than_opposite_ones():
    user = np.full(10, 0.9, np.float32)
    good = ConversationEnv([user], start_traits=np.full(10, 0.9), noise=0.0)
    bad = ConversationEnv([user], start_traits=np.full(10, 0.1), noise=0.0)

    def run(env):
        env.reset(seed=0)
        return sum(env.step(2)[1] for _ in range(10))

    assert run(good) > run(bad) + 3


def test_persona_adapter_blends_gradually():
    from personaweave.serving.adaptation.engine import TraitAdaptationEngine
    from personaweave.testing import tiny_persona_model

    model, tok = tiny_persona_model()
    humor_up = 5 * 5 + 4  # humor +0.2
    adapter = TraitAdaptationEngine(model, tok, policy=lambda obs: humor_up, smoothing=0.5)
    name = adapter.step("alice", "haha tell me more")
    assert name == "user-alice" and name in model.config.persona_names
    assert adapter.states["alice"][5] == pytest.approx(0.6)  # half of the +0.2 step
    vocab = len(tok)
    for _ in range(5):
        adapter.step("alice", "lol")
    assert adapter.states["alice"][5] > 0.9
    assert model.config.persona_names.count("user-alice") == 1 and len(tok) == vocab  # updated in place
    blend = model.personas["user-alice"].blend
    assert sum(blend.values()) == pytest.approx(1.0) and min(blend.values()) >= 0
    assert adapter.step("bob", "hi") == "user-bob"
    with pytest.raises(ValueError, match="smoothing"):
        TraitAdaptationEngine(model, tok, smoothing=0)


def test_policy_export_round_trip(tmp_path):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import DQN, PPO

    from personaweave.serving.adaptation.policy import export_policy, load_policy

    env = make_env()
    obs, _ = env.reset(seed=0)
    for cls in (DQN, PPO):
        model = cls("MlpPolicy", env, seed=0, verbose=0)
        folder = export_policy(model, str(tmp_path / cls.__name__), cls.__name__.lower())
        assert sorted(p.name for p in (tmp_path / cls.__name__).iterdir()) == ["policy.json", "policy.safetensors"]
        act = load_policy(folder)
        expected, _ = model.predict(obs, deterministic=True)
        assert act(obs) == int(expected)
