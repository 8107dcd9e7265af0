"""Deploy anywhere: every serving graph of the shipped personas, side by side, in one run.

Rows (each in its own process, so peak RSS is per row; ratios are to PyTorch fp32 PersonaWeave in this run):
- PyTorch fp32: the PersonaWeave model, and the baked plain `LlamaForCausalLM` (`personaweave bake`);
- ours: `personaweave export onnx` of the PersonaWeave folder: fp32, dynamic int8 (`int8`), weight-only
  MatMulNBits 8-bit and 4-bit (`w8`, `w4`: blocks of 32, head/embeddings/persona layer fp32);
- stock: Optimum's own export of the baked folder (no custom OnnxConfig), with the same three quantizers;
- llama.cpp (optional, `--llama_python`, a venv with llama-cpp-python): the shipped SmolLM2 GGUF (Q4_1)
  with the persona *described in the system prompt* (the peer a user would pick), and the baked folder
  converted to GGUF (`--baked_gguf`) with the persona tokens, same token ids as ours. NOT RUN YET: in the
  session that wrote it, llama-cpp-python did not finish building within its 15-minute limit on 2 shared cores.

Per row: persona accuracy with the evaluation judge (`EvaluationJudge.from_default_personas()`, the held-out
anchors) on the same replies to the same prompts (every default persona x `--num_prompts` held-out user turns
of the test split; greedy, repetition penalty 1.2, `--eval_tokens` new tokens, batches of 8), the share of
replies identical to the PyTorch fp32 ones, ms/token at batch 1 and 8, prefill ms, file size, peak RSS.

    python benchmarks/deploy.py --work outputs/deploy [--num_prompts 8] [--llama_python /tmp/llamavenv/bin/python \
        --baked_gguf outputs/deploy/baked-q8_0.gguf]

The exports are kept in `--work` and reused by later runs. JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import peak_rss_mb  # noqa: E402  (benchmarks/common.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prompts of similar length for the timings (batch 1 uses the first); replies for the judge use the test split.
TIMING_PROMPTS = ["What should I read this weekend?", "How do I start running?", "Tell me about the ocean.",
                  "Why is the sky blue?", "Can you recommend a hobby?", "What is your favourite food?",
                  "I can't sleep before exams.", "What do you think about smartphones?"]
EVAL_GENERATION = {"do_sample": False, "repetition_penalty": 1.2}


def prepare(work: str) -> dict[str, str]:
    """Export every graph into `work` (skipping what is already there); returns row -> model location."""
    from personaweave.export.bake import bake
    from personaweave.export.onnx import export_onnx, quantize_onnx_int8, quantize_onnx_nbits
    from personaweave.files import save_folder_atomically
    from personaweave.loading import load_model

    def step(name: str, done: str, fn) -> None:
        if os.path.exists(done):
            return
        start = time.perf_counter()
        fn()
        print(json.dumps({"name": f"prepare_{name}", "seconds": round(time.perf_counter() - start, 1)}), flush=True)

    path = {k: os.path.join(work, k) for k in ("torch", "ours", "baked", "stock")}

    def save_torch() -> None:
        model, tok, _ = load_model(with_adapters=False)
        save_folder_atomically(model, tok, path["torch"])

    step("personaweave_folder", os.path.join(path["torch"], "config.json"), save_torch)
    step("bake", os.path.join(path["baked"], "persona_tokens.json"), lambda: bake(None, path["baked"]))
    for graphs, source in (("ours", path["torch"]), ("stock", path["baked"])):
        folder = path[graphs]
        step(f"{graphs}_onnx_fp32", os.path.join(folder, "model.onnx"), lambda s=source, f=folder: export_onnx(s, f))
        step(f"{graphs}_int8", os.path.join(folder, "model_quantized.onnx"), lambda f=folder: quantize_onnx_int8(f))
        for bits in (8, 4):
            step(f"{graphs}_w{bits}", os.path.join(folder, f"model_w{bits}.onnx"),
                 lambda f=folder, b=bits: quantize_onnx_nbits(f, bits=b))
        # experiments beside the four: the output head in 8-bit as well (it is 1/5 of the weights), and
        # 8-bit weights with int8 compute (accuracy_level 4: ORT's fast 8-bit kernel quantizes activations per block)
        step(f"{graphs}_w4h8", os.path.join(folder, "model_w4h8.onnx"),
             lambda f=folder: quantize_onnx_nbits(f, bits=4, head_bits=8))
        step(f"{graphs}_w8a4", os.path.join(folder, "model_w8a4.onnx"),
             lambda f=folder: quantize_onnx_nbits(f, bits=8, accuracy_level=4, suffix="w8a4"))
    rows = {"pytorch_fp32_personaweave": path["torch"], "pytorch_fp32_baked": path["baked"]}
    for graphs in ("ours", "stock"):
        for label, file_name in (("fp32", "model.onnx"), ("int8_dynamic", "model_quantized.onnx"),
                                 ("w8", "model_w8.onnx"), ("w4", "model_w4.onnx"),
                                 ("w4_head_w8", "model_w4h8.onnx"), ("w8_int8_compute", "model_w8a4.onnx")):
            rows[f"onnx_{label}_{graphs}"] = os.path.join(path[graphs], file_name)
    return rows


def eval_conversations(num_prompts: int) -> tuple[list[str], list[str], list[list[dict[str, str]]]]:
    """(personas, prompts, chat messages): every default persona x the first held-out test-split user turns."""
    from personaweave.chat import chat
    from personaweave.data import load_persona_dialogues
    from personaweave.zoo import load_default_personas

    prompts = sorted(set(load_persona_dialogues("test")["prompt"]))[:num_prompts]
    names = [p.name for p in load_default_personas()]
    pairs = [(n, q) for n in names for q in prompts]
    return [n for n, _ in pairs], [q for _, q in pairs], [chat(n, q, num_persona_tokens=4) for n, q in pairs]


def measure(row: str, location: str, args: argparse.Namespace) -> dict:
    """In a fresh process: load one row's model; time prefill and decoding at batch 1 and 8; generate the replies."""
    import torch
    from transformers import AutoTokenizer

    import personaweave.models  # noqa: F401  (registers the Auto classes for the PersonaWeave folder)
    from personaweave.chat import chat

    torch.set_num_threads(args.threads)
    if location.endswith(".onnx"):
        import onnxruntime
        from optimum.onnxruntime import ORTModelForCausalLM

        folder, file_name = os.path.split(location)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        model = ORTModelForCausalLM.from_pretrained(folder, file_name=file_name, session_options=options)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                   if f == file_name or f.startswith(file_name + "_data") or f == file_name + ".data")
    else:
        from transformers import AutoModelForCausalLM

        folder = location
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    result = {"name": "deploy_benchmark", "row": row, "file_mb": round(size / 2**20, 1)}
    for batch in (1, 8):
        texts = [tok.apply_chat_template(chat("pirate", p, num_persona_tokens=4), add_generation_prompt=True,
                                         tokenize=False) for p in TIMING_PROMPTS[:batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "do_sample": False,
                  "pad_token_id": tok.pad_token_id}
        with torch.no_grad():
            model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2)  # warm-up
            prefill, total = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1)
                prefill.append(time.perf_counter() - start)
                start = time.perf_counter()
                model.generate(**kwargs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
                total.append(time.perf_counter() - start)
        p, t = statistics.median(prefill), statistics.median(total)
        result[f"prefill_ms_b{batch}"] = round(1000 * p, 1)
        result[f"ms_per_token_b{batch}"] = round(1000 * (t - p) / (args.new_tokens - 1), 1)
    personas, prompts, conversations = eval_conversations(args.num_prompts)
    replies = []
    start = time.perf_counter()
    for i in range(0, len(conversations), 8):
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations[i:i + 8]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.eval_tokens, pad_token_id=tok.pad_token_id,
                                 **EVAL_GENERATION)
        replies += [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    result["replies"] = replies
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# --- llama.cpp (runs under --llama_python: only llama_cpp and the standard library) ----------------------


def measure_llama(spec: dict) -> dict:
    """llama.cpp through llama-cpp-python: batch-1 prefill and ms/token on the first timing prompt, then greedy
    replies for the judge. Prompts arrive as token ids made by the HF tokenizer (the same ids as ours)."""
    from llama_cpp import Llama

    llm = Llama(model_path=spec["gguf"], n_ctx=1024, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                n_batch=512, verbose=False, logits_all=False)
    bias = {int(i): -100.0 for i in spec.get("suppress", [])}
    ids = spec["timing_ids"]

    def run(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for count, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if count == n:
                break
        return time.perf_counter() - start

    run(2)  # warm-up
    prefill = statistics.median(run(1) for _ in range(spec["repeats"]))
    total = statistics.median(run(spec["new_tokens"]) for _ in range(spec["repeats"]))
    replies = []
    start = time.perf_counter()
    for prompt in spec["eval_ids"]:
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=spec["eval_tokens"], temperature=0.0, top_k=1,
                                    repeat_penalty=1.2, logit_bias=bias or None)
        replies.append(out["choices"][0]["text"].strip())
    size = os.path.getsize(spec["gguf"])
    return {"name": "deploy_benchmark", "row": spec["row"], "file_mb": round(size / 2**20, 1),
            "prefill_ms_b1": round(1000 * prefill, 1),
            "ms_per_token_b1": round(1000 * (total - prefill) / (spec["new_tokens"] - 1), 1),
            "eval_seconds": round(time.perf_counter() - start, 1), "replies": replies, "peak_rss_mb": peak_rss_mb()}


def llama_specs(args: argparse.Namespace, work: str) -> list[dict]:
    """Token ids for the llama.cpp rows, built here with the HF tokenizers (the child has no transformers)."""
    from transformers import AutoTokenizer

    from personaweave.chat import chat, prompt_baseline_messages
    from personaweave.zoo import SMOLLM2_GGUF, load_default_personas, smollm2_folder, smollm2_path

    personas, prompts, conversations = eval_conversations(args.num_prompts)
    descriptions = {p.name: p.description for p in load_default_personas()}
    common = {"threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
              "eval_tokens": args.eval_tokens}

    def ids(tok, messages) -> list[int]:
        return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids

    base_tok = AutoTokenizer.from_pretrained(smollm2_folder()[0])
    specs = [{"row": "llama_cpp_q4_1_persona_in_system_prompt", "gguf": os.path.join(smollm2_path(), SMOLLM2_GGUF),
              "timing_ids": ids(base_tok, prompt_baseline_messages(descriptions["pirate"], TIMING_PROMPTS[0])),
              "eval_ids": [ids(base_tok, prompt_baseline_messages(descriptions[n], q)) for n, q in zip(personas, prompts)],
              **common}]
    if args.baked_gguf:
        baked = os.path.join(work, "baked")
        tok = AutoTokenizer.from_pretrained(baked)
        with open(os.path.join(baked, "persona_tokens.json"), encoding="utf-8") as handle:
            suppress = json.load(handle)["suppress_token_ids"]
        label = os.path.basename(args.baked_gguf).rsplit(".", 1)[0].replace("-", "_")
        specs.append({"row": f"llama_cpp_{label}_persona_tokens", "gguf": args.baked_gguf, "suppress": suppress,
                      "timing_ids": ids(tok, chat("pirate", TIMING_PROMPTS[0], num_persona_tokens=4)),
                      "eval_ids": [ids(tok, c) for c in conversations], **common})
    return specs


# --- the run ----------------------------------------------------------------------------------------


def run_child(command: list[str], stdin: str = "") -> dict:
    out = subprocess.run(command, input=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/deploy", help="exports are written (and reused) here")
    parser.add_argument("--num_prompts", type=int, default=8, help="held-out user turns per persona for the judge")
    parser.add_argument("--eval_tokens", type=int, default=40)
    parser.add_argument("--new_tokens", type=int, default=32, help="decoded tokens per timing run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", help="comma-separated subset of rows (PyTorch fp32 PersonaWeave always runs)")
    parser.add_argument("--fresh", action="store_true", help="measure again rows already kept in --work/rows/")
    parser.add_argument("--llama_python", help="python of a venv with llama-cpp-python (adds the llama.cpp rows)")
    parser.add_argument("--baked_gguf", help="the baked folder converted to GGUF (convert_hf_to_gguf.py)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--location", help=argparse.SUPPRESS)
    parser.add_argument("--llama_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_child:
        print(json.dumps(measure_llama(json.loads(sys.stdin.read()))), flush=True)
        return
    if args.row:
        print(json.dumps(measure(args.row, args.location, args)), flush=True)
        return

    from personaweave.evaluation.judges import EvaluationJudge

    start = time.perf_counter()
    work = os.path.abspath(args.work)
    rows = prepare(work)
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows.split(",") or k == "pytorch_fp32_personaweave"}
    personas, prompts, _ = eval_conversations(args.num_prompts)
    judge = EvaluationJudge.from_default_personas()
    flags = ["--num_prompts", str(args.num_prompts), "--eval_tokens", str(args.eval_tokens), "--new_tokens",
             str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    # Each row's measurement is kept in --work/rows/ (keyed by the settings), so an interrupted run resumes.
    cache = os.path.join(work, "rows", "-".join(flags[1::2]))
    os.makedirs(cache, exist_ok=True)

    def cached(row: str, command: list[str], stdin: str = "") -> dict:
        path = os.path.join(cache, f"{row}.json")
        if os.path.isfile(path) and not args.fresh:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        record = run_child(command, stdin)
        record["load_average_after"] = round(os.getloadavg()[0], 1)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        return record

    results = {}
    for row, location in rows.items():
        results[row] = cached(row, [sys.executable, __file__, "--row", row, "--location", location, *flags])
    if args.llama_python:
        for spec in llama_specs(args, work):
            results[spec["row"]] = cached(spec["row"], [args.llama_python, __file__, "--llama_child"], json.dumps(spec))
    reference = results["pytorch_fp32_personaweave"]
    for record in results.values():
        summary = judge.judge(prompts, record["replies"], personas).summary()
        record["persona_accuracy"] = round(summary["persona_accuracy"], 3)
        record["relevance"] = round(summary["relevance"], 3)
        record["replies_judged"] = len(record["replies"])
        record["same_replies_as_pytorch"] = round(
            sum(a == b for a, b in zip(record["replies"], reference["replies"])) / len(reference["replies"]), 3)
        for batch in (1, 8):
            if f"ms_per_token_b{batch}" in record:
                record[f"speedup_vs_pytorch_b{batch}"] = round(
                    reference[f"ms_per_token_b{batch}"] / record[f"ms_per_token_b{batch}"], 2)
        record["tokens_per_s_b1"] = round(1000 / record["ms_per_token_b1"], 1)
        if args.threads:
            record["threads"] = args.threads
        print(json.dumps({k: v for k, v in record.items() if k != "replies"}), flush=True)
    with open(os.path.join(work, "replies.json"), "w", encoding="utf-8") as handle:
        json.dump({"personas": personas, "prompts": prompts,
                   "replies": {row: r["replies"] for row, r in results.items()}}, handle, indent=1)
    print(json.dumps({"name": "deploy_benchmark_seconds", "seconds": round(time.perf_counter() - start, 1),
                      "load_average": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
