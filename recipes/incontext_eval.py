"""How well does the in-context learner estimate traits? Leave-one-persona-out on the persona dialogues.

For each persona P: the example bank is the train replies of the *other* personas with their
trait labels (so P's own traits cannot be copied from the bank); contexts are P's test replies,
three at a time. The LM (the shipped SmolLM2 by default, or any OpenAI-compatible endpoint via
--url) answers trait JSON; compared with P's true ten traits: MAE, share of traits within 0.1,
and the share of answers that held usable JSON. Baselines on the same contexts: the bank's mean
traits, and copying the traits of the most similar bank example (what the shots alone give).

    python recipes/incontext_eval.py --config recipes/configs/incontext_eval.yaml [--url http://host/v1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm
from trl import TrlParser

from personaweave.files import write_json
from personaweave.models.personas import TRAITS
from personaweave.traits.incontext import InContextTraitEstimator, parse_traits, trait_prompt


@dataclass
class InContextEvalArguments:
    contexts_per_persona: int = field(default=4, metadata={"help": "Contexts scored per held-out persona."})
    replies_per_context: int = field(default=3, metadata={"help": "Test replies joined into one context."})
    bank_per_persona: int = field(default=40, metadata={"help": "Train replies per other persona in the bank."})
    url: Optional[str] = field(default=None, metadata={
        "help": "An OpenAI-compatible /v1 URL instead of the local SmolLM2."})
    output: str = field(default="outputs/incontext_eval.json", metadata={"help": "The JSON report."})


def make_parser() -> TrlParser:
    return TrlParser((InContextEvalArguments,))


def scores(predicted: list[np.ndarray], truth: list[np.ndarray]) -> dict[str, float]:
    err = np.abs(np.stack(predicted) - np.stack(truth))
    return {"mae": round(float(err.mean()), 4), "within_0.1": round(float((err <= 0.1 + 1e-6).mean()), 4)}


def main(args: InContextEvalArguments) -> dict:
    from personaweave.data import load_persona_dialogues
    from personaweave.encoders import default_encoder
    from personaweave.traits.incontext import local_generator, openai_generator
    from personaweave.zoo import load_base

    data = load_persona_dialogues()
    if args.url:
        generate = openai_generator(args.url)
    else:
        model, tokenizer = load_base()
        generate = local_generator(model.eval(), tokenizer)
    encoder = default_encoder()
    train, test = data["train"], data["test"]
    personas = sorted(set(test["persona"]))
    rows = {"llm": [], "bank_mean": [], "nearest_example": [], "truth": []}
    parsed, answers = 0, []
    for persona in tqdm(personas, desc="personas"):
        bank = [(r["response"], dict(zip(TRAITS, r["traits"]))) for p in personas if p != persona
                for r in train.filter(lambda x, p=p: x["persona"] == p).select(range(args.bank_per_persona))]
        estimator = InContextTraitEstimator([t for t, _ in bank], [t for _, t in bank], generate, encoder=encoder)
        mean = np.mean([[t[k] for k in TRAITS] for _, t in bank], axis=0)
        mine = test.filter(lambda x, p=persona: x["persona"] == p)
        truth = np.asarray(mine[0]["traits"], dtype=float)
        for c in range(args.contexts_per_persona):
            replies = mine["response"][c * args.replies_per_context:(c + 1) * args.replies_per_context]
            context = " ".join(replies)
            answer = generate(trait_prompt(estimator.examples_for(context), context))
            sentinel = parse_traits(answer, default={t: -1.0 for t in TRAITS})
            parsed += int(any(v >= 0 for v in sentinel.values()))
            estimate = parse_traits(answer)
            rows["llm"].append(np.asarray([estimate[t] for t in TRAITS]))
            rows["bank_mean"].append(mean)
            nearest = estimator.examples_for(context)[0][1]
            rows["nearest_example"].append(np.asarray([nearest[t] for t in TRAITS]))
            rows["truth"].append(truth)
            answers.append({"persona": persona, "answer": answer[:300]})
    results = {name: scores(rows[name], rows["truth"]) for name in ("llm", "bank_mean", "nearest_example")}
    results.update(contexts=len(rows["truth"]), usable_json_share=round(parsed / len(rows["truth"]), 3),
                   generator=args.url or "local SmolLM2-135M-Instruct (greedy)", answers=answers[::4])
    write_json(results, args.output)
    print(json.dumps({k: v for k, v in results.items() if k != "answers"}))
    return results


if __name__ == "__main__":
    (eval_args,) = make_parser().parse_args_and_config()
    main(eval_args)
