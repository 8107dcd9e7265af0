"""ONNX export with Optimum; dynamic int8 and weight-only (MatMulNBits) quantization with onnxruntime.

Optimum knows no `personaweave` model type, so we pass it an `OnnxConfig` (Llama-style decoder
inputs and past key values, dimensions read from the nested `text_config`). The persona vectors
and layer are baked into the graph as weights: its inputs are the ordinary LM inputs, and the
reserved persona tokens select personas exactly as in PyTorch.

The exported folder's `config.json` is the wrapped LM's own config (e.g. `llama`) with the
persona bank under a `personaweave` key, so `ORTModelForCausalLM.from_pretrained(folder)` loads
it without personaweave installed. Optimum infers the exporting library from the model class's
module, so the model is loaded through its saved remote code (`transformers_modules...`).

Two choices make the decoder graph fast to serve (figures: benchmarks/RESULTS.md, session 8):
- Attention is traced from `grouped_query_attention`, not SDPA: each key/value head attends for its
  group of query heads at once and the scale is applied to the queries, so the graph never copies the
  cache per query head, nor transposes and scales it at every step (ONNX Runtime runs Q.K^T as one
  FusedMatMul over the cache as it is).
- The graph returns the next token's logits only (`logits` of shape (batch, 1, vocab), as `generate`
  and the serving backend use them): a prompt's forward pass skips the output head and the persona-token
  mask on every other position. `all_logits=True` (`--all-logits`) keeps one row per position.
Dynamic int8 quantizes the weight MatMuls only: attention's activation x activation products stay in
float32 (quantizing them re-quantizes the whole cache at each step and costs accuracy).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

from personaweave.loading import read_model_config

SUPPORTED_TASKS = ("text-generation-with-past", "text-generation")
# The persona classifier is an ordinary encoder: Optimum exports it as it is. The trait model
# (model_type personaweave_traits) goes through feature-extraction with its own OnnxConfig.
ENCODER_TASKS = ("text-classification", "feature-extraction")
ONNX_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
# --quantize choices: dynamic int8 (MatMulInteger, activations quantized at run time), or weight-only
# MatMulNBits (8 or 4-bit weights in blocks of 32, dequantized inside the kernel) beside the fp32 graph.
QUANTIZE_FILES = {"int8": INT8_FILE, "w8": "model_w8.onnx", "w4": "model_w4.onnx"}
# Never quantized by the weight-only path: the output head (tied to the embeddings in SmolLM2) and the
# persona layer (a few thousand weights that define every persona). Embedding Gathers are not MatMuls.
NBITS_KEEP = ("lm_head", "persona_embedding")
# The attention implementation the decoder graph is traced from (registered with transformers' AttentionInterface).
EXPORT_ATTENTION = "personaweave_grouped_query"


def grouped_query_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                            scaling: Optional[float] = None, dropout: float = 0.0, **_: Any) -> tuple[Any, None]:
    """Attention with the query heads folded onto their key/value head: query (B, H, q, D) is read as
    (B, KV, H/KV * q, D), so keys and values (B, KV, k, D) are used as they are (no `repeat_kv`).
    `attention_mask` is SDPA's (boolean, True = attend) or an additive float mask. Returns
    (B, q, H, D), as transformers' attention functions do."""
    import torch

    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    scores = torch.matmul((query * scale).reshape(batch, kv_heads, group * q_len, dim), key.transpose(2, 3))
    scores = scores.view(batch, kv_heads, group, q_len, kv_len)
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, :kv_len]  # (B, 1, 1, q, k): the same for every head
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * q_len, kv_len)
    out = torch.matmul(probs, value).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def _next_token_logits_only(model: Any) -> None:
    """Trace `model` with `logits_to_keep=1`. Optimum passes `logits_to_keep=0` to any forward that names
    the argument, so the forward it sees here does not name it."""
    forward = model.forward

    def next_token_forward(input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                           past_key_values: Any = None, use_cache: Optional[bool] = None, **kwargs: Any) -> Any:
        kwargs.pop("logits_to_keep", None)
        return forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, use_cache=use_cache, logits_to_keep=1, **kwargs)

    model.forward = next_token_forward


def _register_export_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    def sdpa_mask(*args: Any, **kwargs: Any) -> Any:
        # looked up at call time: Optimum's exporter swaps in a traceable SDPA mask while it exports
        return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)

    AttentionInterface.register(EXPORT_ATTENTION, grouped_query_attention)
    AttentionMaskInterface.register(EXPORT_ATTENTION, sdpa_mask)


