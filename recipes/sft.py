"""Supervised training of personas: the persona layer (master) and LoRA sub-personalities.

Stage `persona`: train `PersonaEmbedding` with the base LM frozen, on the persona dialogues
with the persona's reserved tokens in the prompt and NO description (context distillation:
the token must carry the persona). Loss on the response tokens only (TRL prompt-completion).

Stage `sub_personality`: one LoRA adapter per persona on top of the frozen master, trained on
that persona's replies; adapters are saved in `<output_dir>/final/adapters/<persona>/`.

Usage:
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/sft.py \
        --config recipes/configs/sft_persona.yaml
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/sft.py \
        --config recipes/configs/sft_sub_personality.yaml --persona pirate
    python recipes/sft.py --config recipes/configs/sft_smoke.yaml      # 5-minute CPU smoke run
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import SFTConfig, SFTTrainer, TrlParser

from personaweave import PersonaWeaveForCausalLM, from_base
from personaweave.data import load_persona_dialogues
from personaweave.files import save_folder_atomically
from personaweave.sub_personalities import (
    DEFAULT_TARGET_MODULES,
    add_sub_personality,
    lora_config,
    save_sub_personalities,
    set_sub_personality,
)
from personaweave.training.sft import (
    NanGuard,
    ProgressiveUnfreezing,
    freeze_base,
    parse_unfreeze_schedule,
    to_prompt_completion,
    unfreeze_candidates,
)


@dataclass
class PersonaSFTArguments:
    # What to train
    stage: str = field(default="persona", metadata={"help": "'persona' (persona layer) or 'sub_personality' (LoRA)."})
    persona: str = field(default="all", metadata={"help": "Sub-personality stage: a persona name or 'all'."})
    # Models
    base_model: str = field(default="smollm2-135m-instruct",
                            metadata={"help": "Zoo name, folder or Hub id of the base LM (persona stage)."})
    master_model: Optional[str] = field(default=None,
                                        metadata={"help": "Trained master folder (sub_personality stage)."})
    num_persona_tokens: int = field(default=4, metadata={"help": "Soft vectors (reserved tokens) per persona."})
    persona_sets: list[str] = field(default_factory=lambda: ["default"], metadata={
        "help": "Persona stage: the persona sets in the new model's bank (personaweave.zoo.load_persona_set), "
                "e.g. default style: the 8 defaults + 64 composed style personas, so that the description -> "
                "soft-vector map learns from many descriptions."})
    tiny_random_base: bool = field(default=False, metadata={"help": "Use a tiny random Llama (tests only)."})
    # Data
    dataset_dir: Optional[str] = field(default=None, metadata={"help": "Dataset folder (default: the shipped one)."})
    extra_dataset_dirs: list[str] = field(default_factory=list, metadata={
        "help": "More dataset folders of the same format (e.g. the style personas' data), concatenated."})
    max_train_samples_per_persona: Optional[int] = field(default=None, metadata={"help": "Cap rows per persona."})
    max_eval_samples: Optional[int] = field(default=200, metadata={"help": "Cap validation rows."})
    # LoRA
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "Modules to adapt (default: personaweave.sub_personalities.DEFAULT_TARGET_MODULES)."})
    unfreeze_schedule: Optional[str] = field(
        default=None, metadata={"help": "Progressive unfreezing, 'STEP:N,...': train the top N base layers from STEP."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit base with bitsandbytes (CUDA only)."})


def sub_personality_lora_config(args: PersonaSFTArguments):
    """The LoRA config of every sub-personality: the library's, with the config's overrides."""
    return lora_config(args.lora_r, args.lora_alpha, args.lora_dropout,
                       args.lora_target_modules or DEFAULT_TARGET_MODULES)


def quantization_kwargs(args: PersonaSFTArguments) -> dict:
    if not args.load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        raise SystemExit("--load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit); this machine has none. "
                         "Drop the flag to train in full precision on CPU.")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16)}


def build_master(args: PersonaSFTArguments):
    from personaweave.zoo import load_persona_set

    personas = [p for name in args.persona_sets for p in load_persona_set(name)]
    if args.tiny_random_base:
        from personaweave.testing import tiny_persona_model, vocabulary

        train = load_dialogues(args, "train")
        words = vocabulary(list(train["prompt"]) + list(train["response"]))
        return tiny_persona_model(num_persona_tokens=args.num_persona_tokens, extra_words=words, personas=personas)
    if args.master_model:
        from transformers import AutoTokenizer

        model = PersonaWeaveForCausalLM.from_pretrained(args.master_model, **quantization_kwargs(args))
        return model, AutoTokenizer.from_pretrained(args.master_model)
    return from_base(args.base_model, personas=personas, num_persona_tokens=args.num_persona_tokens,
                     **quantization_kwargs(args))


def load_dialogues(args: PersonaSFTArguments, split: str):
    """One split of `dataset_dir` and every `extra_dataset_dirs` folder, concatenated (the columns
    that training reads)."""
    from datasets import concatenate_datasets

    parts = [load_persona_dialogues(split, data_dir=d) for d in [args.dataset_dir, *args.extra_dataset_dirs]]
    parts = [p for p in parts if len(p)] or parts[:1]  # a folder may have no rows in a split (e.g. validation)
    if len(parts) == 1:
        return parts[0]
    columns = ["persona", "prompt", "response"]
    return concatenate_datasets([p.select_columns(columns) for p in parts])


def load_split(args: PersonaSFTArguments, split: str, personas: list[str], k: int, cap: Optional[int]):
    data = load_dialogues(args, split)
    data = data.filter(lambda r: r["persona"] in personas)
    if cap is not None and split == "train":
        counts: dict[str, int] = {}

        def keep(row):
            counts[row["persona"]] = counts.get(row["persona"], 0) + 1
            return counts[row["persona"]] <= cap

        data = data.filter(keep)
    elif cap is not None:
        data = data.shuffle(seed=0).select(range(min(cap, len(data))))
    return data.map(lambda r: to_prompt_completion(r, k), remove_columns=data.column_names)


class PersonaSFTTrainer(SFTTrainer):
    """SFTTrainer whose optimizer also holds the base layers that progressive unfreezing will
    release later (frozen until then: parameters without a gradient are skipped by AdamW)."""

    def __init__(self, *args, extra_params=(), **kwargs):
        self.extra_params = list(extra_params)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.extra_params:
            for p in self.extra_params:
                p.requires_grad_(True)
            super().create_optimizer()
            for p in self.extra_params:
                p.requires_grad_(False)
            return self.optimizer
        return super().create_optimizer()


def train(model, tokenizer, train_data, eval_data, training_args: SFTConfig, schedule) -> NanGuard:
    guard = NanGuard()
    callbacks = [guard] + ([ProgressiveUnfreezing(model, schedule)] if schedule else [])
    trainer = PersonaSFTTrainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
        processing_class=tokenizer, callbacks=callbacks, extra_params=unfreeze_candidates(model, schedule),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if guard.tripped_at is not None:
        raise SystemExit(f"Loss became NaN/inf at step {guard.tripped_at}; training stopped. The last good "
                         f"checkpoint is in {training_args.output_dir}; no final model was written.")
    if eval_data is not None and len(eval_data):
        trainer.log(trainer.evaluate())
    return guard


def main(script_args: PersonaSFTArguments, training_args: SFTConfig) -> str:
    training_args.completion_only_loss = True
    # TRL's default "chunked_nll" calls the backbone and lm_head directly, skipping our forward and
    # with it the persona embedding step; the plain loss goes through PersonaWeave's forward.
    training_args.loss_type = "nll"
    model, tokenizer = build_master(script_args)
    k = model.config.num_persona_tokens
    personas = model.config.persona_names if script_args.persona == "all" else [script_args.persona]
    unknown = sorted(set(personas) - set(model.config.persona_names))
    if unknown:
        raise SystemExit(f"Unknown persona(s) {unknown}; the model has {model.config.persona_names}.")
    schedule = parse_unfreeze_schedule(script_args.unfreeze_schedule)
    final_dir = os.path.join(training_args.output_dir, "final")
    eval_data = load_split(script_args, "validation", personas, k, script_args.max_eval_samples)

    if script_args.stage == "persona":
        freeze_base(model)
        train_data = load_split(script_args, "train", personas, k, script_args.max_train_samples_per_persona)
        train(model, tokenizer, train_data, eval_data, training_args, schedule)
        if training_args.process_index == 0:
            save_folder_atomically(model, tokenizer, final_dir)
    elif script_args.stage == "sub_personality":
        for p in model.parameters():
            p.requires_grad_(False)
        config = sub_personality_lora_config(script_args)
        if training_args.process_index == 0:  # the master, before LoRA layers are injected into it
            save_folder_atomically(model, tokenizer, final_dir)
        peft_model = model
        base_output = training_args.output_dir
        for name in personas:
            peft_model = add_sub_personality(peft_model, name, config)
            set_sub_personality(peft_model, name)
            training_args.output_dir = os.path.join(base_output, name)
            train_data = load_split(script_args, "train", [name], k, script_args.max_train_samples_per_persona)
            persona_eval = load_split(script_args, "validation", [name], k, script_args.max_eval_samples)
            train(peft_model, tokenizer, train_data, persona_eval, training_args, schedule)
        training_args.output_dir = base_output
        if training_args.process_index == 0:
            save_sub_personalities(peft_model, final_dir, personas)
    else:
        raise SystemExit(f"Unknown stage {script_args.stage!r}: use 'persona' or 'sub_personality'.")
    print(f"final model: {final_dir}")
    return final_dir


def make_parser(subparsers=None):
    dataclass_types = (PersonaSFTArguments, SFTConfig)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="persona SFT", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
    sys.exit(0)
