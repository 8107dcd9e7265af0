"""The `personaweave` command: chat, manage personas in a model folder, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Optional


class UsageError(SystemExit):
    """A usage or input error (bad path, unknown persona, malformed blend): the command prints
    `error: MESSAGE` and exits with status 2, as argparse does for its own errors."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _load(args: argparse.Namespace, with_adapters: bool = False):
    """(model, tokenizer, peft) from --model DIR (a saved PersonaWeave folder), --base (a fresh build with an
    untrained persona layer), or by default the shipped trained personas on the shipped SmolLM2. `peft`:
    the model with its LoRA sub-personalities when `with_adapters` and the source has them, else None."""
    from personaweave.loading import from_base, load_model, warn_if_untrained

    peft = None
    if getattr(args, "model", None):
        _require_model_folder(args.model)
        model, tokenizer, peft = load_model(args.model, with_adapters=with_adapters)
    elif getattr(args, "base", None):
        model, tokenizer = from_base(args.base, personas="default")
    else:
        model, tokenizer, peft = load_model(with_adapters=with_adapters,
                                            checkpoint=getattr(args, "checkpoint", "default"))
    warn_if_untrained(model, log=lambda m: print(f"warning: {m}", file=sys.stderr))
    return model, tokenizer, peft


def _require_model_folder(path: str) -> None:
    from personaweave.loading import read_model_config

    if not os.path.exists(path):
        raise UsageError(f"{path} is not a model folder: it does not exist.")
    try:
        read_model_config(path)
    except ValueError as err:
        raise UsageError(str(err)) from None


