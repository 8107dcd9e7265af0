"""The `personaweave` command: chat, manage personas in a model folder, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Optional


def _load(args: argparse.Namespace):
    """(model, tokenizer) from --model DIR (a saved PersonaWeave folder) or --base (a fresh build)."""
    from transformers import AutoTokenizer

    from . import PersonaWeaveForCausalLM

    if getattr(args, "model", None):
        _require_model_folder(args.model)
        model = PersonaWeaveForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.padding_side = "left"
        return model, tokenizer
    return PersonaWeaveForCausalLM.from_base(args.base, personas="default")


def _require_model_folder(path: str) -> None:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise SystemExit(f"error: {path} is not a model folder (no config.json).")
    with open(config, encoding="utf-8") as handle:
        if json.load(handle).get("model_type") != "personaweave":
            raise SystemExit(f"error: {path} does not hold a PersonaWeave model (model_type != 'personaweave').")


def cmd_chat(args: argparse.Namespace) -> int:
    from . import chat
    from .generation import generate_replies

    model, tokenizer = _load(args)
    if args.persona not in model.config.persona_names:
        raise SystemExit(f"error: unknown persona {args.persona!r}; known: {model.config.persona_names}")
    history: list[dict[str, str]] = []
    messages = [args.message] if args.message else None
    while True:
        if messages is None:
            try:
                text = input("you> ").strip()
            except EOFError:
                return 0
            if not text or text in {"/quit", "/exit"}:
                return 0
        else:
            if not messages:
                return 0
            text = messages.pop(0)
        conversation = chat(args.persona, text, history, model=model)
        reply = generate_replies(model, tokenizer, [conversation], max_new_tokens=args.max_new_tokens).texts[0]
        print(f"{args.persona}> {reply}", flush=True)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def cmd_personas(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from . import PersonaWeaveForCausalLM
    from .saving import save_folder_atomically

    _require_model_folder(args.model)
    model = PersonaWeaveForCausalLM.from_pretrained(args.model)
    if args.action == "list":
        for persona in model.personas:
            kind = f"blend {persona.blend}" if persona.blend else persona.description
            print(f"{persona.name:<14} {kind}")
        return 0
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.action == "add":
        model.add_persona(args.name, args.description, tokenizer=tokenizer)
    elif args.action == "blend":
        model.add_persona(args.name, blend=_parse_weights(args.weights), tokenizer=tokenizer)
    elif args.action == "remove":
        model.remove_persona(args.name)
    save_folder_atomically(model, tokenizer, args.model)
    print(f"saved {args.model}: {model.config.persona_names}")
    return 0


def _parse_weights(items: Sequence[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: blend weight {item!r} is not NAME=WEIGHT")
        try:
            weights[name] = float(value)
        except ValueError:
            raise SystemExit(f"error: blend weight {item!r} is not a number") from None
    return weights


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(base=args.base, model_dir=args.model, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personaweave", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base", default="smollm2-135m-instruct",
                       help="zoo name, local folder or Hub id of the base LM (default: the shipped SmolLM2)")
        p.add_argument("--model", help="a saved PersonaWeave model folder (instead of --base)")
        p.add_argument("--max-new-tokens", type=int, default=48)

    p = sub.add_parser("chat", help="chat with a persona (interactive when no message is given)")
    add_model_args(p)
    p.add_argument("--persona", required=True)
    p.add_argument("message", nargs="?")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("personas", help="list, add, blend or remove personas of a model folder")
    p.add_argument("action", choices=["list", "add", "blend", "remove"])
    p.add_argument("model", help="model folder")
    p.add_argument("name", nargs="?")
    p.add_argument("weights", nargs="*", help="for blend: NAME=WEIGHT ...")
    p.add_argument("--description", help="for add: the persona's description")
    p.set_defaults(func=cmd_personas)

    p = sub.add_parser("demo", help="replies of three personas and a blend, side by side")
    add_model_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "personas" and args.action != "list" and not args.name:
        parser.error(f"personas {args.action} needs a NAME")
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
