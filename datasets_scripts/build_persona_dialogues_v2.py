"""Persona dialogue dataset v2: best-of-N replies chosen by the selection judge, plus preference pairs.

Reads the candidate shards written by `generate_candidates.py` (N sampled replies per user turn and
persona), cuts each reply back to its last complete sentence, scores every candidate with the
*selection* judge (`personaweave.evaluation.judges.SelectionJudge`: the personas' example lines,
relevance, bare-base fluency, penalties), and keeps for each (turn, persona):
- the best candidate as the SFT reply, if its score clears `--threshold` and it has no hard defect;
- (best, worst) as a preference pair when their scores differ by at least `--pair_margin`; or, with
  `--pair_by persona`, (the most in-character candidate among the on-topic half, the least in-character
  candidate) when their persona probabilities differ by at least `--persona_gap`: pairs that contrast persona
  evidence alone, neither side with a hard defect, the chosen side at least as relevant as the median candidate
  (with `--no_less_relevant`, the rejected side also no more relevant than the chosen one; with
  `--no_less_fluent`, no more fluent under the bare base).
The evaluation anchors are never read here (tests/test_judges.py checks it).

Judged shards are cached beside the candidates (`judged-XXXXX.parquet`), so re-running after new
shards arrive judges only the new ones.

Usage:
    python datasets_scripts/build_persona_dialogues_v2.py --shards datasets_scripts/shards/v2 \
        --out personaweave/data/persona_dialogues_v2
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from build_persona_dialogues import SYSTEM_TEMPLATE, trim_to_sentence  # noqa: E402

SPLITS = ("train", "validation", "test")


def judge_shard(path: str, judge, out_path: str):
    """Score one candidate shard with the selection judge; cache the result as parquet (atomically)."""
    import pandas as pd

    frame = pd.read_parquet(path)
    frame["reply_trimmed"] = [trim_to_sentence(r) for r in frame["reply"]]
    verdicts = judge.judge(list(frame["prompt"]), list(frame["reply_trimmed"]), list(frame["persona"]))
    frame["score"] = verdicts.scores
    frame["persona_prob"] = verdicts.persona_prob
    frame["relevance"] = verdicts.relevance
    frame["fluency"] = verdicts.fluency
    frame["hard_defect"] = [any(d[k] for k in ("empty", "repetition", "restates_description", "breaks_character"))
                            for d in verdicts.defects]
    tmp = out_path + ".tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, out_path)
    return frame


PAIR_BY = ("score", "persona")


def persona_pair(clean, persona_gap: float, no_less_relevant: bool = False, no_less_fluent: bool = False):
    """(chosen, rejected) candidates contrasting persona evidence, or None.

    Chosen: the highest selection-judge persona probability among the defect-free candidates at least as relevant
    as their median; rejected: the lowest persona probability among the defect-free candidates (with
    `no_less_relevant`, among those no more relevant than the chosen one, so no pair prefers a less relevant reply;
    with `no_less_fluent`, among those no more fluent, so no pair prefers a less fluent reply).
    """
    if len(clean) < 2:
        return None
    on_topic = clean[clean["relevance"] >= clean["relevance"].median()]
    chosen = on_topic.sort_values("persona_prob", ascending=False).iloc[0]
    pool = clean[clean["relevance"] <= chosen["relevance"]] if no_less_relevant else clean
    if no_less_fluent:
        pool = pool[pool["fluency"] <= chosen["fluency"]]
    if pool.empty:
        return None
    rejected = pool.sort_values("persona_prob").iloc[0]
    if (float(chosen["persona_prob"]) - float(rejected["persona_prob"]) < persona_gap
            or chosen["reply_trimmed"] == rejected["reply_trimmed"]):
        return None
    return chosen, rejected


def select(frame, threshold: float, pair_margin: float, persona_set: str = "default", pair_by: str = "score",
           persona_gap: float = 0.3, no_less_relevant: bool = False, no_less_fluent: bool = False):
    """(sft rows, preference rows, counts) from judged candidates.

    `pair_by`: one of `PAIR_BY`, or several (their pairs pooled; a (chosen, rejected) pair both rules make is kept once).
    """
    kinds = {pair_by} if isinstance(pair_by, str) else set(pair_by)
    if not kinds or kinds - set(PAIR_BY):
        raise ValueError(f"pair_by must be one or more of {PAIR_BY}, not {pair_by!r}")
    from personaweave.models.personas import TRAITS
    from personaweave.zoo import load_persona_set

    personas = {p.name: p for p in load_persona_set(persona_set)}
    sft, pairs = [], []
    counts = {"groups": 0, "kept": 0, "below_threshold": 0, "all_defective": 0, "pairs": 0}
    for (prompt, persona), group in frame.groupby(["prompt", "persona"], sort=False):
        counts["groups"] += 1
        clean = group[~group["hard_defect"]].sort_values("score", ascending=False)
        ranked = group.sort_values("score", ascending=False)
        p = personas[persona]
        system = SYSTEM_TEMPLATE.format(description=p.description)
        base = {"persona": persona, "description": p.description, "traits": [p.traits[t] for t in TRAITS],
                "prompt": prompt, "source": group["source"].iloc[0], "split": group["split"].iloc[0]}
        if clean.empty:
            counts["all_defective"] += 1
        elif clean["score"].iloc[0] < threshold:
            counts["below_threshold"] += 1
        else:
            best = clean.iloc[0]
            counts["kept"] += 1
            sft.append({**base, "response": best["reply_trimmed"], "score": float(best["score"]),
                        "persona_prob": float(best["persona_prob"]), "relevance": float(best["relevance"]),
                        "fluency": float(best["fluency"]), "candidates": len(group),
                        "origin": str(best.get("origin", "base:prompted")),
                        "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt},
                                     {"role": "assistant", "content": best["reply_trimmed"]}]})
            worst = ranked.iloc[-1]
            if ("score" in kinds and float(best["score"]) - float(worst["score"]) >= pair_margin
                    and worst["reply_trimmed"] != best["reply_trimmed"]):
                pairs.append(preference_row(base, best, worst))
        if "persona" in kinds and (pair := persona_pair(clean, persona_gap, no_less_relevant, no_less_fluent)) is not None:
            row = preference_row(base, *pair)
            if not (pairs and (pairs[-1]["prompt"], pairs[-1]["persona"], pairs[-1]["chosen"], pairs[-1]["rejected"])
                    == (prompt, persona, row["chosen"], row["rejected"])):
                pairs.append(row)
    counts["pairs"] = len(pairs)
    return sft, pairs, counts


def preference_row(base: dict, chosen, rejected) -> dict:
    return {**base, "chosen": chosen["reply_trimmed"], "rejected": rejected["reply_trimmed"],
            "chosen_score": float(chosen["score"]), "rejected_score": float(rejected["score"]),
            "chosen_persona_prob": float(chosen["persona_prob"]),
            "rejected_persona_prob": float(rejected["persona_prob"])}


CARD = """---
license: cc-by-4.0
language:
- en
pretty_name: PersonaWeave persona dialogues v2 (best-of-N, judge-selected)
task_categories:
- text-generation
tags:
- persona
- dialogue
- synthetic
- preference
configs:
- config_name: default
  data_files:
  - split: train
    path: train.parquet
  - split: validation
    path: validation.parquet
  - split: test
    path: test.parquet
