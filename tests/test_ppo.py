"""TRL PPO with the PersonaWeave policy (LoRA), a value head on the base and the combined reward."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class UniformClassifier:
    labels = ["librarian", "robot", "pirate", "butler", "coach", "counselor", "grump", "scientist"]

    def predict_proba(self, texts):
        return np.full((len(texts), 8), 1 / 8)


def tiny_dataset(path):
    from datasets import Dataset

    rows = [{"persona": p, "description": "", "traits": [0.5] * 10, "messages": [], "prompt": q, "response": "ok",
             "source": "test"} for p in UniformClassifier.labels for q in ("hello what", "why is the sea good ?")]
    for split in ("train", "validation", "test"):
        Dataset.from_list(rows).to_parquet(str(path / f"{split}.parquet"))
    return str(path)


def test_ppo_runs_and_trains_only_the_lora_adapter(tmp_path, hash_encoder):
    pytest.importorskip("trl.experimental.ppo")
    ppo = load_recipe("ppo")
    from trl.experimental.ppo import PPOConfig

    from personaweave.testing import tiny_persona_model

    model, tok = tiny_persona_model()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]}, replace_additional_special_tokens=False)
    model.language_model.resize_token_embeddings(len(tok), mean_resizing=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    script = ppo.PPOScriptArguments(max_prompts=8, lora_r=4, dataset_dir=tiny_dataset(tmp_path))
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=4, total_episodes=8,
                     response_length=6, num_ppo_epochs=1, num_mini_batches=1, report_to="none", bf16=False,
                     use_cpu=True, save_strategy="no", num_sample_generations=0, learning_rate=1e-2)
    _, trainer = ppo.main(script, args, model=model, tokenizer=tok, classifier=UniformClassifier(),
                          encoder=hash_encoder)
    policy = trainer.model.policy
    lora = {n: p for n, p in policy.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().max() > 0 for p in lora.values())  # LoRA B starts at zero: it moved
    for name, value in base.items():  # the master itself is untouched (the reference = adapters off)
        key = "base_model.model." + name
        current = dict(policy.named_parameters()).get(key.replace(".weight", ".base_layer.weight"),
                                                      dict(policy.named_parameters()).get(key))
        if current is not None and current.shape == value.shape:
            assert torch.equal(current.detach(), value)
    assert any("objective/scores" in h for h in trainer.state.log_history)
    from personaweave.training.rewards import load_reward_weights

    assert load_reward_weights(args.output_dir) == script.reward_weights  # what ppo_eval will score with


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ppo_eval_kl_is_zero_for_an_untouched_adapter_and_positive_after(hash_encoder):
    from peft import get_peft_model

    from personaweave.sub_personalities import lora_config
    from personaweave.testing import tiny_persona_model
    from personaweave.training.rewards import RewardContext

    evaluation = load_recipe("ppo_eval")
    model, tok = tiny_persona_model()
    tok.padding_side = "left"
    policy = get_peft_model(model, lora_config(r=4, dropout=0.0)).eval()
    ctx = RewardContext(encoder=hash_encoder, classifier=UniformClassifier(),
                        examples={p.name: p.examples or ["ok"] for p in model.personas})
    prompts, neutral = ["hello what", "why is the sea good ?"], ["the sea is good"]
    args = (policy, tok, model, UniformClassifier(), ctx, prompts, neutral, 0)
    before = evaluation.evaluate(*args, reference=True)
    untouched = evaluation.evaluate(*args, reference=False)
    assert before["kl_to_reference"] == 0.0 and abs(untouched["kl_to_reference"]) < 1e-5  # LoRA B = 0
    assert untouched["perplexity_neutral"] == pytest.approx(before["perplexity_neutral"], rel=1e-5)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    moved = evaluation.evaluate(*args, reference=False)
    assert moved["kl_to_reference"] > 0.01
    assert moved["perplexity_neutral"] != pytest.approx(before["perplexity_neutral"], rel=1e-3)
    for key in ("persona_accuracy", "combined_reward", "goal", "classifier_confidence", "example_similarity",
                "distinct_2"):
        assert key in moved


def test_ppo_eval_logprobs_match_the_sampler_scores():
    """The KL's log-probabilities are those of the sampling distribution (temperature-scaled)."""
    from personaweave import chat
    from personaweave.testing import tiny_persona_model

    evaluation = load_recipe("ppo_eval")
    model, tok = tiny_persona_model()
    model.eval()
    prompt = tok.apply_chat_template(chat("pirate", "hello what", model=model), add_generation_prompt=True)
    torch.manual_seed(0)
    out = model.generate(torch.tensor([prompt]), do_sample=True, temperature=evaluation.TEMPERATURE, top_k=0,
                         top_p=1.0, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id)
    reply = out.sequences[0, len(prompt):].tolist()
    expected = torch.stack([torch.log_softmax(score[0].float(), -1)[token] for score, token in zip(out.scores, reply)])
    with torch.no_grad():
        got = evaluation._reply_logprobs(model, prompt, reply)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_reward_model_pairwise_accuracy_and_partial_freezing(tmp_path):
    from transformers import LlamaForSequenceClassification

    from personaweave.data import persona_preference_pairs
    from personaweave.testing import tiny_llama, tiny_tokenizer

    recipe = load_recipe("reward_model")
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok))
    lm.config.num_labels = 1
    model = LlamaForSequenceClassification(lm.config).eval()
    recipe.freeze_below(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm", "score")) for n in trainable)
    with pytest.raises(ValueError, match="train_top_layers"):
        recipe.freeze_below(model, 3)
    from datasets import Dataset

    rows = Dataset.from_parquet(tiny_dataset(tmp_path) + "/train.parquet")
    pairs = persona_preference_pairs(rows)
    report = recipe.pairwise_accuracy(model, tok, pairs, max_length=512)
    assert report["num_pairs"] == len(pairs) and 0.0 <= report["pairwise_accuracy"] <= 1.0
    assert set(report["per_persona"]) == set(UniformClassifier.labels)
    with pytest.raises(ValueError, match="fits in max_length=5"):
        recipe.pairwise_accuracy(model, tok, pairs, max_length=5)


def test_reward_model_reads_v2_best_worst_pairs(tmp_path):
    """pair_source best_worst: the v2 (best, worst) pairs, persona stated in words; persona-swap mixed in on request."""
    import pandas as pd

    recipe = load_recipe("reward_model")
    rows = [{"persona": p, "description": f"a {p}", "prompt": f"question {i}", "chosen": f"{p} answer {i}",
             "rejected": "meh", "chosen_score": 0.8, "rejected_score": 0.1}
            for p in ("pirate", "butler") for i in range(3)]
    sft = [{"persona": r["persona"], "description": r["description"], "prompt": r["prompt"], "response": r["chosen"]}
           for r in rows]
    for split in ("train", "validation", "test"):
        pd.DataFrame(rows).to_parquet(tmp_path / f"preferences_{split}.parquet")
        pd.DataFrame(sft).to_parquet(tmp_path / f"{split}.parquet")
    script = recipe.RewardModelArguments(dataset_dir=str(tmp_path), pair_source="best_worst")
    pairs = recipe.pairs(script, "test", None, 0)
    assert len(pairs) == 6
    row = next(r for r in pairs if r["chosen"][0]["content"] == "pirate answer 0")
    assert row["prompt"][0] == {"role": "system", "content": "You are a pirate."}
    assert row["rejected"][0]["content"] == "meh"
    assert "best / worst" in recipe.describe_pairs(script) and "another persona" not in recipe.describe_pairs(script)
    script.mix_persona_swap = True
    assert "best / worst" in recipe.describe_pairs(script) and "another persona" in recipe.describe_pairs(script)
    mixed = recipe.pairs(script, "test", None, 0)
    assert len(mixed) == 12 and any(r["rejected"][0]["content"].startswith("butler") for r in mixed)
    assert {r["source"] for r in mixed if r["rejected"][0]["content"] == "meh"} == {"best_worst"}
    assert {r["source"] for r in mixed if r["rejected"][0]["content"] != "meh"} == {"persona_swap"}
    # accuracy is reported per kind of pair too: a scorer that prefers longer replies wins every
    # best/worst pair ("meh" is short) and ties (loses) every swap pair (same length)
    from types import SimpleNamespace

    from personaweave.testing import tiny_tokenizer

    tok = tiny_tokenizer()

    class ByLength:
        device = torch.device("cpu")

        def __call__(self, input_ids, attention_mask, **_):
            return SimpleNamespace(logits=attention_mask.sum(-1, keepdim=True).float())

        def eval(self):
            return self

    report = recipe.pairwise_accuracy(ByLength(), tok, mixed, max_length=512)
    assert report["per_source"] == {"best_worst": {"pairwise_accuracy": 1.0, "num_pairs": 6},
                                    "persona_swap": {"pairwise_accuracy": 0.0, "num_pairs": 6}}
    # evaluate_only: a saved reward model scored on the config's test and validation pairs, no training
    from transformers import LlamaForSequenceClassification

    from personaweave.testing import tiny_llama

    lm = tiny_llama(len(tok))
    lm.config.num_labels, lm.config.pad_token_id = 1, tok.pad_token_id
    LlamaForSequenceClassification(lm.config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    script.evaluate_only, script.report_validation = str(tmp_path / "rm"), True
    report = recipe.main(script, recipe.RewardConfig(output_dir=str(tmp_path / "unused"), use_cpu=True, report_to=[]))
    assert report["num_pairs"] == 12 and report["validation"]["num_pairs"] == 12
    assert set(report["per_source"]) == {"best_worst", "persona_swap"}
    assert not (tmp_path / "unused").exists()
    # a one-step training run: its card says which pairs it was trained on and reports each kind
    script.evaluate_only, script.base = None, str(tmp_path / "rm")
    recipe.main(script, recipe.RewardConfig(output_dir=str(tmp_path / "trained"), use_cpu=True, report_to=[],
                                            max_steps=1, per_device_train_batch_size=4, max_length=512))
    card = (tmp_path / "trained" / "final" / "README.md").read_text()
    assert "best / worst of N" in card and "another persona's reply" in card
    assert "| best_worst |" in card and "| persona_swap |" in card
    with pytest.raises(SystemExit, match="pair_source"):
        recipe.pairs(recipe.RewardModelArguments(dataset_dir=str(tmp_path), pair_source="nope"), "test", None, 0)


def test_ppo_can_start_from_a_saved_adapter_merged_into_the_master(tmp_path):
    """`start_adapter: dpo`: PPO's starting policy (and reference) is the master with that adapter merged in,
    i.e. it computes what the master + the active adapter computed."""
    ppo = load_recipe("ppo")
    from personaweave.models import PersonaWeaveForCausalLM
    from personaweave.sub_personalities import add_sub_personality, lora_config, save_sub_personalities
    from personaweave.testing import tiny_persona_model

    model, tok = tiny_persona_model()
    model.save_pretrained(tmp_path)
    peft = add_sub_personality(model, "dpo", lora_config(r=2, alpha=4))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_sub_personalities(peft, str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft.eval()(input_ids=ids).logits
        merged = ppo.merged_adapter(PersonaWeaveForCausalLM.from_pretrained(tmp_path), str(tmp_path), "dpo").eval()
        plain = PersonaWeaveForCausalLM.from_pretrained(tmp_path).eval()
        got, before = merged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, expected, atol=1e-3)  # the adapter did change the model


def test_ppo_per_persona_adapters_start_from_each_lora_and_save_their_sum(tmp_path, hash_encoder):
    """`per_persona_adapters`: PPO starts from the persona's LoRA merged into the master, trains on that
    persona's prompts only, and the saved sub-personality (persona LoRA `cat` PPO LoRA) computes exactly
    what the merged start + the PPO adapter computes; other personas' LoRAs are left as they were, and a
    second start skips the finished persona."""
    pytest.importorskip("trl.experimental.ppo")
    ppo = load_recipe("ppo")
    from peft import PeftModel
    from trl.experimental.ppo import PPOConfig

    from personaweave.loading import load_model
    from personaweave.sub_personalities import add_sub_personality, lora_config, save_sub_personalities
    from personaweave.testing import tiny_persona_model

    model, tok = tiny_persona_model()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]}, replace_additional_special_tokens=False)
    model.language_model.resize_token_embeddings(len(tok), mean_resizing=False)
    master = tmp_path / "master"
    model.save_pretrained(master)
    tok.save_pretrained(master)
    peft = add_sub_personality(model, "pirate", lora_config(r=2, alpha=4))
    add_sub_personality(peft, "robot", lora_config(r=2, alpha=4))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_sub_personalities(peft, str(master))
    script = ppo.PPOScriptArguments(model=str(master), max_prompts=8, lora_r=4, per_persona_adapters=True,
                                    personas=["pirate"], dataset_dir=tiny_dataset(tmp_path))
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=2, total_episodes=4,
                     response_length=6, num_ppo_epochs=1, num_mini_batches=1, report_to="none", bf16=False,
                     use_cpu=True, save_strategy="no", num_sample_generations=0, learning_rate=1e-2)
    final = ppo.main_per_persona(script, args, classifier=UniformClassifier(), encoder=hash_encoder)
    assert args.output_dir == str(tmp_path / "ppo")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        start = ppo.merged_adapter(load_model(str(master), with_adapters=False)[0], str(master), "pirate")
        at_start = start.eval()(input_ids=ids).logits
        expected = PeftModel.from_pretrained(start, str(tmp_path / "ppo" / "runs" / "pirate" / "final")).eval()
        expected = expected(input_ids=ids).logits
        shipped, _, loaded = load_model(final)
        assert sorted(loaded.peft_config) == ["pirate", "robot"] and loaded.peft_config["pirate"].r == 2 + 4
        loaded.set_adapter("pirate")
        got = loaded.eval()(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, at_start, atol=1e-4)  # PPO changed the policy
        loaded.set_adapter("robot")  # untouched: the master's robot LoRA
        original = load_model(str(master))[2]
        original.set_adapter("robot")
        torch.testing.assert_close(loaded(input_ids=ids).logits, original.eval()(input_ids=ids).logits)
    marker = tmp_path / "ppo" / "done" / "pirate.json"
    before = marker.stat().st_mtime_ns
    ppo.main_per_persona(script, args, classifier=UniformClassifier(), encoder=hash_encoder)
    assert marker.stat().st_mtime_ns == before  # resumed: nothing retrained
    with pytest.raises(SystemExit, match="No sub-personality"):
        ppo.main_per_persona(ppo.PPOScriptArguments(model=str(master), per_persona_adapters=True, personas=["nope"]),
                             args)
