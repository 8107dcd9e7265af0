"""Forward-pass speed of exported decoder graphs, as the ONNX serving backend calls them.

For each graph: one decode step (one new token per row) at batch sizes x past lengths, and a prompt's
forward pass (prefill) at a few shapes, through `personaweave.serving.onnx_backend.OnnxDecoder` (the
same feeds the service builds). The first graph is the baseline: later ones get ratios (same process,
same machine, graphs taken in turn). One JSON line per measurement, then the ratios.

    python benchmarks/onnx_decoder.py --graph new=outputs/deploy/ours/model_quantized.onnx \
        --graph old=/tmp/old-export/model_quantized.onnx [--repeats 6]

A graph is `NAME=PATH` (a file inside an `export onnx` folder). Its folder must hold the export's
config.json and generation_config.json, as `personaweave export onnx` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from personaweave.serving.onnx_backend import KVCache, KVLayer, OnnxDecoder

DECODE = [(1, 200), (8, 32), (8, 200), (8, 400), (16, 32), (16, 200), (16, 400)]  # (batch, past tokens)
PREFILL = [(1, 128), (8, 80), (1, 300)]  # (batch, prompt tokens)


def decode_ms(decoder: OnnxDecoder, batch: int, past: int, repeats: int) -> float:
    shape = (batch, decoder.kv_heads, past, decoder.head_dim)
    layers = [(torch.randn(shape), torch.randn(shape)) for _ in range(decoder.num_layers)]
    ids, positions = torch.full((batch, 1), 100), torch.full((batch, 1), past)
    mask = torch.ones(batch, past + 1, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):  # the first call warms the session up
        cache = KVCache([KVLayer(k, v) for k, v in layers])
        start = time.perf_counter()
        decoder(ids, mask, positions, cache)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[1:]))


def prefill_ms(decoder: OnnxDecoder, batch: int, length: int, repeats: int) -> float:
    ids, mask = torch.full((batch, length), 100), torch.ones(batch, length, dtype=torch.long)
    positions = torch.arange(length)[None].repeat(batch, 1)
    times = []
    for _ in range(max(2, repeats // 2)):
        start = time.perf_counter()
        decoder(ids, mask, positions, None, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: one per core)")
    args = parser.parse_args()
    graphs = [g.split("=", 1) for g in args.graph]
    if any(len(g) != 2 or not os.path.isfile(g[1]) for g in graphs):
        parser.error(f"each --graph is NAME=PATH to an existing .onnx file: {args.graph}")
    results: dict[str, dict[str, float]] = {}
    for name, path in graphs:
        decoder = OnnxDecoder(os.path.dirname(path), os.path.basename(path), threads=args.threads)
        results[name] = {}
        for batch, past in DECODE:
            ms = decode_ms(decoder, batch, past, args.repeats)
            results[name][f"decode b{batch} p{past}"] = ms
            print(json.dumps({"name": "onnx_decode_step", "graph": name, "batch": batch, "past": past,
                              "ms": round(ms, 1), "tokens_per_s": round(1000 * batch / ms, 1)}), flush=True)
        for batch, length in PREFILL:
            ms = prefill_ms(decoder, batch, length, args.repeats)
            results[name][f"prefill b{batch} l{length}"] = ms
            print(json.dumps({"name": "onnx_prefill", "graph": name, "batch": batch, "tokens": length,
                              "ms": round(ms, 1), "tokens_per_s": round(1000 * batch * length / ms, 1)}), flush=True)
        del decoder
    base = graphs[0][0]
    for name, _ in graphs[1:]:
        for key, ms in results[name].items():
            print(json.dumps({"name": "onnx_decoder_speedup", "graph": name, "versus": base, "case": key,
                              "speedup": round(results[base][key] / ms, 2)}))


if __name__ == "__main__":
    main()
