"""ONNX export speed, size and memory: PersonaWeave vs Optimum's stock export of the bare base.

One run exports (to a temp folder) the PersonaWeave model (the shipped trained checkpoint when
present, else the untrained default build) to ONNX fp32 and int8, and the bare SmolLM2 with
Optimum's stock `main_export` + the same quantizer, then times every variant in its own
subprocess (so peak RSS is per variant). JSON lines; ratios are to PyTorch fp32 PersonaWeave.

    python benchmarks/onnx_export.py [--new_tokens 32] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import peak_rss_mb  # noqa: E402  (benchmarks/common.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["What should I read this weekend?", "How do I start running?", "Tell me about the ocean.",
           "Why is the sky blue?", "Can you recommend a hobby?", "What is your favourite food?",
           "I can't sleep before exams.", "What do you think about smartphones?"]


def prepare(folder: str) -> dict[str, str]:
    """Export everything into `folder`; returns variant -> model location."""
    from optimum.exporters.onnx import main_export

    from personaweave import from_base
    from personaweave.export.onnx import export_onnx, quantize_onnx_int8
    from personaweave.files import save_folder_atomically
    from personaweave.loading import has_shipped_checkpoint, load_pretrained_personas
    from personaweave.zoo import smollm2_folder

    if has_shipped_checkpoint():
        model, tok, _ = load_pretrained_personas(with_adapters=False)
    else:
        model, tok = from_base(personas="default")
    torch_dir = os.path.join(folder, "torch")
    save_folder_atomically(model, tok, torch_dir)
    start = time.perf_counter()
    export_onnx(torch_dir, os.path.join(folder, "ours"), quantize="int8")
    print(json.dumps({"name": "export_personaweave_seconds", "seconds": round(time.perf_counter() - start, 1)}))
    base_dir, _ = smollm2_folder()
    start = time.perf_counter()
    main_export(base_dir, os.path.join(folder, "stock"), task="text-generation-with-past")
    quantize_onnx_int8(os.path.join(folder, "stock"))
    print(json.dumps({"name": "export_stock_seconds", "seconds": round(time.perf_counter() - start, 1)}))
    return {
        "torch_fp32_personaweave": torch_dir,
        "onnx_fp32_personaweave": os.path.join(folder, "ours", "model.onnx"),
        "onnx_int8_personaweave": os.path.join(folder, "ours", "model_quantized.onnx"),
        "torch_fp32_base": base_dir,
        "onnx_fp32_stock": os.path.join(folder, "stock", "model.onnx"),
        "onnx_int8_stock": os.path.join(folder, "stock", "model_quantized.onnx"),
    }


def measure(variant: str, location: str, new_tokens: int, repeats: int) -> dict:
    """Run in a fresh process: load one variant, time prefill and decoding at batch 1 and 8."""
    import torch
    from transformers import AutoTokenizer

    import personaweave.models  # noqa: F401  (registers the Auto classes)

    if location.endswith(".onnx"):
        from optimum.onnxruntime import ORTModelForCausalLM

        folder, file_name = os.path.split(location)
        model = ORTModelForCausalLM.from_pretrained(folder, file_name=file_name)
        size = os.path.getsize(location) + sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                                               if f.startswith(file_name) and f != file_name)
    else:
        from transformers import AutoModelForCausalLM

        folder = location
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    persona = "pirate" if "personaweave" in variant else None
    result = {"name": "onnx_benchmark", "variant": variant, "file_mb": round(size / 2**20, 1)}
    for batch in (1, 8):
        chats = [personaweave.chat(persona, p) if persona else [{"role": "user", "content": p}]
                 for p in PROMPTS[:batch]]
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "do_sample": False,
                  "pad_token_id": tok.pad_token_id}
        with torch.no_grad():
            model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2)  # warm-up
            prefill, total = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1)
                prefill.append(time.perf_counter() - start)
                start = time.perf_counter()
                model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
                total.append(time.perf_counter() - start)
        p, t = statistics.median(prefill), statistics.median(total)
        result[f"prefill_ms_b{batch}"] = round(1000 * p, 1)
        result[f"ms_per_token_b{batch}"] = round(1000 * (t - p) / (new_tokens - 1), 1)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", help="export into this folder and keep it")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--location", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.location, args.new_tokens, args.repeats)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        variants = prepare(args.keep or tmp)
        results = {}
        for variant, location in variants.items():
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--location", location,
                                  "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        reference = results["torch_fp32_personaweave"]
        for record in results.values():
            for batch in (1, 8):
                record[f"speedup_vs_torch_b{batch}"] = round(
                    reference[f"ms_per_token_b{batch}"] / record[f"ms_per_token_b{batch}"], 2)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
