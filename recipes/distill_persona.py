"""Persona stage by prompt distillation: the description -> soft-vector map learns, from many
descriptions, to make the persona tokens do what the description in the prompt does.

Teacher: the frozen base with "You are <description>. ..." as its system prompt. Student: the same base
with the persona's reserved tokens instead (only the persona layer trains). Loss: KL(teacher || student)
over every token of the teacher's own sampled replies - the candidate shards of
`datasets_scripts/generate_candidates.py` (all N samples per turn, not only the judge's pick), train
split only. See `personaweave.training.prompt_distillation`.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/distill_persona.py \
        --config recipes/configs/distill_persona_style.yaml
    python recipes/distill_persona.py --config recipes/configs/distill_persona_smoke.yaml   # tiny, seconds
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments
from trl import TrlParser

from personaweave import from_base
from personaweave.files import save_folder_atomically
from personaweave.training.prompt_distillation import (
    TEACHER_TEMPLATE,
    PromptDistillationCollator,
    PromptDistillationTrainer,
)
from personaweave.training.sft import NanGuard, freeze_base


@dataclass
class PromptDistillationArguments:
    base_model: str = field(default="smollm2-135m-instruct", metadata={"help": "Zoo name, folder or Hub id of the base LM."})
    init_model: Optional[str] = field(default=None, metadata={
        "help": "Start from this PersonaWeave folder's persona layer (its bank must hold every persona set's "
                "personas) instead of a fresh layer on `base_model`."})
    persona_sets: list[str] = field(default_factory=lambda: ["default", "style"], metadata={
        "help": "Persona sets in the model's bank (personaweave.zoo.load_persona_set)."})
    num_persona_tokens: int = field(default=4, metadata={"help": "Soft vectors (reserved tokens) per persona."})
    tiny_random_base: bool = field(default=False, metadata={"help": "Use a tiny random Llama (tests only)."})
    candidate_shards: list[str] = field(default_factory=lambda: ["datasets_scripts/shards/style"], metadata={
        "help": "Folders of candidate shards (shard-*.parquet: persona, description, prompt, reply, new_tokens)."})
    max_rows_per_persona: Optional[int] = field(default=None, metadata={
        "help": "Cap the teacher replies per persona (a seeded random choice among its candidates)."})
    sampled_max_new_tokens: int = field(default=48, metadata={
        "help": "The generators' max_new_tokens: a reply that used them all was cut, so gets no end-of-turn target."})
    teacher_template: str = field(default=TEACHER_TEMPLATE, metadata={"help": "The teacher's system prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    max_prompt_tokens: int = field(default=192, metadata={"help": "Keep the last N prompt tokens."})
    max_reply_tokens: int = field(default=64, metadata={"help": "Keep the first N reply tokens."})


def load_candidates(args: PromptDistillationArguments, personas: list[str], seed: int):
    """The train-split candidate replies of `personas`, as a `datasets.Dataset`."""
    import pandas as pd
    from datasets import Dataset

    paths = sorted(p for d in args.candidate_shards for p in glob.glob(os.path.join(d, "shard-*.parquet")))
    if not paths:
        raise SystemExit(f"No candidate shards (shard-*.parquet) in {args.candidate_shards}.")
    columns = ["persona", "description", "prompt", "reply", "new_tokens", "split"]
    frame = pd.concat([pd.read_parquet(p, columns=columns) for p in paths], ignore_index=True)
    frame = frame[(frame["split"] == "train") & frame["persona"].isin(personas) & (frame["reply"].str.strip() != "")]
    frame = frame.sample(frac=1.0, random_state=seed)
    if args.max_rows_per_persona is not None:
        frame = frame.groupby("persona", sort=False).head(args.max_rows_per_persona)
    frame["finished"] = frame["new_tokens"] < args.sampled_max_new_tokens
    missing = sorted(set(personas) - set(frame["persona"]))
    print(f"distillation rows: {len(frame)} over {frame['persona'].nunique()} personas"
          + (f"; no candidates for {len(missing)}: {missing[:5]}..." if missing else ""))
    return Dataset.from_pandas(frame[["persona", "description", "prompt", "reply", "finished"]], preserve_index=False)


def build_student(args: PromptDistillationArguments):
    from personaweave.zoo import load_persona_set

    personas = [p for name in args.persona_sets for p in load_persona_set(name)]
    if args.tiny_random_base:
        from personaweave.testing import tiny_persona_model

        return tiny_persona_model(num_persona_tokens=args.num_persona_tokens, personas=personas)
    if args.init_model:
        from transformers import AutoTokenizer

        from personaweave import PersonaWeaveForCausalLM

        model = PersonaWeaveForCausalLM.from_pretrained(args.init_model)
        missing = sorted({p.name for p in personas} - set(model.config.persona_names))
        if missing:
            raise SystemExit(f"{args.init_model} lacks personas {missing[:5]} of {args.persona_sets}.")
        return model, AutoTokenizer.from_pretrained(args.init_model)
    return from_base(args.base_model, personas=personas, num_persona_tokens=args.num_persona_tokens)


def main(script_args: PromptDistillationArguments, training_args: TrainingArguments) -> str:
    training_args.remove_unused_columns = False  # the collator reads the raw text columns
    model, tokenizer = build_student(script_args)
    freeze_base(model)
    train_data = load_candidates(script_args, model.config.persona_names, training_args.seed)
    collator = PromptDistillationCollator(
        tokenizer, model.config.num_persona_tokens, teacher_template=script_args.teacher_template,
        max_prompt_tokens=script_args.max_prompt_tokens, max_reply_tokens=script_args.max_reply_tokens)
    guard = NanGuard()
    trainer = PromptDistillationTrainer(model=model, args=training_args, train_dataset=train_data,
                                        data_collator=collator, processing_class=tokenizer, callbacks=[guard],
                                        temperature=script_args.temperature)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json (the loss curve) in output_dir
    if guard.tripped_at is not None:
        raise SystemExit(f"Loss became NaN/inf at step {guard.tripped_at}; no final model was written.")
    final_dir = os.path.join(training_args.output_dir, "final")
    if training_args.process_index == 0:
        save_folder_atomically(model, tokenizer, final_dir)
    print(f"final model: {final_dir}")
    return final_dir


def make_parser():
    return TrlParser((PromptDistillationArguments, TrainingArguments))


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
    sys.exit(0)
