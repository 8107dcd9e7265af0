"""Which dynamic-int8 recipe keeps the personas? Quantization variants of the exported master, in one run.

Variants (all dynamic int8 with Optimum's ORTQuantizer, beside the fp32 graph):
- `default`: every op type ORT's dynamic quantizer handles (MatMul and Gather included), per-channel;
- `matmul_only`: MatMul only (the token-embedding Gather stays fp32), with the persona layer (its
  Gemms would otherwise become int8 MatMuls: a few thousand weights that define every persona)
  and the rotary embedding's MatMul (positions x frequencies, not weights) kept in fp32.
For fp32 and each variant: persona accuracy (the evaluation harness, same prompts and seeds),
file size, prefill and per-token latency at batch 1 and 8 (each in a fresh process), and the
speed ratio to PyTorch fp32 measured in the same run.

    python benchmarks/onnx_int8_variants.py --onnx outputs/onnx --model outputs/sft_persona/final
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {"default": {}, "matmul_only": {"operators_to_quantize": ["MatMul"], "keep_fp32": ("rotary_emb", "persona_embedding")}}


def quantize(onnx_dir: str, name: str) -> str:
    from personaweave.export.onnx import quantize_onnx_int8

    return quantize_onnx_int8(onnx_dir, suffix=f"quantized_{name}", **VARIANTS[name])


def timing(variant: str, location: str) -> dict:
    script = os.path.join(os.path.dirname(__file__), "onnx_export.py")
    out = subprocess.run([sys.executable, script, "--variant", variant, "--location", location],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from personaweave.evaluation.harness import evaluate_onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", default="outputs/onnx")
    parser.add_argument("--model", default="outputs/sft_persona/final")
    parser.add_argument("--classifier", default="outputs/persona_classifier")
    parser.add_argument("--num_prompts", type=int, default=25)
    args = parser.parse_args()
    files = {"fp32": "model.onnx"}
    for name in VARIANTS:
        files[f"int8_{name}"] = os.path.basename(quantize(args.onnx, name))
    torch_fp32 = timing("pytorch_fp32_personaweave", args.model)
    print(json.dumps(torch_fp32), flush=True)
    for variant, file_name in files.items():
        record = timing(f"onnx_{variant}_personaweave", os.path.join(args.onnx, file_name))
        record["persona_accuracy"] = evaluate_onnx(args.onnx, args.classifier, file_name=file_name,
                                                   num_prompts=args.num_prompts)["persona_accuracy"]
        record["speedup_b1_vs_torch_fp32"] = round(torch_fp32["ms_per_token_b1"] / record["ms_per_token_b1"], 2)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
