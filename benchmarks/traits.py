"""Trait model deployment figures: teacher vs distilled student vs int8 student, in PyTorch and
as ONNX graphs run by the torch-free `personaweave.traits.onnx_runtime` predictor, in one run.

Size on disk, peak resident memory (each variant in its own process), latency per prediction at
batch 1 and 32, and quality (share of traits within 0.1, MAE) on the test split. ONNX variants
run in a process that never imports torch (checked), with onnxruntime's default threading.

    personaweave export onnx outputs/traits/final --out outputs/traits_onnx --quantize int8
    personaweave export onnx outputs/traits_student/final --out outputs/traits_student_onnx --quantize int8
    python benchmarks/traits.py --teacher outputs/traits/final --student outputs/traits_student/final \
        --teacher_onnx outputs/traits_onnx --student_onnx outputs/traits_student_onnx
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

import numpy as np
from common import peak_rss_mb  # noqa: E402  (benchmarks/common.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def test_split() -> tuple[list[str], np.ndarray]:
    """The persona dialogues' test replies and trait labels, read with pyarrow (no torch)."""
    import pyarrow.parquet as pq

    here = os.path.join(os.path.dirname(__file__), "..", "personaweave", "data", "persona_dialogues", "test.parquet")
    table = pq.read_table(here, columns=["response", "traits"]).to_pydict()
    return table["response"], np.asarray(table["traits"], dtype=float)


def timings(run, texts: list[str]) -> dict:
    out = {}
    for batch in (1, 32):
        chunk = texts[:batch]
        run(chunk)
        times = []
        for _ in range(10 if batch == 1 else 5):
            start = time.perf_counter()
            run(chunk)
            times.append(time.perf_counter() - start)
        out[f"ms_per_prediction_b{batch}"] = round(1000 * statistics.median(times) / batch, 2)
    return out


def measure_onnx(variant: str, path: str) -> dict:
    import importlib.util

    # the module file by path: the package's __init__ imports torch, lite.py itself does not
    spec = importlib.util.spec_from_file_location(
        "lite", os.path.join(os.path.dirname(__file__), "..", "personaweave", "lite.py"))
    lite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lite)
    file_name = "model_quantized.onnx" if variant.endswith("int8") else "model.onnx"
    model = lite.OnnxTraitModel.from_pretrained(path, file_name=file_name)
    texts, refs = test_split()
    preds = np.concatenate([model(texts[i:i + 64])[0] for i in range(0, len(texts), 64)])
    err = np.abs(preds - refs)
    out = {"name": "trait_model", "variant": variant, "size_mb": round(os.path.getsize(os.path.join(path, file_name))
                                                                       / 2**20, 1),
           "within_0.1": round(float((err <= 0.1 + 1e-6).mean()), 4), "mae": round(float(err.mean()), 4),
           **timings(lambda batch: model(batch), texts), "peak_rss_mb": peak_rss_mb(),
           "torch_imported": "torch" in sys.modules}
    return out


def measure(variant: str, path: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    from personaweave import PersonaTraitModel
    from personaweave.data import load_persona_dialogues
    from personaweave.evaluation.metrics import load_trait_metrics
    from personaweave.training.distillation import quantize_torch_dynamic_int8

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = PersonaTraitModel.from_pretrained(path).eval()
    size = folder_mb(path)
    if variant.endswith("int8"):
        model = quantize_torch_dynamic_int8(model)
        with tempfile.NamedTemporaryFile(suffix=".pt") as handle:
            torch.save(model.state_dict(), handle.name)  # our own file, only to measure the size
            size = os.path.getsize(handle.name) / 2**20
    tok = AutoTokenizer.from_pretrained(path)
    test = load_persona_dialogues("test")
    texts, refs = list(test["response"]), list(test["traits"])

    def run(batch):
        enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).traits

    preds = torch.cat([run(texts[i:i + 64]) for i in range(0, len(texts), 64)]).tolist()
    quality = load_trait_metrics().compute(predictions=preds, references=refs)
    out = {"name": "trait_model", "variant": variant, "size_mb": round(size, 1),
           "within_0.1": round(quality["within_tolerance"], 4), "mae": round(quality["mae"], 4),
           **timings(run, texts), "peak_rss_mb": peak_rss_mb()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="outputs/traits/final")
    parser.add_argument("--student", default="outputs/traits_student/final")
    parser.add_argument("--teacher_onnx", default="outputs/traits_onnx")
    parser.add_argument("--student_onnx", default="outputs/traits_student_onnx")
    parser.add_argument("--variant")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps((measure_onnx if "onnx" in args.variant else measure)(args.variant, args.path)))
        return
    results = {}
    variants = [("teacher", args.teacher), ("student", args.student), ("student_int8", args.student)]
    for folder, prefix in ((args.teacher_onnx, "teacher_onnx"), (args.student_onnx, "student_onnx")):
        if os.path.isfile(os.path.join(folder, "model.onnx")):
            variants += [(prefix, folder), (f"{prefix}_int8", folder)]
    for variant, path in variants:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--path", path],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    for record in results.values():
        record["speedup_b1_vs_teacher"] = round(results["teacher"]["ms_per_prediction_b1"]
                                                / record["ms_per_prediction_b1"], 2)
        print(json.dumps(record))


if __name__ == "__main__":
    main()
