"""Persona quality on held-out user turns: learned personas vs the prompt, with the best-of-N ceiling.

One run, the same held-out turns (the v2 candidates' test split), every row judged by the
*evaluation* judge (descriptions + held-out anchors; it never selected or trained anything) with
the selection judge's numbers beside it. Generated rows use the deployed decoding of `chat`, the
demo and the service: greedy, repetition penalty 1.2, `max_new_tokens` new tokens; every reply
(generated or sampled) is cut back to its last complete sentence before judging.

Rows:
- `prompt_baseline`: the description as a system prompt (`prompt_baseline_messages`), master without
  adapters and without persona tokens (= the bare base model);
- `persona_token`: the persona's tokens on the trained master (no adapter);
- `token_lora`: the persona's tokens + its LoRA sub-personality;
- `token_dpo`: the persona's tokens + the shared `dpo` adapter (recipes/dpo.py), when the model has one;
- `sample_1`: the first of the N sampled candidates (temperature 0.9, persona in the system prompt);
- `best_of_n`: the selection judge's pick among the N candidates (the data v2 is made of: the ceiling
  that training on it aims for);
- `blend_*`: 50/50 blends on the master (share of replies identified as either parent); with the row
  `blends_lora`, the blended tokens + the 50/50 blend of the parents' LoRAs (`blend_*_lora`, as the demo blends);
  with `--calibrate_blends`, also `blend_*_calibrated` (and `blend_*_calibrated_lora`): the weights that
  `calibrate_blend` finds on training turns with the selection judge so that each parent shows half the time;
- `compare_persona_token`, `compare_token_lora` (with `--compare_model DIR`, or `shipped`): the persona-token
  and token + LoRA rows of a second PersonaWeave folder in the same run (each when its own row is asked for
  and, for LoRA, when that folder has sub-personalities), e.g. the checkpoint a DPO or PPO run started from;
- `token_ppo` (with `--ppo_run DIR`): the persona's tokens on the PPO policy of `recipes/ppo.py` (its LoRA
  adapter on the master with `--ppo_start_adapter`, e.g. the DPO adapter, merged in: where PPO started).

    python recipes/persona_quality.py --config recipes/configs/persona_quality.yaml
"""

from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from trl import TrlParser

from personaweave.chat import chat, prompt_baseline_messages
from personaweave.files import write_json
from personaweave.generation import DECODING  # the deployed decoding, for every generated row

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "datasets_scripts"))
from build_persona_dialogues import trim_to_sentence  # noqa: E402


@dataclass
class PersonaQualityArguments:
    shards: str = field(default="datasets_scripts/shards/v2", metadata={"help": "Candidate shards (judged or not)."})
    model: Optional[str] = field(default=None, metadata={"help": "Model folder; default: the shipped trained personas."})
    split: str = field(default="test", metadata={"help": "Which split's turns to evaluate on."})
    max_turns: int = field(default=64, metadata={"help": "Held-out user turns (x 8 personas)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Reply length limit for generated rows."})
    batch_size: int = field(default=32, metadata={"help": "Generation batch size."})
    rows: list[str] = field(default_factory=lambda: ["prompt_baseline", "persona_token", "token_lora", "token_dpo", "sample_1",
                                                    "best_of_n", "blends"],
                            metadata={"help": "Which rows to compute."})
    output: str = field(default="outputs/persona_quality.json", metadata={"help": "The JSON report."})
    compare_model: Optional[str] = field(default=None, metadata={
        "help": "A second model folder ('shipped': the shipped checkpoint): adds its persona-token and token + "
                "LoRA rows (`compare_persona_token`, `compare_token_lora`), e.g. where the evaluated run started from."})
    ppo_run: Optional[str] = field(default=None, metadata={"help": "A recipes/ppo.py output_dir: adds the `token_ppo` row."})
    ppo_start_adapter: Optional[str] = field(default="dpo", metadata={
        "help": "The adapter of --model that PPO started from (merged in before the PPO adapter), or none."})
    calibrate_blends: bool = field(default=False, metadata={
        "help": "Also the calibrated blends (`*_calibrated`): weights from `calibrate_blend` on training turns, "
                "read by the selection judge, then judged on the held-out turns like the 50/50 rows."})
    calibration_turns: int = field(default=32, metadata={"help": "Training turns that calibration generates replies to."})
    calibration_rounds: int = field(default=5, metadata={"help": "Bisection rounds of the calibration."})


def make_parser() -> TrlParser:
    return TrlParser((PersonaQualityArguments,))


def held_out_candidates(shards: str, split: str, max_turns: int):
    """Judged candidates of the first `max_turns` turns of `split` (judging shards as needed)."""
    import pandas as pd

    judged = sorted(glob.glob(os.path.join(shards, "judged-*.parquet")))
    frame = pd.concat([pd.read_parquet(p) for p in judged], ignore_index=True) if judged else None
    if frame is None or frame[frame["split"] == split]["prompt"].nunique() == 0:
        raise SystemExit(f"error: no judged {split} candidates in {shards}: run "
                         "datasets_scripts/build_persona_dialogues_v2.py first.")
    frame = frame[frame["split"] == split]
    turns = list(dict.fromkeys(frame["prompt"]))[:max_turns]
    return frame[frame["prompt"].isin(turns)], turns


