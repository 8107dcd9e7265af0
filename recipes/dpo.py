"""DPO on best-of-N preference pairs: the selection judge's (best, worst) replies of the prompted base.

The policy is the trained master (or any PersonaWeave folder) with one LoRA adapter (`dpo`) on top;
the reference is the same model with the adapter disabled (TRL does this for a peft policy with
`ref_model=None`). Prompts carry only the persona's reserved tokens, not its description, so what
DPO teaches must travel through the persona token. Pairs come from
`datasets_scripts/build_persona_dialogues_v2.py` (`preferences_<split>.parquet`).

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/dpo.py --config recipes/configs/dpo.yaml
    python recipes/dpo.py --config recipes/configs/dpo_smoke.yaml      # tiny random model, seconds
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from trl import DPOConfig, DPOTrainer, TrlParser

from personaweave.chat import chat
from personaweave.data import load_persona_preferences
from personaweave.files import replace_folder, save_folder_atomically
from personaweave.sub_personalities import ADAPTERS_DIR, lora_config


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


def main(script_args: PersonaDPOArguments, training_args: DPOConfig) -> str:
    model, tokenizer = build_policy(script_args)
    for p in model.parameters():
        p.requires_grad_(False)
    k = model.config.num_persona_tokens
    data = load_persona_preferences(None, script_args.preferences_dir)
    personas = set(model.config.persona_names)

    def prepare(split):
        part = data[split].filter(lambda r: r["persona"] in personas
                                  and r["chosen_score"] - r["rejected_score"] >= script_args.min_margin)
        if split == "train" and script_args.max_train_pairs:
            part = part.shuffle(seed=training_args.seed).select(range(min(script_args.max_train_pairs, len(part))))
        return part.map(lambda r: to_preference(r, k), remove_columns=part.column_names)

    train_data = prepare("train")
    eval_data = prepare("validation") if "validation" in data else None
    if not len(train_data):
        raise SystemExit(f"No training pairs for the model's personas in {script_args.preferences_dir}.")
    # A plain model + peft_config: TRL adds the LoRA adapter and scores the reference with it disabled.
    trainer = DPOTrainer(model=model, ref_model=None, args=training_args, train_dataset=train_data,
                         eval_dataset=eval_data, processing_class=tokenizer,
                         peft_config=lora_config(r=script_args.lora_r, alpha=2 * script_args.lora_r))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if eval_data is not None and len(eval_data):
        trainer.log(trainer.evaluate())
    final_dir = os.path.join(training_args.output_dir, "final")
    if training_args.process_index == 0:
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


def make_parser():
    return TrlParser((PersonaDPOArguments, DPOConfig))


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
