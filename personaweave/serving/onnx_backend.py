"""ONNX Runtime as the service's decoder (`personaweave serve --backend onnx`).

`ContinuousBatcher` drives a model through one interface: `model(input_ids, attention_mask,
position_ids, past_key_values, ...)` returning `.logits` and a cache whose `.layers[i].keys/.values`
it selects, pads and concatenates between steps (the past it passes is a transformers `DynamicCache`,
empty or filled from the prefix cache, or the cache an earlier call returned). `OnnxDecoder` offers that interface on a graph
written by `personaweave export onnx` (Optimum's decoder-with-past layout: `past_key_values.{i}.key`
in, `present.{i}.key` out, persona tokens embedded inside the graph), so continuous batching, per-request
sampling and every check of the service stay as they are; only the forward pass moves to ONNX Runtime.

The graph holds the persona bank it was exported with: its personas are served, and dynamic personas
(blends, `auto`'s per-user states) are refused with a clear error, since their soft vectors are not in
the graph. `check_graph_matches` makes sure the graph and the served PyTorch model (used for the
tokenizer, validation and the persona names) agree on every persona's tokens and soft vectors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

DEFAULT_GRAPH = "model_quantized.onnx"  # `export onnx --quantize int8` (speed: benchmarks/RESULTS.md)


@dataclass
class KVLayer:
    keys: torch.Tensor  # (batch, kv heads, length, head dim)
    values: torch.Tensor


@dataclass
class KVCache:
    """What the batcher needs of a cache: `layers` with `keys` / `values` it may replace."""

    layers: list[KVLayer]


@dataclass
class DecoderOutput:
    logits: torch.Tensor
    past_key_values: KVCache


class OnnxDecoder:
    """A graph from `personaweave export onnx` behind the forward interface `ContinuousBatcher` uses."""

    def __init__(self, folder: str, file_name: Optional[str] = None, threads: Optional[int] = None) -> None:
        import onnxruntime as ort
        from transformers import GenerationConfig

        path = os.path.join(folder, file_name or _default_file(folder))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No ONNX graph at {path}; write one with `personaweave export onnx`.")
        options = ort.SessionOptions()
        # ONNX Runtime's workers spin between runs by default; in the server they would take the cores that
        # tokenization, memory search and the batcher's cache bookkeeping need between steps (a few percent
        # under load in single runs, within run-to-run spread: benchmarks/RESULTS.md, session 8)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"} - set(inputs)
        if missing:
            raise ValueError(f"{path} is not a decoder-with-past graph (no inputs {sorted(missing)}); export it "
                             "with `personaweave export onnx` (task text-generation-with-past).")
        self.num_layers = sum(name.endswith(".key") and name.startswith("past_key_values.") for name in inputs)
        shape = inputs["past_key_values.0.key"].shape  # [batch, kv heads, past length, head dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.dtype = np.float16 if "float16" in inputs["past_key_values.0.key"].type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.generation_config = GenerationConfig.from_pretrained(folder) if os.path.isfile(
            os.path.join(folder, "generation_config.json")) else GenerationConfig()
        self.device = torch.device("cpu")
        self.path = path

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 past_key_values: Any = None, logits_to_keep: int = 0, **_: Any) -> DecoderOutput:
        batch = input_ids.shape[0]
        # a KVCache of ours, or a transformers cache (empty for a prefill, filled for one from a kept prefix)
        layers = [layer for layer in getattr(past_key_values, "layers", None) or []
                  if getattr(layer, "keys", None) is not None]
        feeds = {"input_ids": input_ids.numpy().astype(np.int64),
                 "attention_mask": attention_mask.numpy().astype(np.int64),
                 "position_ids": position_ids.numpy().astype(np.int64)}
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = np.ascontiguousarray(layers[i].keys.numpy()) if layers else empty
            feeds[f"past_key_values.{i}.value"] = np.ascontiguousarray(layers[i].values.numpy()) if layers else empty
        outputs = dict(zip(self.output_names, self.session.run(None, feeds)))
        logits = torch.from_numpy(outputs["logits"])
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        presents = [(torch.from_numpy(outputs[f"present.{i}.key"]), torch.from_numpy(outputs[f"present.{i}.value"]))
                    for i in range(self.num_layers)]
        if layers:  # like a transformers cache, the one passed in grows in place (the batcher keeps it)
            for layer, (keys, values) in zip(layers, presents):
                layer.keys, layer.values = keys, values
            return DecoderOutput(logits=logits, past_key_values=past_key_values)
        return DecoderOutput(logits=logits, past_key_values=KVCache([KVLayer(k, v) for k, v in presents]))


def _default_file(folder: str) -> str:
    return DEFAULT_GRAPH if os.path.isfile(os.path.join(folder, DEFAULT_GRAPH)) else "model.onnx"


def graph_personas(folder: str) -> dict[str, list[int]]:
    """{persona name: token ids} of the bank an exported graph was written with (its config.json)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No config.json in {folder}: not a `personaweave export onnx` folder.")
    with open(path, encoding="utf-8") as handle:
        section = json.load(handle).get("personaweave")
    if not isinstance(section, dict) or not isinstance(section.get("personas"), list):
        raise ValueError(f"{path} has no persona bank (`personaweave` section): export the model with "
                         "`personaweave export onnx`.")
    return {p["name"]: [int(t) for t in p["token_ids"]] for p in section["personas"]}


def check_graph_matches(model: Any, folder: str) -> list[str]:
    """The served personas, after checking that the graph in `folder` holds each of the model's personas
    under the same token ids and, where the export recorded it, the same soft vectors (else the graph was
    exported from another model, bank or training run)."""
    in_graph = graph_personas(folder)
    served = dict(zip(model.config.persona_names, model.config.persona_token_ids))
    wrong = sorted(n for n, ids in served.items() if in_graph.get(n) != [int(t) for t in ids])
    if not wrong:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            recorded = json.load(handle)["personaweave"].get("soft_vector_fingerprint")
        if recorded is None:
            import warnings

            warnings.warn(f"The ONNX graph in {folder} records no soft-vector fingerprint (exported by an older "
                          "personaweave): only persona names and token ids were checked.", stacklevel=2)
        else:
            ours = model.soft_vector_fingerprint()
            wrong = sorted(n for n in served if n not in recorded or not np.allclose(
                recorded[n], ours[n], rtol=1e-3, atol=1e-3))
    if wrong:
        raise ValueError(f"The ONNX graph in {folder} was not exported from this model: personas {wrong} are "
                         f"missing or have other tokens or soft vectors there. Export it again with "
                         "`personaweave export onnx`.")
    return list(served)