- config_name: preferences
  data_files:
  - split: train
    path: preferences_train.parquet
  - split: validation
    path: preferences_validation.parquet
  - split: test
    path: preferences_test.parquet
---

# PersonaWeave persona dialogues v2

Real user turns answered in character by {personas}; for each
(user turn, persona) the reply is the **best of {num_samples} sampled replies** of the prompted base
model, chosen by the *selection judge*, and {pair_kind} form a preference pair.

## How it was made

- **User turns**: {turns} distinct first turns from {sources} (the same shippable sources as v1),
  split by turn (a turn and all its replies are in one split): {split_turns}.
- **Candidates**: SmolLM2-135M-Instruct with the persona's description in the system prompt,
  {num_samples} samples per (turn, persona), temperature {temperature}, top-p {top_p}, repetition
  penalty {repetition_penalty}, at most {max_new_tokens} new tokens, each cut back to its last complete
  sentence ({candidates} candidates, {new_tokens} new tokens; sampled in {dtypes}).
- **Selection judge** (`personaweave.evaluation.judges.{judge}`): persona evidence from {evidence}, gated by relevance to the user turn
  (sentence-embedding similarity), plus a relevance term, minus penalties for low bare-base
  fluency, repetition loops, empty or cut-off replies and restating the description. Kept: the best
  candidate if its score is at least {threshold} and it has no hard defect
  ({kept} of {groups} groups, acceptance {acceptance:.1%}); {pair_rule}.
- The evaluation judge's held-out anchor lines were never read (a test checks it).

| split | SFT rows | preference pairs |
| --- | --- | --- |
{split_rows}

Means of the selected replies vs all candidates (selection judge): persona probability
{sel_persona:.3f} vs {all_persona:.3f}, relevance {sel_rel:.3f} vs {all_rel:.3f}, fluency (bare base
log-likelihood per token) {sel_flu:.3f} vs {all_flu:.3f}.

