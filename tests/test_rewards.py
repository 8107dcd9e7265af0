"""Reward components, the combined reward, and TRL PPO's reward-model interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personaweave import chat
from personaweave.training.rewards import (
    CombinedRewardConfig,
    CombinedRewardModel,
    RewardContext,
    combined_reward,
    complete_score,
    length_score,
    reward_components,
)


class FakeClassifier:
    labels = ["robot", "pirate"]

    def predict_proba(self, texts):
        return np.array([[0.1, 0.9] if "ahoy" in t else [0.8, 0.2] for t in texts])


@pytest.fixture
def ctx(hash_encoder):
    return RewardContext(encoder=hash_encoder, classifier=FakeClassifier(),
                         examples={"pirate": ["ahoy matey"], "robot": ["beep logic"]})


def test_goal_parts():
    assert length_score("") == 0 and length_score("a b c d") == 0.5 and length_score("w " * 20) == 1
    assert complete_score("Fine.") == 1 and complete_score("and then the") == 0 and complete_score("") == 0


def test_components_and_weights(ctx):
    parts = reward_components(["hi"] * 2, ["ahoy matey , a fine day !", "beep ."], ["pirate", "robot"], ctx)
    assert parts["classifier_confidence"].tolist() == pytest.approx([0.9, 0.8])
    assert set(parts) >= {"relevance", "length", "sentiment", "repetition", "complete", "goal", "example_similarity"}
    total, _ = combined_reward({"classifier_confidence": 2.0}, ctx)(["hi"], ["ahoy there."], ["pirate"])
    assert total[0] == pytest.approx(1.8)
    with pytest.raises(ValueError, match=">= 0"):
        combined_reward({"goal": -1}, ctx)
    with pytest.raises(ValueError, match="same length"):
        reward_components(["hi"], ["a", "b"], ["robot"], ctx)


def test_reward_model_speaks_trls_ppo_interface(ctx, persona_model):
    """trl.experimental.utils.get_reward reads our combined reward at the last response token."""
    from trl.experimental.utils import get_reward

    model, tok = persona_model
    reward_fn = combined_reward({"classifier_confidence": 1.0}, ctx)
    rm = CombinedRewardModel(CombinedRewardConfig(), reward_fn=reward_fn, tokenizer=tok,
                             persona_token_ids=dict(zip(model.config.persona_names, model.config.persona_token_ids)),
                             assistant_marker="<|im_start|> assistant")
    prompt = tok.apply_chat_template(chat("pirate", "hello", model=model), add_generation_prompt=True,
                                     return_tensors="pt")
    reply = tok(" ahoy ! ahoy", return_tensors="pt", add_special_tokens=False)["input_ids"]
    query_response = torch.cat([prompt, reply, torch.full((1, 2), tok.pad_token_id)], dim=1)
    _, score, lengths = get_reward(rm, query_response, tok.pad_token_id, prompt.shape[1])
    assert score.tolist() == pytest.approx([0.9])
    assert int(lengths[0]) == prompt.shape[1] + reply.shape[1] - 1
    assert rm.last_components["classifier_confidence"].tolist() == pytest.approx([0.9])


def test_bad_input_empty_reply_and_unknown_persona(ctx):
    parts = reward_components(["hi", "hi"], ["", "Ahoy matey, a fine day for sailing!"], ["pirate", "pirate"], ctx)
    assert parts["complete"][0] == 0 and parts["length"][0] == 0 and parts["goal"][0] < parts["goal"][1]
    with pytest.raises(ValueError, match="Unknown personas \\['ghost'\\]"):
        reward_components(["hi"], ["beep."], ["ghost"], ctx)
    no_persona = reward_components(["hi"], ["beep."], [""], ctx)  # a prompt without persona tokens
    assert no_persona["classifier_confidence"][0] == 0 and no_persona["example_similarity"][0] == 0


@pytest.mark.slow
def test_each_component_prefers_the_in_character_reply():
    """Real MiniLM: an in-character reply beats an out-of-character one on every persona component,
    and a relevant, complete, friendly reply beats a curt, truncated, repetitive one on the goal."""
    from personaweave.encoders import default_encoder

    class KeywordClassifier:  # the trained classifier is not shipped; this one reads pirate talk
        labels = ["pirate", "butler"]

        def predict_proba(self, texts):
            words = [set(t.lower().replace(",", " ").replace("!", " ").split()) for t in texts]
            return np.array([[0.9, 0.1] if w & {"arr", "matey", "ahoy"} else [0.2, 0.8] for w in words])

    ctx = RewardContext(encoder=default_encoder(), classifier=KeywordClassifier(),
                        examples={"pirate": ["Arr, matey! The sea be calling and me ship be ready to sail.",
                                             "Ahoy! Hoist the sails, we plunder at dawn!"],
                                  "butler": ["Very good, sir. Shall I prepare the tea in the drawing room?"]})
    prompt = "What do you like to do on weekends?"
    replies = ["Arr, matey! I sail the seven seas and hunt for treasure with me crew every weekend.",
               "Very good, sir. I spend my weekends polishing the silver and arranging the library."]
    parts = reward_components([prompt] * 2, replies, ["pirate", "pirate"], ctx)
    assert parts["classifier_confidence"][0] > parts["classifier_confidence"][1]
    assert parts["example_similarity"][0] > parts["example_similarity"][1]
    good = "On weekends I love hiking with friends and cooking a big, happy dinner together."
    bad = "weekends weekends weekends weekends and the"
    goal = reward_components([prompt] * 2, [good, bad], ["pirate"] * 2, ctx)
    for key in ("relevance", "repetition", "complete", "goal"):
        assert goal[key][0] > goal[key][1], key


def _tiny_reward_model(tmp_path):
    from transformers import LlamaForSequenceClassification

    from personaweave.testing import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer(("ahoy", "matey", "beep", "logic", "pirate", "robot", "you", "are", "a"))
    config = tiny_llama(len(tokenizer), seed=3).config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model, tokenizer


def test_persona_reward_component_scores_with_the_trained_reward_model(tmp_path, hash_encoder):
    from personaweave.training.rewards import PersonaRewardScorer

    model, tokenizer = _tiny_reward_model(tmp_path)
    scorer = PersonaRewardScorer.from_pretrained(str(tmp_path), batch_size=2)
    descriptions = {"pirate": "a pirate", "robot": "a robot"}
    prompts, replies = ["hi", "hi", "hi"], ["ahoy matey", "beep logic", "ahoy"]
    scores = scorer.score([descriptions["pirate"]] * 3, prompts, replies)
    # the same conversations one at a time, straight through the model: batching and padding change nothing
    for reply, got in zip(replies, scores):
        text = tokenizer.apply_chat_template([{"role": "system", "content": "You are a pirate."},
                                              {"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": reply}], tokenize=False)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert torch.sigmoid(model(**enc).logits[0, 0]).item() == pytest.approx(float(got), abs=1e-5)
    assert ((scores > 0) & (scores < 1)).all() and len(set(np.round(scores, 6))) == 3
    ctx = RewardContext(encoder=hash_encoder, reward_model=scorer, descriptions=descriptions)
    parts = reward_components(prompts, replies, ["pirate", "pirate", ""], ctx)
    assert parts["persona_reward"][:2].tolist() == pytest.approx(scores[:2].tolist(), abs=1e-5)
    assert parts["persona_reward"][2] == 0.0  # no persona in the prompt
    total, _ = combined_reward({"persona_reward": 2.0}, ctx)(prompts[:1], replies[:1], ["pirate"])
    assert total[0] == pytest.approx(2 * scores[0], abs=1e-5)
    with pytest.raises(ValueError, match="Unknown personas"):
        reward_components(["hi"], ["ahoy"], ["ghost"], ctx)
    with pytest.raises(ValueError, match="descriptions"):
        reward_components(["hi"], ["ahoy"], ["pirate"], RewardContext(encoder=hash_encoder, reward_model=scorer))


def test_persona_reward_scorer_refuses_a_classifier_with_many_labels(tmp_path):
    from transformers import LlamaForSequenceClassification

    from personaweave.testing import tiny_llama, tiny_tokenizer
    from personaweave.training.rewards import PersonaRewardScorer

    tokenizer = tiny_tokenizer()
    config = tiny_llama(len(tokenizer)).config
    config.num_labels = 3
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a reward model"):
        PersonaRewardScorer.from_pretrained(str(tmp_path))
