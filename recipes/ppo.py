"""PPO with TRL for persona consistency + conversation goals (multi-objective reward).

Policy: the trained PersonaWeave master with a new LoRA adapter (peft_config), so the reference
is the same model with the adapter disabled (TRL's behaviour with peft and ref_model=None).
Value model: a sequence-classification head (num_labels=1) on the base LM. Reward: the combined
reward (`personaweave.training.rewards`) behind TRL's reward-model interface (`CombinedRewardModel`).

SmolLM2 pads with its EOS token (<|im_end|>), which also closes every chat turn; TRL masks pad
tokens out of the query-response, so the recipe pads with <|endoftext|> instead.

`per_persona_adapters: true` runs PPO on each persona's own LoRA sub-personality instead (e.g. the
DPO-trained ones of the shipped checkpoint): that LoRA merged into the master is where PPO starts and
its reference, the prompts are that persona's only, and the new PPO LoRA is then concatenated with the
persona's LoRA (peft `add_weighted_adapter`, combination "cat": the sum of both updates, exactly) into
the persona's new sub-personality. The output folder is then a PersonaWeave folder like DPO's
(`final/` = master + adapters), and finished personas are skipped when the run is started again.

Usage:
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/ppo.py --config recipes/configs/ppo.yaml
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/ppo.py --config recipes/configs/ppo_v2_lora.yaml
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from trl import TrlParser
from trl.experimental.ppo import PPOConfig, PPOTrainer

from personaweave import chat
from personaweave.data import load_persona_dialogues
from personaweave.sub_personalities import lora_config
from personaweave.training.rewards import (
    DEFAULT_WEIGHTS,
    CombinedRewardConfig,
    CombinedRewardModel,
    PersonaRewardScorer,
    RewardContext,
    combined_reward,
    save_reward_weights,
)


@dataclass
class PPOScriptArguments:
    model: Optional[str] = field(default="outputs/sft_persona/final", metadata={
        "help": "Trained master folder; null: the shipped checkpoint."})
    classifier: str = field(default="outputs/persona_classifier", metadata={"help": "Persona classifier folder."})
    reward_weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS), metadata={
        "help": "Reward component weights (default: the library's DEFAULT_WEIGHTS); saved to the run folder, "
                "where recipes/ppo_eval.py reads them."})
    max_prompts: Optional[int] = field(default=512, metadata={"help": "Training prompts (persona x user turn)."})
    pad_token: str = field(default="<|endoftext|>", metadata={"help": "A pad token distinct from EOS."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the PPO adapter."})
    dataset_dir: Optional[str] = field(default=None, metadata={"help": "Dataset folder (default: shipped)."})
    start_adapter: Optional[str] = field(default=None, metadata={
        "help": "Merge this saved adapter of `model` (e.g. 'dpo') into the master first: PPO starts from it, and "
                "the reference (PPO adapter off) is the merged model."})
    reward_model: Optional[str] = field(default=None, metadata={
        "help": "Trained persona reward model folder (recipes/reward_model.py): enables the `persona_reward` "
                "component (give it a weight in reward_weights)."})
    per_persona_adapters: bool = field(default=False, metadata={
        "help": "PPO on each persona's own LoRA sub-personality of `model` (merged in: the start and the "
                "reference), on that persona's prompts; the result is concatenated with that LoRA into the "
                "persona's new sub-personality under output_dir/final. Resumable per persona."})
    personas: Optional[list[str]] = field(default=None, metadata={
        "help": "Only these personas (default: all of the model's, or all with a sub-personality)."})


class ComponentLog:
    """Wraps a combined reward and appends the mean of every component per scoring call to a JSON
    lines file: TRL logs only the total score, the multi-objective view needs each part."""

    def __init__(self, reward_fn, path: str) -> None:
        self.reward_fn, self.calls = reward_fn, 0
        # one writer (the main process) and a fresh file per run, so steps line up in the plots
        self.path = path if os.environ.get("RANK", "0") == "0" else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(self.path, "w", encoding="utf-8").close()

    def __call__(self, prompts, replies, personas):
        total, parts = self.reward_fn(prompts, replies, personas)
        self.calls += 1
        if self.path:
            row = {"call": self.calls, "total": float(total.mean()), **{k: float(v.mean()) for k, v in parts.items()}}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        return total, parts


def build(script: PPOScriptArguments, model=None, tokenizer=None, classifier=None, encoder=None,
          log_dir: Optional[str] = None):
    """(policy, tokenizer, value model, reward model, dataset) for PPOTrainer."""
    from transformers import AutoModelForSequenceClassification

    from personaweave.encoders import default_encoder
    from personaweave.evaluation import PersonaClassifier
    from personaweave.loading import load_model

    if model is None:
        model, tokenizer, _ = load_model(script.model, with_adapters=False)
        if script.start_adapter:
            model = merged_adapter(model, script.model, script.start_adapter)
    if script.pad_token in tokenizer.get_vocab():
        tokenizer.pad_token = script.pad_token
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise SystemExit("PPO needs a pad token distinct from EOS; set --pad_token to an unused token.")
    tokenizer.padding_side = "left"
    if classifier is None and script.reward_weights.get("classifier_confidence", 0) > 0:
        classifier = PersonaClassifier.from_pretrained(script.classifier)
    bank = model.personas
    scorer = PersonaRewardScorer.from_pretrained(script.reward_model) if script.reward_model else None
    ctx = RewardContext(encoder=encoder or default_encoder(), classifier=classifier,
                        examples={p.name: p.examples for p in bank}, reward_model=scorer,
                        descriptions={p.name: p.description for p in bank if p.description})
    reward_fn = combined_reward(script.reward_weights, ctx)
    if log_dir:
        reward_fn = ComponentLog(reward_fn, os.path.join(log_dir, "reward_components.jsonl"))
    reward_model = CombinedRewardModel(
        CombinedRewardConfig(), reward_fn=reward_fn, tokenizer=tokenizer,
        persona_token_ids=dict(zip(model.config.persona_names, model.config.persona_token_ids)))
    value_model = AutoModelForSequenceClassification.from_config(
        _value_config(model.config.text_config))
    # the base LM's backbone (e.g. LlamaModel) under the value head
    backbone = getattr(model.language_model, model.language_model.base_model_prefix)
    getattr(value_model, value_model.base_model_prefix).load_state_dict(backbone.state_dict())
    value_model.config.pad_token_id = tokenizer.pad_token_id
    data = load_persona_dialogues("train", data_dir=script.dataset_dir)
    judged = set(classifier.labels) if classifier is not None else set(ctx.descriptions)
    names = [n for n in model.config.persona_names if n in judged and not n.startswith("blend_")
             and (not script.personas or n in script.personas)]
    if not names:
        raise SystemExit(f"No persona to train: {script.personas or 'none'} among the judged {sorted(judged)}.")
    rows = [(p, q) for q in sorted(set(data["prompt"])) for p in names][: script.max_prompts]
    from datasets import Dataset

    def tokenize(row):
        ids = tokenizer.apply_chat_template(chat(row["persona"], row["prompt"], model=model),
                                            add_generation_prompt=True)
        return {"input_ids": ids, "lengths": len(ids)}

    dataset = Dataset.from_list([{"persona": p, "prompt": q} for p, q in rows])
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    return model, tokenizer, value_model, reward_model, dataset


def main_per_persona(script: PPOScriptArguments, args: PPOConfig, **built) -> str:
    """PPO on each persona's own sub-personality in turn (resumable); returns output_dir/final.
    `built` may hold a `classifier` and an `encoder` for the reward (as for `main`)."""
    import shutil
    import tempfile

    from personaweave.files import replace_folder, save_folder_atomically, write_json
    from personaweave.loading import load_model, shipped_checkpoint_dir
    from personaweave.sub_personalities import ADAPTERS_DIR, has_sub_personalities, load_sub_personalities

    source = script.model or shipped_checkpoint_dir("default")
    if not has_sub_personalities(source):
        raise SystemExit(f"{source} has no LoRA sub-personalities to start PPO from.")
    adapters = sorted(d for d in os.listdir(os.path.join(source, ADAPTERS_DIR))
                      if os.path.isfile(os.path.join(source, ADAPTERS_DIR, d, "adapter_config.json")))
    unknown = sorted(set(script.personas or []) - set(adapters))
    if unknown:
        raise SystemExit(f"No sub-personality for {unknown} in {source}; it has {adapters}.")
    root, main_process = args.output_dir, os.environ.get("RANK", "0") == "0"
    final_dir = os.path.join(root, "final")
    os.makedirs(root, exist_ok=True)
    if main_process:
        if not os.path.isdir(final_dir):  # the master, unchanged, and every sub-personality as it was
            master, tokenizer, _ = load_model(script.model, with_adapters=False)
            save_folder_atomically(master, tokenizer, final_dir)
        for name in adapters:
            target = os.path.join(final_dir, ADAPTERS_DIR, name)
            if not os.path.isdir(target):
                tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}-copy")
                shutil.copytree(os.path.join(source, ADAPTERS_DIR, name), tmp, dirs_exist_ok=True)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                replace_folder(tmp, target)
    for persona in script.personas or adapters:
        marker = os.path.join(root, "done", f"{persona}.json")
        if os.path.isfile(marker):
            print(f"{persona}: done already, skipped")
            continue
        model, tokenizer, _ = load_model(script.model, with_adapters=False)
        start = merged_adapter(model, source, persona)
        args.output_dir = os.path.join(root, "runs", persona)
        one = dataclasses.replace(script, personas=[persona], start_adapter=None)
        ppo_dir, trainer = main(one, args, model=start, tokenizer=tokenizer, **built)
        if main_process:
            fresh, _, _ = load_model(script.model, with_adapters=False)
            peft = load_sub_personalities(fresh, source, names=[persona])
            peft.load_adapter(ppo_dir, adapter_name="ppo")
            # W + dW_persona + dW_ppo: PPO's LoRA was trained on top of the merged persona LoRA
            peft.add_weighted_adapter([persona, "ppo"], [1.0, 1.0], "combined", combination_type="cat")
            tmp = tempfile.mkdtemp(dir=root, prefix=f".{persona}-adapter")
            peft.save_pretrained(tmp, selected_adapters=["combined"])
            replace_folder(os.path.join(tmp, "combined"), os.path.join(final_dir, ADAPTERS_DIR, persona))
            shutil.rmtree(tmp, ignore_errors=True)
            scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
            write_json({"episodes": args.total_episodes, "scores_first_last": scores[:1] + scores[-1:]}, marker)
        del trainer
    args.output_dir = root
    print(f"final model: {final_dir}")
    return final_dir


def merged_adapter(model, folder: str, name: str):
    """`model` with the saved adapter `name` of `folder` merged into its weights (peft merge_and_unload)."""
    from personaweave.sub_personalities import load_sub_personalities

    peft = load_sub_personalities(model, folder, names=[name])
    return peft.merge_and_unload()


def _value_config(text_config):
    import copy

    config = copy.deepcopy(text_config)
    config.num_labels = 1  # a config copied from a causal LM keeps two labels: PPO then fails on shapes
    config.architectures = None
    return config


def main(script: PPOScriptArguments, args: PPOConfig, **built):
    model, tokenizer, value_model, reward_model, dataset = build(script, log_dir=args.output_dir, **built)
    save_reward_weights(script.reward_weights, args.output_dir)  # the evaluation scores with these
    args.stop_token = "eos"
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=model, ref_model=None,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         peft_config=lora_config(r=script.lora_r))
    trainer.train()
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)
    with open(os.path.join(args.output_dir, "log_history.json"), "w", encoding="utf-8") as handle:
        json.dump(trainer.state.log_history, handle, indent=1)
    return final, trainer


def make_parser() -> TrlParser:
    return TrlParser((PPOScriptArguments, PPOConfig))


if __name__ == "__main__":
    script_args, ppo_args = make_parser().parse_args_and_config()
    if script_args.per_persona_adapters:
        main_per_persona(script_args, ppo_args)
    else:
        main(script_args, ppo_args)
    sys.exit(0)