def cmd_chat(args: argparse.Namespace) -> int:
    from personaweave.chat import chat
    from personaweave.generation import DECODING, generate_replies

    if args.description is not None and args.examples is not None:
        raise UsageError("give --description or --examples, not both")
    examples = None
    if args.examples is not None:
        try:
            with open(args.examples, encoding="utf-8") as handle:
                examples = [line.strip() for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read --examples {args.examples}: {err}") from None
    model, tokenizer, peft = _load(args, with_adapters=not args.no_adapters)
    if (args.description is not None or examples is not None) and args.persona not in model.config.persona_names:
        try:  # a persona for this chat only (best with --checkpoint descriptions)
            if examples is not None:  # fitted to the lines (a few seconds)
                model.add_persona(args.persona, examples=examples, tokenizer=tokenizer)
            else:
                model.add_persona(args.persona, description=args.description, tokenizer=tokenizer)
        except ValueError as err:
            raise UsageError(str(err)) from err
    if args.persona not in model.config.persona_names:
        raise UsageError(f"unknown persona {args.persona!r}; known: {model.config.persona_names} "
                         "(or give --description or --examples to add it for this chat)")
    # the persona's LoRA sub-personality answers with its tokens when it has one (as in the demo and `serve`)
    adapter = {}
    if peft is not None:
        from personaweave.sub_personalities import MASTER, sub_personalities

        adapter = {"adapter_names": [args.persona if args.persona in sub_personalities(peft) else MASTER]}
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
        reply = generate_replies(peft or model, tokenizer, [conversation], max_new_tokens=args.max_new_tokens,
                                 **DECODING, **adapter).texts[0]
        print(f"{args.persona}> {reply}", flush=True)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def cmd_personas(args: argparse.Namespace) -> int:
    _require_model_folder(args.model)  # the input first, before the slow imports
    weights = _parse_weights(args.weights) if args.action == "blend" else None
    if args.calibrate and args.action != "blend":
        raise UsageError("--calibrate applies to `personas blend` only.")
    if args.calibrate:
        return _calibrated_blend(args, weights)

    from transformers import AutoTokenizer

    import personaweave.encoders  # noqa: F401  (the default encoder of `personas add`)
    from personaweave.files import save_folder_atomically
    from personaweave.models import PersonaWeaveForCausalLM

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
        model.add_persona(args.name, blend=weights, tokenizer=tokenizer)
    elif args.action == "remove":
        model.remove_persona(args.name)
    save_folder_atomically(model, tokenizer, args.model, keep_other_files=True)
    print(f"saved {args.model}: {model.config.persona_names}")
    return 0


def _calibrated_blend(args: argparse.Namespace, weights: dict[str, float]) -> int:
    """`personas blend --calibrate`: weights balanced by the selection judge on the shipped training turns,
    saved as a persona; with the parents' LoRA sub-personalities, their blend is saved as its adapter."""
    from personaweave.data import load_persona_dialogues, shipped_dataset_dir
    from personaweave.evaluation.judges import SelectionJudge
    from personaweave.files import save_folder_atomically
    from personaweave.loading import load_model
    from personaweave.models import PersonaWeaveForCausalLM
    from personaweave.models.personas import describe_blend, normalise_blend
    from personaweave.sub_personalities import blend_sub_personalities, save_sub_personalities, sub_personalities
    from personaweave.training import blend_calibration

    model, tokenizer, peft = load_model(args.model)
    bank = model.personas
    requested = normalise_blend(weights, bank.names)  # an unknown name or bad weight: exit 2 via main()
    if args.name in bank.names:
        raise UsageError(f"Persona {args.name!r} already exists; remove it first.")
    if any(not bank[p].examples for p in requested):
        raise UsageError(f"--calibrate needs example lines for each parent ({sorted(requested)}): the selection "
                         "judge reads replies against them.")
    judged = [p for p in bank if p.examples and not p.blend]
    judge = SelectionJudge.from_personas(judged)
    turns = list(dict.fromkeys(load_persona_dialogues("train", shipped_dataset_dir("persona_dialogues_v2"))["prompt"]))
    turns = turns[:args.calibration_turns]
    adapters = peft is not None and set(requested) <= set(sub_personalities(peft))
    result = blend_calibration.calibrate_blend(
        model, tokenizer, args.name, requested, judge, turns, peft=peft, adapters=adapters,
        rounds=args.calibration_rounds, log=lambda line: print(f"calibrating: {line}", flush=True))
    # the master is saved from a clean copy: the loaded one carries the LoRA layers peft injected
    master = PersonaWeaveForCausalLM.from_pretrained(args.model)
    master.add_persona(args.name, blend=result.weights, tokenizer=tokenizer,
                       description=describe_blend(requested, {p: bank[p].description for p in requested}))
    if adapters:
        blend_sub_personalities(peft, result.weights, name=args.name, activate=False)
    save_folder_atomically(master, tokenizer, args.model, keep_other_files=True)  # keeps the parents' adapters
    if adapters:  # after the master: a persona without its adapter still answers, an orphan adapter does not
        save_sub_personalities(peft, args.model, [args.name])
    shares = result.to_dict()["shares"]
    print(f"saved {args.model}: {args.name} = {result.weights} (asked {requested}; "
          f"{'tokens + LoRA' if adapters else 'tokens'}; selection judge on {len(turns)} training turns: "
          + ", ".join(f"{p} {s:.0%}" for p, s in shares.items()) + ")")
    return 0


def _parse_weights(items: Sequence[str]) -> dict[str, float]:
    from personaweave.models.personas import parse_blend

    try:
        return parse_blend(items)
    except ValueError as err:
        raise UsageError(str(err)) from None


def cmd_traits(args: argparse.Namespace) -> int:
    from personaweave.traits.pretrained import predict_traits

    texts = args.text or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise SystemExit("error: give one or more texts, or pipe lines on standard input")
    for text, traits in zip(texts, predict_traits(texts, path=args.model)):
        print(json.dumps({"text": text, **{k: round(v, 3) for k, v in traits.items()}}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from personaweave.demo import run_demo

    run_demo(base=args.base or "smollm2-135m-instruct", model_dir=args.model, max_new_tokens=args.max_new_tokens,
             checkpoint=args.checkpoint)
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from personaweave.data import load_persona_dialogues
    from personaweave.data.discovery import center_within_groups, cluster_dialogues, embed_units

    data = load_persona_dialogues(args.split, data_dir=args.dataset_dir)
    raw = embed_units(list(data["response"]))
    # Replies to one user turn share its topic: removing each turn's mean embedding leaves style.
    emb = center_within_groups(raw, list(data["prompt"])) if args.center_by_prompt else raw
    if args.session_size > 1:
        # Units are sessions: N replies of one speaker (a chat log knows who spoke, not which
        # persona). The persona column only forms the sessions and scores the result.
        data, index = _sessions(data, args.session_size)
        emb = np.stack([emb[i].mean(0) for i in index])
        raw = np.stack([raw[i].mean(0) for i in index])
    found = cluster_dialogues(data["response"], args.k, traits=data["traits"], embeddings=emb,
                              vector_embeddings=raw, seed=args.seed)
    units = data["response"]
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump([{**p.to_dict(), "vector": p.vector.tolist()} for p in found.personas], handle, indent=1)
    report = {"k": found.k, "silhouette": found.silhouette, "units": len(units)}
    if "persona" in data.column_names:  # labels are only used to score, never to cluster
        import random

        truth = list(data["persona"])
        report["ari"] = adjusted_rand_score(truth, found.labels)
        report["nmi"] = normalized_mutual_info_score(truth, found.labels)
        random.Random(args.seed).shuffle(truth)  # control: the same score against shuffled labels
        report["ari_shuffled_labels"] = adjusted_rand_score(truth, found.labels)
    print(json.dumps(report))
    for persona in found.personas:
        print(f"{persona.name:<28} {persona.description}")
    return 0


def cmd_eval_benchmark(args: argparse.Namespace) -> int:
    """`eval --benchmark convai2`: ConvAI2 perplexity and F1 for no persona / profile in the prompt /
    profile through persona tokens / both."""
    from personaweave.data.convai2 import resolve_convai2_path

    if not args.data:
        raise UsageError("--benchmark convai2 needs --data: the ParlAI ConvAI2 file or its folder, e.g. "
                         "the folder holding valid_self_original_no_cands.txt (convai2_personachat).")
    try:
        path = resolve_convai2_path(args.data)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1.")
    if args.f1_limit is not None and args.f1_limit < 0:
        raise UsageError("--f1-limit must be at least 0.")
    if args.model:
        _require_model_folder(args.model)
    if args.persona_layer and not os.path.isfile(os.path.join(args.persona_layer, "persona_layer.safetensors")):
        raise UsageError(f"{args.persona_layer} holds no persona_layer.safetensors (recipes/profile_personas.py "
                         "writes one to OUTPUT_DIR/best).")
    print(f"ConvAI2 benchmark on {path} with {args.model or 'the trained personas shipped in the package'}",
          file=sys.stderr, flush=True)

    from personaweave.data.convai2 import load_convai2, sample_examples
    from personaweave.evaluation.convai2 import evaluate_convai2
    from personaweave.files import write_json

    examples = sample_examples(load_convai2(path), args.limit, seed=args.seed)
    f1_examples = examples
    if args.f1_limit is not None:
        f1_examples = sample_examples(examples, args.f1_limit, seed=args.seed + 1) if args.f1_limit else []
    encoder = None
    if args.persona_layer:  # a persona map trained by recipes/profile_personas.py, on the shipped base
        from personaweave.encoders import default_encoder
        from personaweave.loading import load_pretrained_personas
        from personaweave.training.profile_personas import ProfileSentenceEncoder

        model, tokenizer, _ = load_pretrained_personas(args.persona_layer, with_adapters=False)
        with open(os.path.join(args.persona_layer, "persona_config.json"), encoding="utf-8") as handle:
            meta = json.load(handle)
        encoder = default_encoder()
        if meta.get("encoding") == "per_sentence":
            encoder = ProfileSentenceEncoder(encoder, meta.get("max_sentences", 5))
    else:
        model, tokenizer, _ = _load(args)
    conditions = args.conditions or ["none", "prompt", "tokens", "both"]
    results = evaluate_convai2(model, tokenizer, examples, f1_examples=f1_examples, history_turns=args.history_turns,
                               conditions=conditions, encoder=encoder, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, bf16=args.bf16,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    results.update({"benchmark": "convai2", "data": path, "model": args.persona_layer or args.model or "shipped",
                    "seed": args.seed})
    write_json(results, args.out)
    print(json.dumps({c: {k: v for k, v in row.items() if k != "samples"} for c, row in results["conditions"].items()},
                     indent=1))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.benchmark:
        return cmd_eval_benchmark(args)
    # Every path first, in a second, before anything heavy is imported or trained.
    if args.onnx:
        for name in args.onnx_files:
            if not os.path.isfile(os.path.join(args.onnx, name)):
                raise UsageError(f"{os.path.join(args.onnx, name)} does not exist: give --onnx an exported folder "
                                 "(personaweave export onnx MODEL --out DIR) and --onnx-files the files in it.")
    elif args.model:
        from personaweave.loading import folder_persona_layer_is_trained, untrained_message

        _require_model_folder(args.model)
        if not folder_persona_layer_is_trained(args.model):
            print(f"warning: {untrained_message()}", file=sys.stderr)
    if not os.path.isfile(os.path.join(args.classifier, "config.json")):
        if not args.train_classifier:
            raise UsageError(
                f"no persona classifier in {args.classifier}: give --classifier a trained one, or add "
                "--train-classifier to train it there first (about 10 minutes on 2 CPU cores, once).")
        print(f"training the persona classifier into {args.classifier} first (about 10 minutes on 2 CPU cores; "
              "later runs reuse it)", file=sys.stderr, flush=True)
    if not args.onnx:
        print(f"evaluating {args.model or 'the trained personas shipped in the package'}", file=sys.stderr,
              flush=True)

    from personaweave.evaluation.harness import evaluate_onnx, evaluate_personas
    from personaweave.files import write_json

    if args.onnx:
        results = {f: evaluate_onnx(args.onnx, args.classifier, file_name=f, num_prompts=args.num_prompts,
                                    seed=args.seed, max_new_tokens=args.max_new_tokens) for f in args.onnx_files}
        write_json(results, args.out)
        print(json.dumps({f: r["persona_accuracy"] for f, r in results.items()}))
        return 0
    results = evaluate_personas(args.model, args.classifier, num_prompts=args.num_prompts, seed=args.seed,
                                max_new_tokens=args.max_new_tokens)
    write_json(results, args.out)
    print(json.dumps({"summary": results["summary"], "blends": results["blends"],
                      "perplexity": results["perplexity"], "classifier": results["classifier"]}, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from personaweave.export.onnx import export_onnx

    def export(folder: str) -> str:
        try:
            return export_onnx(folder, args.out, task=args.task, quantize=args.quantize, all_logits=args.all_logits)
        except ValueError as err:  # name the command's option, not the function's argument
            raise ValueError(str(err).replace("pass task=", "pass --task")) from None

    if args.model:
        out = export(args.model)
    else:  # the shipped checkpoint, loaded as chat and serve load it, saved as a full folder first
        model, tokenizer, _ = _load(args)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            del model
            out = export(folder)
        print(f"note: the graph is the shipped {args.checkpoint!r} master with its persona tokens; LoRA "
              "sub-personalities are not in it (`serve --backend onnx` serves the master's personas).",
              file=sys.stderr)
    print(f"exported {args.model or 'the shipped ' + repr(args.checkpoint) + ' checkpoint'} -> {out}: "
          f"{sorted(os.listdir(out))}")
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    if args.model and not os.path.isdir(args.model):
        raise UsageError(f"{args.model} is not a model folder: it does not exist.")
    personas = [p.strip() for p in args.personas.split(",") if p.strip()] if args.personas else None
    blends = {name: _parse_weights(spec) for name, spec in (args.blend or [])}

    from personaweave.export.bake import bake

    try:
        out = bake(args.model, args.out, personas=personas, merge_lora=args.merge_lora, blends=blends,
                   adapters=not args.no_adapters)
    except FileExistsError as err:
        raise UsageError(str(err)) from None
    with open(os.path.join(out, "persona_tokens.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    print(f"baked {args.model or 'the shipped personas'} -> {out} ({meta['architecture']}, no remote code)")
    for persona in meta["personas"]:
        extra = f"  + {persona['adapter']}" if persona["adapter"] else ""
        print(f"  {persona['name']:<14} system prompt: {persona['prompt']}{extra}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import tempfile

    from personaweave.export.hub import prepare_upload, push_to_hub

    results = None
    if args.eval:
        with open(args.eval, encoding="utf-8") as handle:
            results = json.load(handle)
    folder = args.dry_run or tempfile.mkdtemp(prefix="personaweave-push-")
    prepare_upload(args.model, folder, args.repo_id, onnx_dir=args.onnx, results=results)
    if args.dry_run:
        print(f"dry run: the upload folder is {folder}: {sorted(os.listdir(folder))}")
        return 0
    try:
        print(push_to_hub(folder, args.repo_id, private=args.private))
    except Exception as err:  # offline, no token, no permission: say so plainly
        print(f"error: could not push to {args.repo_id}: {type(err).__name__}: {str(err).splitlines()[0][:300]}",
              file=sys.stderr)
        return 2
    return 0


def _api_keys(args: argparse.Namespace) -> list[str]:
    """Keys from --api-key (repeatable), --api-key-file (one per line, # comments) and the
    PERSONAWEAVE_API_KEYS environment variable (comma-separated)."""
    keys = list(args.api_key or [])
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as handle:
                keys += [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        except OSError as err:
            raise SystemExit(f"error: cannot read --api-key-file: {err}") from None
        if not keys:
            raise SystemExit(f"error: --api-key-file {args.api_key_file} holds no key")
    keys += [k.strip() for k in os.environ.get("PERSONAWEAVE_API_KEYS", "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from personaweave.serving import PersonaService, Storage, create_app
    from personaweave.serving.memory import Memory

    keys = _api_keys(args)
    if not keys and not _is_loopback(args.host):
        raise SystemExit(f"error: refusing to serve on {args.host} without API keys: anyone who can reach it could "
                         "read and delete every user's data. Give --api-key / --api-key-file / PERSONAWEAVE_API_KEYS, "
                         "or use a loopback --host (127.0.0.1).")
    if any(len(k) < 16 for k in keys):
        print("warning: an API key is shorter than 16 characters; use long random keys", file=sys.stderr)
    print(f"personaweave serve: http://{args.host}:{args.port} - " + (
        f"{len(keys)} API key(s), each its own tenant" if keys else
        "no API keys: loopback only, without authentication"), file=sys.stderr, flush=True)
    if args.backend == "onnx" and (not args.onnx_dir or args.adaptive):
        raise SystemExit("error: --backend onnx needs --onnx-dir (a `personaweave export onnx` folder of this model) "
                         "and serves its fixed personas: it cannot be combined with --adaptive.")
    model, tokenizer, peft = _load(args, with_adapters=not args.no_adapters and args.backend == "torch")
    decoder = None
    if args.backend == "onnx":
        from personaweave.serving.onnx_backend import OnnxDecoder, check_graph_matches

        try:
            check_graph_matches(model, args.onnx_dir)
            decoder = OnnxDecoder(args.onnx_dir, args.onnx_file, threads=args.threads)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None
        print(f"personaweave serve: ONNX Runtime backend, {decoder.path}", file=sys.stderr, flush=True)
    if args.dtype != "float32" or args.threads:
        import torch

        from personaweave.generation import cpu_has_fast_bfloat16

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.dtype == "bfloat16" and not torch.cuda.is_available() and not cpu_has_fast_bfloat16():
            print("personaweave serve: warning: this CPU has neither AMX nor AVX-512 BF16, so bfloat16 is emulated "
                  "and much slower than float32 here; drop --dtype bfloat16", file=sys.stderr, flush=True)
        model.to(getattr(torch, args.dtype))
    adapter = None
    if args.adaptive:
        from personaweave.serving.adaptation.engine import TraitAdaptationEngine
        from personaweave.serving.adaptation.policy import load_policy

        adapter = TraitAdaptationEngine(model, tokenizer, policy=load_policy(args.policy) if args.policy else None)
    experiment = _parse_weights(args.ab_test) if args.ab_test else None
    service = PersonaService(model, tokenizer, Storage(args.db, synchronous=args.sqlite_synchronous),
                             memory=None if args.no_memory else Memory(),
                             adapter=adapter, max_new_tokens=args.max_new_tokens, batching=not args.no_batching,
                             max_batch=args.max_batch,
                             experiment=experiment, experiment_name=args.ab_name, pool_size=args.pool_size,
                             max_queue=args.max_queue, max_streams=args.max_streams,
                             request_timeout=args.request_timeout, max_prompt_tokens=args.max_prompt_tokens,
                             decoder=decoder, prefix_cache_tokens=args.prefix_cache_tokens, peft=peft)
    if peft is not None:
        print(f"personaweave serve: LoRA sub-personalities {sorted(service.sub_personalities)} (each answers its "
              "persona; --no-adapters: persona tokens only)", file=sys.stderr, flush=True)
    _say_when_listening(args.host, args.port, model.config.persona_names + (["auto"] if adapter else [])
                        + (["ab"] if experiment else []))
    uvicorn.run(create_app(service, api_keys=keys), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


def _say_when_listening(host: str, port: int, models: list[str]) -> None:
    """Print a `ready` line with the OpenAI base URL once the server accepts connections (uvicorn itself
    runs at warning level: no access log)."""
    import socket
    import threading
    import time

    probe = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host.strip("[]")

    def wait() -> None:
        for _ in range(1200):
            try:
                with socket.create_connection((probe, port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            return
        print(f"ready: OpenAI-compatible API at http://{host}:{port}/v1 (e.g. openai.OpenAI(base_url="
              f"'http://{host}:{port}/v1', api_key=...)); models: {', '.join(models)}. Ctrl+C stops.",
              file=sys.stderr, flush=True)

    threading.Thread(target=wait, daemon=True, name="personaweave-ready").start()


def _sessions(data, size: int):
    """(sessions dataset, row indices of each session): consecutive replies of one speaker."""
    from datasets import Dataset

    by_speaker: dict[str, list[int]] = {}
    for i, persona in enumerate(data["persona"]):
        by_speaker.setdefault(persona, []).append(i)
    rows, index = [], []
    for persona, idx in by_speaker.items():
        for i in range(0, len(idx) - size + 1, size):
            chunk = idx[i:i + size]
            index.append(chunk)
            rows.append({"persona": persona, "response": [data[j]["response"] for j in chunk],
                         "traits": data[chunk[0]]["traits"]})
    return Dataset.from_list(rows), index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personaweave", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base", help="zoo name, local folder or Hub id of a base LM: a fresh build with an "
                       "untrained persona layer (default: the shipped trained personas on SmolLM2)")
        p.add_argument("--model", help="a saved PersonaWeave model folder (instead of --base)")
        p.add_argument("--checkpoint", default="default", choices=["default", "descriptions"],
                       help="without --model/--base: the shipped checkpoint, 'default' (8 personas + LoRA) or "
                            "'descriptions' (a layer trained over 72 descriptions, for --description personas)")
        p.add_argument("--max-new-tokens", type=int, default=48)

    p = sub.add_parser("chat", help="chat with a persona (interactive when no message is given)")
    add_model_args(p)
    p.add_argument("--persona", required=True)
    p.add_argument("--description", help="add --persona from this description for this chat when the model lacks "
                   "it (e.g. with --checkpoint descriptions)")
    p.add_argument("--examples", metavar="FILE", help="or add it from example lines in its voice (a text file, one "
                   "line each, at least 5): the vector is fitted to them")
    p.add_argument("message", nargs="?")
    p.add_argument("--no-adapters", action="store_true", help="persona tokens only: do not load the LoRA "
                   "sub-personalities (by default a persona that has one answers with it)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("personas", help="list, add, blend or remove personas of a model folder")
    p.add_argument("action", choices=["list", "add", "blend", "remove"])
    p.add_argument("model", help="model folder")
    p.add_argument("name", nargs="?")
    p.add_argument("weights", nargs="*", help="for blend: NAME=WEIGHT ...")
    p.add_argument("--description", help="for add: the persona's description")
    p.add_argument("--calibrate", action="store_true",
                   help="for blend (two parents): find the weights at which replies read as each parent in the asked "
                        "proportion (selection judge, shipped training turns; minutes on CPU); with the parents' "
                        "LoRA sub-personalities their blend is saved as the new persona's adapter")
    p.add_argument("--calibration-turns", type=int, default=32, help="training turns to generate replies to")
    p.add_argument("--calibration-rounds", type=int, default=5, help="bisection rounds")
    p.set_defaults(func=cmd_personas)

    p = sub.add_parser("demo", help="replies of three personas and a blend, side by side")
    add_model_args(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="persona accuracy, similarity, diversity and perplexity of a model folder")
    p.add_argument("--model", help="a saved PersonaWeave model folder (default: the trained personas shipped "
                   "in the package, as for chat, demo and serve)")
    p.add_argument("--classifier", default="outputs/persona_classifier",
                   help="persona classifier folder (default: %(default)s)")
    p.add_argument("--train-classifier", action="store_true",
                   help="train the persona classifier into --classifier when it holds none (~10 min on 2 cores)")
    p.add_argument("--num-prompts", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=56)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/eval.json")
    p.add_argument("--onnx", help="evaluate an exported ONNX folder instead (persona accuracy)")
    p.add_argument("--onnx-files", nargs="+", default=["model.onnx", "model_quantized.onnx"])
    p.add_argument("--benchmark", choices=["convai2"],
                   help="a public benchmark instead: convai2 = gold-reply perplexity and F1 on ConvAI2 (needs --data)")
    p.add_argument("--data", help="for --benchmark convai2: the ParlAI file or its folder")
    p.add_argument("--limit", type=int, help="for --benchmark: this many replies, drawn with --seed (default: all)")
    p.add_argument("--f1-limit", type=int,
                   help="for --benchmark: greedy replies for F1 on this many of them (default: all; 0: none)")
    p.add_argument("--history-turns", type=int,
                   help="for --benchmark: earlier exchanges kept in the prompt (default: the whole dialogue)")
    p.add_argument("--batch-size", type=int, default=16, help="for --benchmark")
    p.add_argument("--bf16", action="store_true", help="for --benchmark: bfloat16 autocast on CPU (faster)")
    p.add_argument("--conditions", nargs="+", choices=["none", "prompt", "tokens", "both"],
                   help="for --benchmark: the conditions to run (default: all four)")
    p.add_argument("--persona-layer", help="for --benchmark: a persona map from recipes/profile_personas.py "
                   "(OUTPUT_DIR/best) on the shipped base, instead of --model")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a model folder (ONNX with Optimum, optional int8)")
    p.add_argument("format", choices=["onnx"])
    p.add_argument("model", nargs="?", help="a saved PersonaWeave model folder (default: the shipped checkpoint's "
                   "master, see --checkpoint)")
    p.add_argument("--checkpoint", default="default", choices=["default", "descriptions"],
                   help="without a model folder: which shipped checkpoint's persona layer to export")
    p.add_argument("--out", required=True)
    p.add_argument("--task", help="default: from the folder (PersonaWeave LM: text-generation-with-past, "
                   "trait model: feature-extraction, persona classifier: text-classification)")
    # int8 won persona accuracy per ms on the shipped personas (benchmarks/deploy.py): a bare --quantize means it
    p.add_argument("--quantize", nargs="?", const="int8", choices=["int8", "w8", "w4"],
                   help="a quantized graph beside model.onnx: int8 (the default) = dynamic int8 "
                        "(model_quantized.onnx); w8/w4 = weight-only MatMulNBits, 8/4-bit blocks of 32, head and "
                        "embeddings fp32 (model_w8/w4.onnx)")
    p.add_argument("--all-logits", action="store_true",
                   help="PersonaWeave LM: logits for every position (e.g. to score text); by default the graph "
                        "returns the next token's logits only, which is all generation needs and makes prompts faster")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bake", help="write a plain base-architecture checkpoint (no remote code) with the personas "
                       "as ordinary tokens, for vLLM, TGI, llama.cpp and stock Optimum")
    p.add_argument("model", nargs="?", help="a saved PersonaWeave model folder (default: the trained personas "
                   "shipped in the package)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--personas", help="comma-separated personas to bake (default: all; with --merge-lora, that one)")
    p.add_argument("--blend", nargs=2, action="append", metavar=("NAME", "A=W,B=W"),
                   help="also bake a new blend, e.g. --blend mix librarian=0.7,robot=0.3 (repeatable)")
    p.add_argument("--merge-lora", metavar="NAME", help="merge this persona's LoRA sub-personality into the weights")
    p.add_argument("--no-adapters", action="store_true", help="do not copy the LoRA sub-personalities beside it")
    p.set_defaults(func=cmd_bake)

    p = sub.add_parser("push", help="upload a model folder (+ adapters, ONNX, card) to the Hub")
    p.add_argument("--model", required=True, help="a saved PersonaWeave model folder")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--onnx", help="an exported ONNX folder to upload as onnx/")
    p.add_argument("--eval", help="evaluation JSON (from `personaweave eval`) for the card's model-index")
    p.add_argument("--dry-run", metavar="DIR", help="write the exact upload folder to DIR and stop")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("serve", help="OpenAI-compatible chat API with adaptive personas and memory")
    add_model_args(p)
    p.add_argument("--db", default="sqlite:///personaweave.db", help="SQLAlchemy URL (SQLite WAL by default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--adaptive", action="store_true", help="enable model='auto' (the adaptation engine)")
    p.add_argument("--ab-test", nargs="+", metavar="PERSONA=WEIGHT",
                   help="enable model='ab': a two-persona A/B experiment, e.g. --ab-test pirate=0.5 butler=0.5")
    p.add_argument("--ab-name", default="persona-ab",
                   help="the experiment's name (also its hashing salt; default: %(default)s)")
    p.add_argument("--policy", help="exported trait policy folder (default: hold the current traits)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-adapters", action="store_true", help="persona tokens only: do not load the LoRA "
                   "sub-personalities (by default a persona that has one answers with it; --backend torch)")
    p.add_argument("--no-batching", action="store_true")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (continuous batching)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations; bfloat16 is faster on CPUs with AMX or AVX-512 BF16 and on GPUs, "
                        "much slower elsewhere (emulated)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="what runs the forward passes: PyTorch, or ONNX Runtime on a graph from `personaweave export "
                        "onnx` (--onnx-dir; the graph's fixed personas only: no blends, no --adaptive)")
    p.add_argument("--onnx-dir", help="with --backend onnx: the `export onnx` folder of the served model")
    p.add_argument("--onnx-file", help="with --backend onnx: the graph file in --onnx-dir (default: "
                                       "model_quantized.onnx when present, else model.onnx)")
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="an accepted API key (repeatable; each key is its own tenant of users). Also "
                        "--api-key-file and the PERSONAWEAVE_API_KEYS variable (comma-separated). Without any "
                        "key the server only binds a loopback --host.")
    p.add_argument("--api-key-file", help="a file of API keys, one per line")
    p.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default="FULL",
                   help="FULL (default): a commit survives a power loss; NORMAL: a killed process only, faster")
    p.add_argument("--pool-size", type=int, default=32, help="bank slots for blends and adaptive users (LRU)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model; 503 beyond")
    p.add_argument("--max-streams", type=int, default=8, help="concurrent streaming requests; 503 beyond")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request gets 504")
    p.add_argument("--prefix-cache-tokens", type=int, default=4096,
                   help="tokens of finished turns whose cache a user's next turn reuses, so only its new "
                        "tokens are prefilled (LRU, per user; 0: off; ~46 KB per token on SmolLM2-135M)")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="prompt + max_tokens limit (default: the model's context window)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("discover", help="cluster a persona dialogue dataset into latent personas")
    p.add_argument("dataset_dir", nargs="?", help="folder with train/validation/test.parquet (default: shipped)")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, help="number of personas (default: chosen by silhouette)")
    p.add_argument("--center-by-prompt", action="store_true",
                   help="remove each user turn's mean embedding first (replies share their prompt's topic)")
    p.add_argument("--session-size", type=int, default=1,
                   help="cluster sessions of N replies by one speaker instead of single replies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="personas.json")
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("traits", help="ten personality traits in [0, 1] of each text (the shipped trait model)")
    p.add_argument("text", nargs="*", help="texts (default: one per line on standard input)")
    p.add_argument("--model", help="trait heads folder (default: the shipped one)")
    p.set_defaults(func=cmd_traits)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "personas" and args.action != "list" and not args.name:
        parser.error(f"personas {args.action} needs a NAME")
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise
    except SystemExit as err:
        if not isinstance(err.code, str):
            raise
        # `raise SystemExit("error: ...")` is a usage/input error too: the same message, status 2.
        print(err.code, file=sys.stderr)
        raise UsageError(err.code.removeprefix("error: ")) from None
    except (KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() adds quotes
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