Built by `datasets_scripts/build_persona_dialogues_v2.py` from the shards of
`datasets_scripts/generate_candidates.py`; numbers in `stats.json`.
"""


CARD_PERSONAS = {
    "default": {"personas": "the eight default personas of personaweave", "judge": "SelectionJudge",
                "evidence": "the\n  personas' example lines (softmax over prototypes)"},
    "style": {"personas": "the 64 composed training style personas of personaweave (role x temperament x speech "
                          "habit;\nthe 8 unseen combinations are not in it)", "judge": "StyleSelectionJudge",
              "evidence": "P(role) x P(temperament) over\n  the roles' and temperaments' example lines x a rule "
                          "check of the speech habit"},
}


def write_card(stats: dict, out: str) -> None:
    gen = stats["generation"]
    kinds = stats.get("pair_by", ["score"])
    kind_names, rules = [], []
    if "score" in kinds:
        kind_names.append("(best, worst)")
        rules.append(f"a pair when best - worst >= {stats['pair_margin']}")
    if "persona" in kinds:
        kind_names.append("(most, least in-character) candidates")
        rules.append(f"a pair: the highest persona probability among the defect-free candidates at least as relevant "
                     f"as their median vs the lowest persona probability among the defect-free candidates"
                     f"{' no more relevant than it' if stats.get('no_less_relevant') else ''}"
                     f"{' no more fluent than it' if stats.get('no_less_fluent') else ''}, when they differ by "
                     f">= {stats['persona_gap']}")
    pair_kind, pair_rule = " and ".join(kind_names), "; and ".join(rules)
    text = CARD.format(
        num_samples=gen.get("num_samples"), turns=stats["turns"], sources=", ".join(gen.get("sources", [])),
        split_turns=", ".join(f"{k} {v}" for k, v in stats["turns_per_split"].items()),
        temperature=gen.get("temperature"), top_p=gen.get("top_p"), repetition_penalty=gen.get("repetition_penalty"),
        max_new_tokens=gen.get("max_new_tokens"), candidates=stats["candidates"], new_tokens=stats["new_tokens"],
        threshold=stats["threshold"], kept=stats["kept"], groups=stats["groups"], acceptance=stats["acceptance_rate"],
        pair_kind=pair_kind, pair_rule=pair_rule, **CARD_PERSONAS[gen.get("personas", "default")],
        dtypes=", ".join(f"{dtype} ({n} candidates)" for dtype, n in stats.get("dtypes", {}).items()) or "float32",
        split_rows="\n".join(f"| {s} | {stats['rows'][s]} | {stats['pairs_per_split'][s]} |" for s in SPLITS),
        sel_persona=stats["mean_selected"].get("persona_prob", float("nan")),
        all_persona=stats["mean_all_candidates"]["persona_prob"],
        sel_rel=stats["mean_selected"].get("relevance", float("nan")), all_rel=stats["mean_all_candidates"]["relevance"],
        sel_flu=stats["mean_selected"].get("fluency", float("nan")), all_flu=stats["mean_all_candidates"]["fluency"])
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", default=["datasets_scripts/shards/v2"],
                        help="candidate folders; several (e.g. round 1 + an expert-iteration round) are pooled per "
                             "(turn, persona) before selection; the first one's turns.json describes the data")
    parser.add_argument("--out", default="personaweave/data/persona_dialogues_v2")
    parser.add_argument("--threshold", type=float, default=0.25,
                        help="minimum selection score of the kept reply (see SelectionJudge)")
    parser.add_argument("--pair_margin", type=float, default=0.2,
                        help="--pair_by score: minimum selection-score gap of a (best, worst) pair")
    parser.add_argument("--pair_by", choices=PAIR_BY, nargs="+", default=["score"],
                        help="score: (best, worst) by the selection score; persona: pairs contrasting persona evidence; "
                             "both: the two pooled")
    parser.add_argument("--persona_gap", type=float, default=0.3,
                        help="--pair_by persona: minimum persona-probability gap of a pair")
    parser.add_argument("--no_less_relevant", action="store_true",
                        help="--pair_by persona: the rejected reply is never more relevant than the chosen one")
    parser.add_argument("--no_less_fluent", action="store_true",
                        help="--pair_by persona: the rejected reply is never more fluent (bare base) than the chosen one")
    parser.add_argument("--judge_first", nargs="*", default=["train"],
                        help="judge unjudged shards holding these splits first")
    parser.add_argument("--max_judge", type=int, default=None,
                        help="judge at most this many new shards, then build from the judged ones only")
    args = parser.parse_args(argv)

    import pandas as pd

    from personaweave.evaluation.judges import SelectionJudge, StyleSelectionJudge
    from personaweave.zoo import load_base, load_persona_set

    start = time.time()
    shards = [path for folder in args.shards for path in sorted(glob.glob(os.path.join(folder, "shard-*.parquet")))]
    if not shards:
        raise SystemExit(f"error: no candidate shards in {', '.join(args.shards)}")
    # the generation settings of the first folder; its persona set is the judge's and the data's
    settings = json.load(open(os.path.join(args.shards[0], "turns.json"), encoding="utf-8"))["settings"]
    persona_set = settings.get("personas", "default")
    judge = None
    frames = []
    first = set(args.judge_first or [])

    def priority(path: str) -> int:
        if os.path.exists(path.replace("shard-", "judged-")) or not first:
            return 0
        return 0 if first & set(pd.read_parquet(path, columns=["split"])["split"]) else 1

    judged_new = 0
    for path in sorted(shards, key=priority):  # stable: shard order within each group
        judged = path.replace("shard-", "judged-")
        if os.path.exists(judged):
            frames.append(pd.read_parquet(judged))
            continue
        if args.max_judge is not None and judged_new >= args.max_judge:
            continue
        judged_new += 1
        if judge is None:
            model, tokenizer = load_base()
            if persona_set == "style":  # composed personas: role x temperament x habit, factorised
                judge = StyleSelectionJudge.from_style_personas(load_persona_set(persona_set), base_model=model.eval(),
                                                                tokenizer=tokenizer)
            else:
                judge = SelectionJudge.from_personas(load_persona_set(persona_set), base_model=model.eval(),
                                                     tokenizer=tokenizer)
        shard_start = time.time()
        frames.append(judge_shard(path, judge, judged))
        print(json.dumps({"judged": os.path.basename(path), "seconds": round(time.time() - shard_start, 1)}), flush=True)
    frame = pd.concat(frames, ignore_index=True)
    if "origin" not in frame:
        frame["origin"] = "base:prompted"
    frame["origin"] = frame["origin"].fillna("base:prompted")
    sft, pairs, counts = select(frame, args.threshold, args.pair_margin, persona_set, args.pair_by, args.persona_gap,
                                args.no_less_relevant, args.no_less_fluent)
    os.makedirs(args.out, exist_ok=True)
    rows = {}
    for split in SPLITS:
        part = [{k: v for k, v in r.items() if k != "split"} for r in sft if r["split"] == split]
        rows[split] = len(part)
        pd.DataFrame(part).to_parquet(os.path.join(args.out, f"{split}.parquet"), index=False)
        pair_part = [{k: v for k, v in r.items() if k != "split"} for r in pairs if r["split"] == split]
        pd.DataFrame(pair_part).to_parquet(os.path.join(args.out, f"preferences_{split}.parquet"), index=False)
    stats = {"shards": len(frames), "shards_not_judged": len(shards) - len(frames), "candidates": len(frame), "new_tokens": int(frame["new_tokens"].sum()),
             "turns": int(frame["prompt"].nunique()),
             "turns_per_split": {sp: int(frame[frame["split"] == sp]["prompt"].nunique()) for sp in SPLITS}, **counts, "acceptance_rate": counts["kept"] / max(1, counts["groups"]),
             "rows": rows, "pairs_per_split": {s: sum(r["split"] == s for r in pairs) for s in SPLITS},
             "threshold": args.threshold, "pair_margin": args.pair_margin, "pair_by": args.pair_by,
             "persona_gap": args.persona_gap if "persona" in args.pair_by else None,
             "no_less_relevant": args.no_less_relevant if "persona" in args.pair_by else None,
             "no_less_fluent": args.no_less_fluent if "persona" in args.pair_by else None, "generation": settings,
             "dtypes": frame["dtype"].value_counts().to_dict() if "dtype" in frame else {},
             "mean_selected": {k: float(pd.DataFrame(sft)[k].mean()) for k in ("score", "persona_prob", "relevance", "fluency")} if sft else {},
             "mean_all_candidates": {k: float(frame[k].replace([float("-inf")], float("nan")).mean())
                                     for k in ("score", "persona_prob", "relevance", "fluency")},
             "selected_origin": pd.Series([r["origin"] for r in sft]).value_counts().to_dict() if sft else {},
             "seconds_build": round(time.time() - start, 1)}
    with open(os.path.join(args.out, "stats.json"), "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2)
    write_card(stats, args.out)
    print(json.dumps({k: stats[k] for k in ("candidates", "turns", "kept", "acceptance_rate", "pairs", "rows")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
