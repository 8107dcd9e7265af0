#!/usr/bin/env bash
# Export the trained master to ONNX fp32 + int8, compare persona accuracy, benchmark vs the stock export.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=${1:-outputs/sft_persona/final}
personaweave export onnx "$MODEL" --out outputs/onnx --quantize int8
personaweave eval --onnx outputs/onnx --num-prompts 25 --out outputs/eval_onnx.json
python benchmarks/onnx_export.py | tee outputs/onnx_benchmark.jsonl
# The trait model (teacher and distilled student) and the persona classifier, fp32 + int8.
personaweave export onnx outputs/traits/final --out outputs/traits_onnx --quantize int8
personaweave export onnx outputs/traits_student/final --out outputs/traits_student_onnx --quantize int8
personaweave export onnx outputs/persona_classifier --out outputs/persona_classifier_onnx --quantize int8
python benchmarks/traits.py | tee outputs/traits_benchmark.jsonl