def _onnx_config_class():
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
    from optimum.utils.normalized_config import NormalizedTextConfigWithGQA

    class PersonaWeaveNormalizedConfig(NormalizedTextConfigWithGQA):
        """Reads layer counts, heads and vocabulary from the nested text_config."""

        def __init__(self, config: Any, **kwargs: Any) -> None:
            super().__init__(getattr(config, "text_config", config), **kwargs)

    class PersonaWeaveOnnxConfig(LlamaOnnxConfig):
        NORMALIZED_CONFIG_CLASS = PersonaWeaveNormalizedConfig

    return PersonaWeaveOnnxConfig


def _trait_onnx_config_class():
    from optimum.exporters.onnx.model_configs import BertOnnxConfig
    from optimum.utils.normalized_config import NormalizedTextConfig

    class TraitNormalizedConfig(NormalizedTextConfig):
        """Reads vocabulary and sizes from the nested encoder_config."""

        def __init__(self, config: Any, **kwargs: Any) -> None:
            super().__init__(getattr(config, "encoder_config", config), **kwargs)

    class PersonaTraitOnnxConfig(BertOnnxConfig):
        """Encoder inputs; the two heads' outputs (the graph includes pooling and sigmoids)."""

        NORMALIZED_CONFIG_CLASS = TraitNormalizedConfig

        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return {"input_ids": {0: "batch_size", 1: "sequence_length"},
                    "attention_mask": {0: "batch_size", 1: "sequence_length"}}

        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            return {"traits": {0: "batch_size"}, "engagement": {0: "batch_size"}}

    return PersonaTraitOnnxConfig


def _model_type(model_dir: str) -> Optional[str]:
    return read_model_config(model_dir, model_types=()).get("model_type")


