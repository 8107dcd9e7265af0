"""Does a persona hold over a long conversation? Persona accuracy at every turn of 10-turn chats.

Two conditions, same user turns, same greedy decoding, same history window:
- `service`: the personality service's own prompt building (`PersonaService.conversation`): the
  persona token re-inserted in every turn, stored history and long-term memory, turns persisted
  in SQLite as in production;
- `prompt_baseline`: the persona description as a system prompt at the top of the chat, the same
  last-N history, no persona token.
Each reply is scored by the evaluation's persona classifier; the table gives accuracy per turn.

    python recipes/persona_drift.py --conversations 4 --turns 10 --output outputs/persona_drift.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from personaweave import describe
from personaweave.evaluation import PersonaClassifier, save_json


def user_scripts(prompts: list[str], conversations: int, turns: int) -> list[list[str]]:
    if conversations * turns > len(prompts):
        raise ValueError(f"Need {conversations * turns} distinct user turns, the test split has {len(prompts)}.")
    return [prompts[i * turns:(i + 1) * turns] for i in range(conversations)]


def run_service(service: Any, personas: list[str], scripts: list[list[str]], turns: int) -> dict[tuple, list[str]]:
    from personaweave.service.app import ChatRequest

    replies: dict[tuple, list[str]] = {}
    keys = [(p, c) for p in personas for c in range(len(scripts))]
    for t in tqdm(range(turns), desc="service turns"):
        prompts = []
        for p, c in keys:
            request = ChatRequest(model=p, user=f"{p}-{c}", messages=[{"role": "user", "content": scripts[c][t]}])
            prompts.append(service.conversation(p, request)[0])
        texts = [r for i in range(0, len(prompts), 16) for r in service._generate_batch(prompts[i:i + 16])]
        for (p, c), text in zip(keys, texts):
            service.persist(f"{p}-{c}", p, scripts[c][t], text)
            replies.setdefault((p, c), []).append(text)
    return replies


def run_baseline(model: Any, tokenizer: Any, personas: list[str], scripts: list[list[str]], turns: int,
                 history_turns: int, max_new_tokens: int) -> dict[tuple, list[str]]:
    from personaweave.generation import generate_replies

    keys = [(p, c) for p in personas for c in range(len(scripts))]
    history: dict[tuple, list[dict[str, str]]] = {k: [] for k in keys}
    replies: dict[tuple, list[str]] = {k: [] for k in keys}
    for t in tqdm(range(turns), desc="baseline turns"):
        prompts = [describe(model.personas[p].description, scripts[c][t], history[(p, c)][-history_turns:])
                   for p, c in keys]
        texts = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens).texts
        for (p, c), text in zip(keys, texts):
            history[(p, c)] += [{"role": "user", "content": scripts[c][t]}, {"role": "assistant", "content": text}]
            replies[(p, c)].append(text)
    return replies


def accuracy_per_turn(classifier: PersonaClassifier, replies: dict[tuple, list[str]], turns: int) -> list[float]:
    out = []
    for t in range(turns):
        keys = list(replies)
        probs = classifier.predict_proba([replies[k][t] for k in keys])
        out.append(float(np.mean([classifier.labels[i] == p for i, (p, _) in zip(probs.argmax(-1), keys)])))
    return out


def main() -> None:
    from personaweave.data import load_persona_dialogues
    from personaweave.memory import Memory
    from personaweave.pretrained import load_pretrained_personas
    from personaweave.service import PersonaService, Storage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="outputs/persona_classifier")
    parser.add_argument("--conversations", type=int, default=4, help="conversations per persona")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--output", default="outputs/persona_drift.json")
    args = parser.parse_args()

    model, tokenizer, _ = load_pretrained_personas(with_adapters=False)
    model.eval()
    classifier = PersonaClassifier.from_pretrained(args.classifier)
    personas = [p for p in model.config.persona_names if p in classifier.labels]
    scripts = user_scripts(sorted(set(load_persona_dialogues("test")["prompt"])), args.conversations, args.turns)
    with tempfile.TemporaryDirectory() as tmp:
        service = PersonaService(model, tokenizer, Storage(f"sqlite:///{os.path.join(tmp, 'drift.db')}"),
                                 memory=Memory(), max_new_tokens=args.max_new_tokens)
        service_replies = run_service(service, personas, scripts, args.turns)
    baseline_replies = run_baseline(model, tokenizer, personas, scripts, args.turns, service.history_turns,
                                    args.max_new_tokens)
    results = {"conversations": len(personas) * len(scripts), "turns": args.turns,
               "history_turns": service.history_turns, "decoding": "greedy",
               "service": accuracy_per_turn(classifier, service_replies, args.turns),
               "prompt_baseline": accuracy_per_turn(classifier, baseline_replies, args.turns),
               "examples": {f"{p}-{c}": {"service": service_replies[(p, c)][::3],
                                         "prompt_baseline": baseline_replies[(p, c)][::3]}
                            for p, c in list(service_replies)[:: len(scripts) * 2]}}
    save_json(results, args.output)
    print(json.dumps({k: results[k] for k in ("service", "prompt_baseline")}))


if __name__ == "__main__":
    main()
