"""Distil the trained trait model (teacher) into a 3-layer student with `Trainer`.

    python recipes/distill_traits.py --config recipes/configs/distill_traits.yaml [--teacher outputs/traits/final]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import AutoTokenizer, TrainingArguments
from trl import TrlParser

from personaweave import PersonaTraitModel
from personaweave.data import load_persona_dialogues
from personaweave.files import save_folder_atomically
from personaweave.training.distillation import DistillationTrainer, make_student


@dataclass
class DistillArguments:
    teacher: str = field(default="outputs/traits/final", metadata={"help": "Trained trait model folder."})
    num_layers: int = field(default=3, metadata={"help": "Student encoder layers."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the label loss next to the teacher's."})


def main(args: DistillArguments, training_args: TrainingArguments) -> str:
    from datasets import Dataset

    teacher = PersonaTraitModel.from_pretrained(args.teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    student = make_student(teacher, args.num_layers)
    train = load_persona_dialogues("train")
    rows = [{"text": r, "labels": t} for r, t in zip(train["response"], train["traits"])]

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=128)
        enc["labels"] = batch["labels"]
        return enc

    data = Dataset.from_list(rows).map(encode, batched=True, remove_columns=["text"])
    training_args.remove_unused_columns = False
    trainer = DistillationTrainer(model=student, args=training_args, train_dataset=data, processing_class=tokenizer,
                                  teacher=teacher, alpha=args.alpha)
    trainer.train()
    final = f"{training_args.output_dir}/final"
    if training_args.process_index == 0:
        save_folder_atomically(student, tokenizer, final)
    print(f"student: {final}")
    return final


def make_parser() -> TrlParser:
    return TrlParser((DistillArguments, TrainingArguments))


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
    sys.exit(0)