def _export_trait_model(model_dir: str, out: str, opset: Optional[int]) -> None:
    """Re-save with remote code (Optimum infers the library from the class's module), reload in eager
    attention (SDPA's all-ones-mask shortcut would be traced as a constant and break padded batches),
    then export."""
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModel, AutoTokenizer

    from personaweave.models.modeling_traits import PersonaTraitModel

    with tempfile.TemporaryDirectory() as src:
        PersonaTraitModel.from_pretrained(model_dir).save_pretrained(src)
        model = AutoModel.from_pretrained(src, trust_remote_code=True, attn_implementation="eager").eval()
        onnx_config = _trait_onnx_config_class()(model.config, task="feature-extraction")
        onnx_export_from_model(model, out, task="feature-extraction", library_name="transformers",
                               custom_onnx_configs={"model": onnx_config}, opset=opset, no_post_process=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def check_model_folder(model_dir: str) -> dict[str, Any]:
    """The folder's config, or a clear ValueError when it is not an exportable PersonaWeave model."""
    config = read_model_config(model_dir)
    if not config.get("personas"):
        raise ValueError(f"{model_dir} has no persona bank: add personas before exporting.")
    if config.get("is_encoder_decoder"):
        raise ValueError("ONNX export supports PersonaWeaveForCausalLM only (not the encoder-decoder variant).")
    return config


def cpu_quantization_config(per_channel: bool = True, **options: Any):
    """Dynamic int8 config for this CPU: arm64, avx512_vnni, avx512 or avx2. `options` go to
    `AutoQuantizationConfig` (e.g. operators_to_quantize, nodes_to_exclude)."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if platform.machine().lower() in {"aarch64", "arm64"}:
        return AutoQuantizationConfig.arm64(is_static=False, per_channel=per_channel, **options)
    flags = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    if "avx512_vnni" in flags:
        return AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=per_channel, **options)
    if "avx512f" in flags:
        return AutoQuantizationConfig.avx512(is_static=False, per_channel=per_channel, **options)
    return AutoQuantizationConfig.avx2(is_static=False, per_channel=per_channel, **options)


def is_baked_folder(model_dir: str) -> bool:
    """A folder written by `personaweave bake`: a plain causal LM (no remote code) with persona tokens."""
    from personaweave.export.bake import PERSONA_TOKENS_FILE

    return os.path.isfile(os.path.join(model_dir, PERSONA_TOKENS_FILE))


def default_task(model_dir: str) -> str:
    """The export task a folder implies: LM (PersonaWeave or baked), trait model, or sequence classifier."""
    model_type = _model_type(model_dir)
    if model_type == "personaweave_traits":
        return "feature-extraction"
    if model_type == "personaweave" or is_baked_folder(model_dir):
        return "text-generation-with-past"
    architectures = read_model_config(model_dir, model_types=()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    raise ValueError(f"{model_dir} holds a {model_type!r} model, not a PersonaWeave model, trait model or "
                     f"sequence classifier; pass task= (one of {list(SUPPORTED_TASKS + ENCODER_TASKS)}).")


def export_onnx(model_dir: str, output_dir: str, task: Optional[str] = None,
                quantize: Optional[str] = None, per_channel: bool = True, opset: Optional[int] = None,
                all_logits: bool = False) -> str:
    """Export a saved PersonaWeave folder to ONNX (and a quantized graph beside it); returns `output_dir`.

    A folder written by `personaweave bake` is a plain base architecture: it goes through Optimum's stock
    export, no custom OnnxConfig. `quantize` is one of `QUANTIZE_FILES` (int8: dynamic; w8/w4: weight-only).
    The export is written to a temp folder and moved into place only when complete.
    """
    from optimum.exporters.onnx import main_export, onnx_export_from_model

    task = task or default_task(model_dir)
    if task not in SUPPORTED_TASKS + ENCODER_TASKS:
        raise ValueError(f"Unsupported task {task!r}; supported: {list(SUPPORTED_TASKS + ENCODER_TASKS)}.")
    if quantize not in (None, *QUANTIZE_FILES):
        raise ValueError(f"Unsupported quantization {quantize!r}; supported: {list(QUANTIZE_FILES)}.")
    encoder = task in ENCODER_TASKS
    traits = encoder and _model_type(model_dir) == "personaweave_traits"
    if traits and task != "feature-extraction":
        raise ValueError("A trait model exports with task 'feature-extraction' (traits + engagement outputs).")
    baked = not encoder and is_baked_folder(model_dir)
    config = None if encoder or baked else check_model_folder(model_dir)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".onnx-export-")
    try:
        if traits:
            _export_trait_model(model_dir, tmp, opset)
        elif encoder:
            main_export(model_dir, tmp, task=task, opset=opset)
        elif baked:
            from personaweave.export.bake import PERSONA_TOKENS_FILE

            main_export(model_dir, tmp, task=task, opset=opset)  # stock Optimum: a plain architecture
            shutil.copy(os.path.join(model_dir, PERSONA_TOKENS_FILE), tmp)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            with tempfile.TemporaryDirectory() as src:
                # Optimum needs remote code, but never the folder's own *.py (code the user did not opt
                # into): load with the installed classes and re-save, which writes our sources.
                fingerprint = _resave_with_installed_code(model_dir, src)
                model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
                _register_export_attention()
                model.language_model.config._attn_implementation = EXPORT_ATTENTION
                onnx_config = _onnx_config_class()(
                    model.config, task="text-generation",
                    use_past=task.endswith("with-past"), use_past_in_inputs=task.endswith("with-past"))
                if not all_logits:
                    _next_token_logits_only(model)
                onnx_export_from_model(model, tmp, task=task, custom_onnx_configs={"model": onnx_config},
                                       opset=opset)
                AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
            _write_plain_config(tmp, config, fingerprint, all_logits=all_logits)
        if quantize == "int8":
            quantize_onnx_int8(tmp, per_channel=per_channel)
        elif quantize in ("w8", "w4"):
            quantize_onnx_nbits(tmp, bits=int(quantize[1]))
        from personaweave.files import replace_folder

        replace_folder(tmp, os.path.abspath(output_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _resave_with_installed_code(model_dir: str, out: str) -> dict[str, list[float]]:
    """The model folder re-saved by the installed personaweave classes (weights, config, tokenizer and
    *our* remote-code files); nothing from `model_dir` is executed. Returns the soft vectors' fingerprint."""
    from transformers import AutoTokenizer

    from personaweave.models import PersonaWeaveForCausalLM

    model = PersonaWeaveForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False).save_pretrained(out)
    return model.soft_vector_fingerprint()


def _write_plain_config(folder: str, config: dict[str, Any],
                        fingerprint: Optional[dict[str, list[float]]] = None, all_logits: bool = True) -> None:
    """config.json = the wrapped LM's config (what ORTModelForCausalLM understands) + the bank (and its
    soft vectors' fingerprint, which the ONNX serving backend checks against the served model)."""
    text = dict(config["text_config"])
    text["architectures"] = [a.replace("PersonaWeave", "") for a in text.get("architectures") or []] or None
    text["personaweave"] = {k: config[k] for k in ("persona_dim", "num_persona_tokens", "personas")}
    if fingerprint is not None:
        text["personaweave"]["soft_vector_fingerprint"] = fingerprint
    text["personaweave"]["logits"] = "all positions" if all_logits else "last position"
    for stale in ("configuration_personaweave.py", "modeling_personaweave.py", "personas.py"):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(text, handle, indent=2)


