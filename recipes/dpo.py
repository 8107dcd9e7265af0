"""DPO on best-of-N preference pairs: the selection judge's (best, worst) replies of the prompted base.

Three modes:
- one shared adapter (default): the policy is the trained master (or any PersonaWeave folder) with
  one new LoRA adapter (`dpo`) on top; the reference is the same model with the adapter disabled
  (TRL does this for a peft policy with `ref_model=None`);
- `--per_persona_adapters true`: each persona's own LoRA sub-personality is trained further on that
  persona's pairs; the reference is a frozen copy of that LoRA (TRL's "ref" adapter), so DPO starts
  from, and is measured against, token + LoRA. The output folder is the master with the updated
  sub-personalities; personas already finished are skipped when the run is started again;
- `--persona_layer_only true`: no LoRA at all; only the persona layer (the map to the persona tokens' soft
  vectors) is trained, the LM stays frozen, and the reference is a frozen copy of the starting master: DPO for
  the token-only model. The output folder is the master with its new persona layer.

Prompts carry only the persona's reserved tokens, not its description, so what DPO teaches must travel
through the persona token. Pairs come from
`datasets_scripts/build_persona_dialogues_v2.py` (`preferences_<split>.parquet`): by default (best, worst) by the
selection judge's whole score; built with `--pair_by persona`, pairs that contrast persona evidence alone.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/dpo.py --config recipes/configs/dpo.yaml
    python recipes/dpo.py --config recipes/configs/dpo_smoke.yaml      # tiny random model, seconds
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from trl import DPOConfig, DPOTrainer, TrlParser

from personaweave.chat import chat
from personaweave.data import load_persona_preferences
from personaweave.files import replace_folder, save_folder_atomically
from personaweave.sub_personalities import ADAPTERS_DIR, lora_config
from personaweave.training.sft import freeze_base


@dataclass
class PersonaDPOArguments:
    preferences_dir: str = field(default="personaweave/data/persona_dialogues_v2",
                                 metadata={"help": "Folder with preferences_<split>.parquet."})
    master_model: Optional[str] = field(default=None, metadata={
        "help": "PersonaWeave folder to start from (default: the shipped trained personas)."})
    tiny_random_base: bool = field(default=False, metadata={"help": "Smoke test: a tiny random model."})
    adapter_name: str = field(default="dpo", metadata={"help": "Name of the LoRA adapter DPO trains."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    max_train_pairs: Optional[int] = field(default=None, metadata={"help": "Cap the training pairs."})
    min_margin: float = field(default=0.0, metadata={"help": "Keep pairs whose score gap is at least this."})
    persona_layer_only: bool = field(default=False, metadata={
        "help": "Train only the persona layer (token-only DPO; reference: a frozen copy of the master)."})
    per_persona_adapters: bool = field(default=False, metadata={
        "help": "Train each persona's own LoRA sub-personality of `master_model` on its own pairs "
                "(reference: a frozen copy of it) instead of one shared new adapter."})


def to_preference(row: dict, num_persona_tokens: int) -> dict:
    """A v2 pair as TRL's conversational preference example, selected by the persona's tokens only."""
    return {"prompt": chat(row["persona"], row["prompt"], num_persona_tokens=num_persona_tokens),
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def build_policy(args: PersonaDPOArguments):
    if args.tiny_random_base:
        from personaweave.testing import tiny_persona_model, vocabulary

        pairs = load_persona_preferences("train", args.preferences_dir)
        words = vocabulary(list(pairs["prompt"]) + list(pairs["chosen"]) + list(pairs["rejected"]))
        return tiny_persona_model(extra_words=words)
    from personaweave.loading import load_model

    model, tokenizer, _ = load_model(args.master_model, with_adapters=False)
    return model, tokenizer


def preference_splits(script_args: PersonaDPOArguments, training_args: DPOConfig, personas: set[str],
                      num_persona_tokens: int):
    """(train, validation or None) as TRL conversational preference datasets for `personas`."""
    data = load_persona_preferences(None, script_args.preferences_dir)

    def prepare(split):
        part = data[split].filter(lambda r: r["persona"] in personas
                                  and r["chosen_score"] - r["rejected_score"] >= script_args.min_margin)
        if split == "train" and script_args.max_train_pairs:
            part = part.shuffle(seed=training_args.seed).select(range(min(script_args.max_train_pairs, len(part))))
        return part.map(lambda r: to_preference(r, num_persona_tokens), remove_columns=part.column_names)

    return prepare("train"), (prepare("validation") if "validation" in data else None)


def train(trainer: DPOTrainer, eval_data, resume_from_checkpoint=None) -> None:
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if eval_data is not None and len(eval_data):
        metrics = trainer.evaluate()
        trainer.log(metrics)
        trainer.log_metrics("eval", metrics)  # printed (the progress bar is closed by now) and
        trainer.save_metrics("eval", metrics)  # kept: <output_dir>/eval_results.json


def main(script_args: PersonaDPOArguments, training_args: DPOConfig) -> str:
    if script_args.per_persona_adapters:
        return main_per_persona(script_args, training_args)
    model, tokenizer = build_policy(script_args)
    for p in model.parameters():
        p.requires_grad_(False)
    train_data, eval_data = preference_splits(script_args, training_args, set(model.config.persona_names),
                                              model.config.num_persona_tokens)
    if not len(train_data):
        raise SystemExit(f"No training pairs for the model's personas in {script_args.preferences_dir}.")
    if script_args.persona_layer_only:
        # token-only DPO: the reference is a frozen copy of the starting master, only the persona layer trains
        reference = copy.deepcopy(model).eval()
        freeze_base(model)
        policy_kwargs = {"ref_model": reference}
    else:
        # A plain model + peft_config: TRL adds the LoRA adapter and scores the reference with it disabled.
        policy_kwargs = {"ref_model": None,
                         "peft_config": lora_config(r=script_args.lora_r, alpha=2 * script_args.lora_r)}
    trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                         processing_class=tokenizer, **policy_kwargs)
    train(trainer, eval_data, training_args.resume_from_checkpoint)
    final_dir = os.path.join(training_args.output_dir, "final")
    if training_args.process_index == 0 and script_args.persona_layer_only:
        save_folder_atomically(trainer.model, tokenizer, final_dir)
    elif training_args.process_index == 0:
        policy = trainer.model
        adapter_dir = os.path.join(training_args.output_dir, f".{script_args.adapter_name}-adapter")
        # the one adapter TRL added ("default") becomes the sub-personality `adapter_name`
        policy.save_pretrained(adapter_dir)
        master = policy.unload()  # the master without LoRA layers (nothing merged)
        save_folder_atomically(master, tokenizer, final_dir)
        os.makedirs(os.path.join(final_dir, ADAPTERS_DIR), exist_ok=True)
        replace_folder(adapter_dir, os.path.join(final_dir, ADAPTERS_DIR, script_args.adapter_name))
    print(f"final model: {final_dir}")
    return final_dir


def main_per_persona(script_args: PersonaDPOArguments, training_args: DPOConfig) -> str:
    """DPO on each persona's own LoRA sub-personality, one persona at a time (resumable)."""
    import json

    from peft import PeftModel

    from personaweave.sub_personalities import has_sub_personalities

    if script_args.tiny_random_base or not script_args.master_model:
        raise SystemExit("--per_persona_adapters needs --master_model: a PersonaWeave folder with sub-personalities.")
    if not has_sub_personalities(script_args.master_model):
        raise SystemExit(f"{script_args.master_model} has no LoRA sub-personalities to train further.")
    root = training_args.output_dir
    final_dir = os.path.join(root, "final")
    if training_args.process_index == 0 and not os.path.isdir(final_dir):
        model, tokenizer = build_policy(script_args)
        save_folder_atomically(model, tokenizer, final_dir)  # the master, unchanged
    adapters = sorted(os.listdir(os.path.join(script_args.master_model, ADAPTERS_DIR)))
    if training_args.process_index == 0:  # every sub-personality starts as the master's (copied via temp)
        for name in adapters:
            target = os.path.join(final_dir, ADAPTERS_DIR, name)
            if not os.path.isdir(target):
                tmp = os.path.join(root, f".{name}-copy")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(os.path.join(script_args.master_model, ADAPTERS_DIR, name), tmp)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                replace_folder(tmp, target)
    for persona in adapters:
        marker = os.path.join(root, "done", f"{persona}.json")
        if os.path.isfile(marker):
            print(f"{persona}: done already, skipped")
            continue
        model, tokenizer = build_policy(script_args)
        if persona not in model.config.persona_names:
            print(f"{persona}: an adapter without a persona token, skipped")
            continue
        for p in model.parameters():
            p.requires_grad_(False)
        train_data, eval_data = preference_splits(script_args, training_args, {persona},
                                                  model.config.num_persona_tokens)
        if not len(train_data):
            print(f"{persona}: no training pairs, adapter left as it is")
            continue
        # the persona's LoRA as the trainable "default" adapter; TRL copies it as the frozen reference
        policy = PeftModel.from_pretrained(model, os.path.join(script_args.master_model, ADAPTERS_DIR, persona),
                                           is_trainable=True)
        training_args.output_dir = os.path.join(root, "runs", persona)
        trainer = DPOTrainer(model=policy, ref_model=None, args=training_args, train_dataset=train_data,
                             eval_dataset=eval_data, processing_class=tokenizer)
        train(trainer, eval_data)
        if training_args.process_index == 0:
            tmp = os.path.join(root, f".{persona}-adapter")
            trainer.model.save_pretrained(tmp, selected_adapters=["default"])
            os.makedirs(os.path.join(final_dir, ADAPTERS_DIR), exist_ok=True)
            replace_folder(tmp, os.path.join(final_dir, ADAPTERS_DIR, persona))
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as f:
                json.dump({"pairs": len(train_data), "log": trainer.state.log_history[-3:]}, f, indent=1)
    training_args.output_dir = root
    print(f"final model: {final_dir}")
    return final_dir


def make_parser():
    return TrlParser((PersonaDPOArguments, DPOConfig))


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