def main(args: PersonaQualityArguments) -> dict[str, Any]:
    import torch

    from personaweave.evaluation.judges import EvaluationJudge, SelectionJudge
    from personaweave.generation import generate_replies
    from personaweave.loading import load_model
    from personaweave.sub_personalities import (
        blend_sub_personalities,
        master_only,
        set_sub_personality,
        sub_personalities,
    )
    from personaweave.training.blend_calibration import calibrate_blend
    from personaweave.zoo import load_default_personas

    torch.manual_seed(0)
    candidates, turns = held_out_candidates(args.shards, args.split, args.max_turns)
    model, tokenizer, peft = load_model(args.model)
    personas = [p for p in load_default_personas() if p.name in model.config.persona_names]
    names = [p.name for p in personas]
    evaluation = EvaluationJudge.from_default_personas(base_model=model.language_model, tokenizer=tokenizer)
    selection = SelectionJudge.from_personas(personas, encoder=evaluation.encoder, base_model=model.language_model,
                                             tokenizer=tokenizer)
    prompts = [t for _ in names for t in turns]
    targets = [n for n in names for _ in turns]
    replies: dict[str, list[str]] = {}
    timing: dict[str, float] = {}

    def generate(conversations: list, runner: Any) -> list[str]:
        out = generate_replies(runner, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, **DECODING)
        return [trim_to_sentence(t) for t in out.texts]

    bank = {p.name: p for p in personas}

    calibration_turns: list[str] = []
    if args.calibrate_blends:  # training turns drawn with a fixed seed: the held-out turns never take part
        import random

        _, calibration_turns = held_out_candidates(args.shards, "train", 10**6)
        random.Random(0).shuffle(calibration_turns)
        calibration_turns = calibration_turns[:args.calibration_turns]
    if "prompt_baseline" in args.rows:
        start = time.time()
        with master_only(peft):
            replies["prompt_baseline"] = generate(
                [prompt_baseline_messages(bank[n].description, t) for n, t in zip(targets, prompts)], model)
        timing["prompt_baseline"] = time.time() - start
    if "persona_token" in args.rows:
        start = time.time()
        with master_only(peft):
            replies["persona_token"] = generate([chat(n, t, model=model) for n, t in zip(targets, prompts)], model)
        timing["persona_token"] = time.time() - start

    def token_lora(lora_model: Any, lora_peft: Any) -> list[str]:
        rows = []
        for name in names:
            if name not in sub_personalities(lora_peft):
                raise SystemExit(f"error: no LoRA sub-personality for {name!r}")
            set_sub_personality(lora_peft, name)
            rows += generate([chat(name, t, model=lora_model) for t in turns], lora_peft)
        return rows

    if "token_lora" in args.rows and peft is not None:
        start = time.time()
        replies["token_lora"] = token_lora(model, peft)
        timing["token_lora"] = time.time() - start
    if args.compare_model:
        other, _, other_peft = load_model(None if args.compare_model == "shipped" else args.compare_model)
        if "persona_token" in args.rows:
            start = time.time()
            with master_only(other_peft):
                replies["compare_persona_token"] = generate(
                    [chat(n, t, model=other) for n, t in zip(targets, prompts)], other)
            timing["compare_persona_token"] = time.time() - start
        if "token_lora" in args.rows and other_peft is not None:
            start = time.time()
            replies["compare_token_lora"] = token_lora(other, other_peft)
            timing["compare_token_lora"] = time.time() - start
        if not {"compare_persona_token", "compare_token_lora"} & set(replies):
            raise SystemExit(f"error: nothing to compare {args.compare_model} on: ask for the row persona_token, "
                             "or token_lora with a folder that has LoRA sub-personalities.")
        del other, other_peft
    if "token_dpo" in args.rows and peft is not None and "dpo" in sub_personalities(peft):
        start = time.time()
        set_sub_personality(peft, "dpo")
        replies["token_dpo"] = generate([chat(n, t, model=model) for n, t in zip(targets, prompts)], peft)
        timing["token_dpo"] = time.time() - start
    if args.ppo_run:
        from peft import PeftModel

        fresh, _, _ = load_model(args.model, with_adapters=False)
        if args.ppo_start_adapter and args.ppo_start_adapter != "none":
            sys.path.insert(0, os.path.dirname(__file__))
            from ppo import merged_adapter

            fresh = merged_adapter(fresh, args.model, args.ppo_start_adapter)
        policy = PeftModel.from_pretrained(fresh, os.path.join(args.ppo_run, "final")).eval()
        start = time.time()
        replies["token_ppo"] = generate([chat(n, t, model=fresh) for n, t in zip(targets, prompts)], policy)
        timing["token_ppo"] = time.time() - start
        del policy, fresh
    if "sample_1" in args.rows:
        first = candidates[candidates["sample"] == 0]
        lookup = {(r.prompt, r.persona): r.reply_trimmed for r in first.itertuples()}
        replies["sample_1"] = [lookup[(t, n)] for n, t in zip(targets, prompts)]
    if "best_of_n" in args.rows:
        best = candidates.sort_values("score", ascending=False).drop_duplicates(["prompt", "persona"])
        lookup = {(r.prompt, r.persona): r.reply_trimmed for r in best.itertuples()}
        replies["best_of_n"] = [lookup[(t, n)] for n, t in zip(targets, prompts)]

    table: dict[str, Any] = {}
    for row, texts in replies.items():
        with master_only(peft):  # fluency is the *bare* base's likelihood: no LoRA adapter may be active
            ev = evaluation.judge(prompts, texts, targets)
            sel = selection.judge(prompts, texts, targets)
        table[row] = {"evaluation_judge": ev.summary(),
                      "selection_judge": {k: sel.summary()[k] for k in ("persona_accuracy", "persona_prob", "score",
                                                                                  "relevance", "fluency")},
                      "per_persona_accuracy": {n: float(sum(p == n for p, t in zip(ev.predicted, targets) if t == n)
                                                        / max(1, targets.count(n))) for n in names},
                      "mean_words": sum(len(t.split()) for t in texts) / max(1, len(texts)),
                      "seconds": round(timing.get(row, 0.0), 1), "replies": texts,
                      "examples": [{"persona": n, "user": t, "reply": r}
                                   for n, t, r in list(zip(targets, prompts, texts))[:: max(1, len(texts) // 8)]]}
    for row in ("blends", "blends_lora"):
        if row not in args.rows or (row == "blends_lora" and peft is None):
            continue
        for a, b in (("librarian", "robot"), ("pirate", "butler")):
            for calibrated in ((False, True) if args.calibrate_blends else (False,)):
                name = f"blend_{a}_{b}" + ("_calibrated" if calibrated else "")
                key = name if row == "blends" else f"{name}_lora"
                weights, calibration = {a: 0.5, b: 0.5}, None
                if calibrated:  # on training turns, read by the selection judge: never the evaluation judge
                    start = time.time()
                    if name in model.config.persona_names:
                        model.remove_persona(name)
                    calibration = calibrate_blend(
                        model, tokenizer, name, weights, selection, calibration_turns, rounds=args.calibration_rounds,
                        peft=peft, adapters=row == "blends_lora", max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, log=lambda line, key=key: print(f"calibrating {key}: {line}", flush=True))
                    timing[f"calibrate_{key}"] = time.time() - start
                    weights = calibration.weights
                if name in model.config.persona_names:
                    model.remove_persona(name)
                model.add_persona(name, blend=weights, tokenizer=tokenizer)
                if row == "blends":  # the blended tokens on the master
                    with master_only(peft):
                        texts = generate([chat(name, t, model=model) for t in turns], model)
                else:  # the blended tokens + the same blend of the parents' LoRAs (as the demo blends)
                    adapter = f"lora_{key}"
                    if adapter in sub_personalities(peft):
                        peft.delete_adapter(adapter)
                    blend_sub_personalities(peft, weights, name=adapter, activate=False)
                    set_sub_personality(peft, adapter)
                    texts = generate([chat(name, t, model=model) for t in turns], peft)
                with master_only(peft):
                    ev = evaluation.judge(turns, texts, [a] * len(texts))
                    sel = selection.judge(turns, texts, [a] * len(texts))
                table[key] = {"parent_share": sum(p in (a, b) for p in ev.predicted) / len(texts),
                              f"share_{a}": sum(p == a for p in ev.predicted) / len(texts),
                              f"share_{b}": sum(p == b for p in ev.predicted) / len(texts),
                              "relevance": ev.summary()["relevance"], "fluency": ev.summary()["fluency"],
                              "selection_judge": {"parent_share": sum(p in (a, b) for p in sel.predicted) / len(texts),
                                                  f"share_{a}": sum(p == a for p in sel.predicted) / len(texts),
                                                  f"share_{b}": sum(p == b for p in sel.predicted) / len(texts)},
                              "weights": weights, "replies": texts}
                if calibration is not None:
                    table[key]["calibration"] = calibration.to_dict()
    report = {"turns": len(turns), "personas": names, "split": args.split, "decoding": DECODING,
              "max_new_tokens": args.max_new_tokens, "rows": table,
              "candidates_per_turn": int(candidates.groupby(["prompt", "persona"]).size().max())}
    write_json(report, args.output)
    for row, result in table.items():
        ev = result.get("evaluation_judge")
        if ev:
            print(f"{row:16} acc {ev['persona_accuracy']:.3f}  rel {ev['relevance']:.3f}  flu {ev['fluency']:.3f}  "
                  f"| selection acc {result['selection_judge']['persona_accuracy']:.3f}", flush=True)
        else:
            print(f"{row:16} " + "  ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float))
                  + f"  weights {result['weights']}", flush=True)
    return report


if __name__ == "__main__":
    (script_args,) = make_parser().parse_args_and_config()
    main(script_args)
