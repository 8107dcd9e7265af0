"""Choose the teacher prompt of prompt distillation with the *selection* judge, on trained personas only.

Prompt distillation (`recipes/distill_persona.py`) teaches persona tokens what a system prompt does; a
system prompt that keeps the base more in character is a better teacher. Each candidate template
(`{description}`, optionally `{examples}`: `examples_per_part` of the persona's role lines and of its
temperament lines, the selection judge's lines, never the evaluation anchors) is written into the bare
base's system prompt for `num_personas` trained style personas x `max_turns` training turns, decoded the
deployed way, and scored by `StyleSelectionJudge`. The evaluation judge and the unseen personas are not
read here, so the choice cannot leak into the evaluation.

    python recipes/teacher_prompts.py --config recipes/configs/teacher_prompts.yaml
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from trl import TrlParser

from personaweave.files import write_json
from personaweave.generation import DECODING

sys.path.insert(0, os.path.dirname(__file__))
from persona_quality import held_out_candidates, trim_to_sentence  # noqa: E402


@dataclass
class TeacherPromptsArguments:
    templates: list[str] = field(default_factory=lambda: ["You are {description}. Stay in character."], metadata={
        "help": "System-prompt templates to compare ({description}; optionally {examples})."})
    shards: str = field(default="datasets_scripts/shards/style", metadata={"help": "Where the training turns come from."})
    split: str = field(default="train", metadata={"help": "Which split's turns to use (never the test split)."})
    max_turns: int = field(default=8, metadata={"help": "User turns per persona."})
    num_personas: int = field(default=16, metadata={"help": "Trained style personas drawn (seeded)."})
    examples_per_part: int = field(default=2, metadata={"help": "Role lines and temperament lines in {examples}."})
    max_new_tokens: int = field(default=48, metadata={"help": "Reply length limit."})
    batch_size: int = field(default=32, metadata={"help": "Generation batch size."})
    seed: int = field(default=0, metadata={"help": "Which personas are drawn."})
    output: str = field(default="outputs/teacher_prompts.json", metadata={"help": "The JSON report."})


def make_parser() -> TrlParser:
    return TrlParser((TeacherPromptsArguments,))


def example_lines(persona: Any, k: int) -> str:
    """The first k role lines and first k temperament lines of a style persona (its examples list holds the
    role's lines, then the temperament's)."""
    spec = json.loads(_style_spec())
    role, temper, _ = persona.name.split("-")
    lines = spec["roles"][role]["examples"][:k] + spec["temperaments"][temper]["examples"][:k]
    return "\n".join(f'"{x}"' for x in lines)


def _style_spec() -> str:
    from importlib import resources

    from personaweave.zoo import STYLE_PERSONAS_FILE

    return resources.files("personaweave.data").joinpath(STYLE_PERSONAS_FILE).read_text("utf-8")


def main(args: TeacherPromptsArguments) -> dict[str, Any]:
    import torch

    from personaweave.evaluation.judges import StyleSelectionJudge
    from personaweave.generation import generate_replies
    from personaweave.loading import load_model
    from personaweave.zoo import load_style_personas

    if args.split == "test":
        raise SystemExit("error: the test split's turns are held out for evaluation; choose train or validation.")
    for t in args.templates:
        if "{description}" not in t:
            raise SystemExit(f"error: template {t!r} has no {{description}}.")
    torch.manual_seed(0)
    _, turns = held_out_candidates(args.shards, args.split, args.max_turns)
    trained = load_style_personas("train")
    personas = random.Random(args.seed).sample(trained, min(args.num_personas, len(trained)))
    model, tokenizer, _ = load_model(None, with_adapters=False)
    judge = StyleSelectionJudge.from_style_personas(trained, base_model=model.language_model, tokenizer=tokenizer)
    prompts = [t for _ in personas for t in turns]
    targets = [p.name for p in personas for _ in turns]
    table: dict[str, Any] = {"personas": targets[:: len(turns)], "turns": len(turns), "decoding": DECODING, "rows": {}}
    for template in args.templates:
        start = time.time()
        conversations = [[{"role": "system", "content": template.format(
                              description=p.description, examples=example_lines(p, args.examples_per_part))},
                          {"role": "user", "content": t}] for p in personas for t in turns]
        out = generate_replies(model.language_model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, **DECODING)
        texts = [trim_to_sentence(t) for t in out.texts]
        verdicts = judge.judge(prompts, texts, targets)
        row = verdicts.summary() | {"seconds": round(time.time() - start, 1),
                                    "examples": [{"persona": n, "user": u, "reply": r} for n, u, r in
                                                 list(zip(targets, prompts, texts))[:: max(1, len(texts) // 6)]]}
        table["rows"][template] = row
        print(json.dumps({"template": template, **{k: v for k, v in row.items() if k != "examples"}}), flush=True)
    write_json(table, args.output)
    return table


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    sys.exit(0)