def quantize_onnx_int8(onnx_dir: str, per_channel: bool = True, suffix: str = "quantized",
                  operators_to_quantize: Optional[Sequence[str]] = None, keep_fp32: Sequence[str] = ()) -> str:
    """Dynamic int8 with Optimum's ORTQuantizer, saved beside the fp32 graph as `model_<suffix>.onnx`.

    `operators_to_quantize` (default: every op type ORT's dynamic quantizer handles) and
    `keep_fp32` (substrings of node names left in fp32, e.g. "rotary_emb") select what is quantized.
    A MatMul of two activations (attention's Q.K^T and weights.V, the rotary angles) is never
    quantized, as `onnxruntime.quantization.quantize_dynamic` does by default (`MatMulConstBOnly`).
    """
    import onnx
    from optimum.onnxruntime import ORTQuantizer

    options: dict[str, Any] = {}
    if operators_to_quantize:
        options["operators_to_quantize"] = list(operators_to_quantize)
    graph = onnx.load(os.path.join(onnx_dir, ONNX_FILE), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    kept = [n for n in graph.node if any(k in n.name for k in keep_fp32)
            or (n.op_type == "MatMul" and n.input[1] not in constants)]
    if kept:
        # ORT rewrites a Gemm as "<name>_MatMul" + Add before quantizing: exclude both names
        options["nodes_to_exclude"] = [n.name for n in kept] + [f"{n.name}_MatMul" for n in kept if n.op_type == "Gemm"]
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name=ONNX_FILE)
    quantizer.quantize(save_dir=onnx_dir, quantization_config=cpu_quantization_config(per_channel, **options),
                       file_suffix=suffix)
    return os.path.join(onnx_dir, f"model_{suffix}.onnx")


def quantize_onnx_nbits(onnx_dir: str, bits: int = 4, block_size: int = 32, accuracy_level: Optional[int] = None,
                        keep: Sequence[str] = NBITS_KEEP, suffix: Optional[str] = None,
                        file_name: str = ONNX_FILE, head_bits: Optional[int] = None) -> str:
    """Weight-only quantization of the decoder MatMuls with onnxruntime's `MatMulNBitsQuantizer`
    (symmetric, `bits` in {4, 8}, blocks of `block_size` along the input dimension), saved beside the
    fp32 graph as `model_w<bits>.onnx` (or `model_<suffix>.onnx`); returns its path.

    Activations stay in floating point unless `accuracy_level` asks otherwise (4 = int8 compute, faster
    on CPU, quantizes activations per block); nodes whose name contains any of `keep` (the output head,
    the persona layer) stay fp32, and so do the embedding tables (Gather, not MatMul). `head_bits` (an
    experiment, off by default) quantizes the output head too, with that many bits, in a second pass.
    """
    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as err:  # onnxruntime >= 1.22 needs onnx-ir for it (the `onnx` extra brings it)
        raise ImportError(f"Weight-only quantization needs onnxruntime's matmul_nbits_quantizer: {err}. "
                          "pip install 'personaweave[onnx]' (onnxruntime and onnx-ir).") from None
    import logging

    if bits not in (4, 8) or head_bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits!r} (head_bits {head_bits!r}).")
    model = onnx.load(os.path.join(onnx_dir, file_name))
    passes = [(bits, [n.name for n in model.graph.node if any(k in n.name for k in keep)])]
    if head_bits is not None:  # then the head alone: every other MatMul excluded
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and "lm_head" not in n.name]
        passes.append((head_bits, others))
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs every node it skips at INFO
    try:
        for pass_bits, excluded in passes:
            quantizer = MatMulNBitsQuantizer(model, bits=pass_bits, block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level, nodes_to_exclude=excluded,
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
            model = quantizer.model.model
    finally:
        log.setLevel(level)
    out = os.path.join(onnx_dir, f"model_{suffix or f'w{bits}' + (f'h{head_bits}' if head_bits else '')}.onnx")
    quantizer.model.save_model_to_file(out, use_external_data_format=False)
    return out
