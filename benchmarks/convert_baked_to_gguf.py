"""A `personaweave bake` folder -> GGUF, with llama.cpp's own converter, keeping SmolLM2's BPE tokenizer.

llama.cpp's `convert_hf_to_gguf.py` reads a Llama model's vocabulary through sentencepiece or
`LlamaHfVocab` first; for SmolLM2 (GPT-2 style byte-level BPE) that writes `tokenizer.ggml.model =
llama`, and llama.cpp then prints "Ġ" for every space (seen in `benchmarks/deploy.py`: relevance 0.16).
This wrapper makes the converter read it as GPT-2 BPE with SmolLM2's pre-tokenizer (`smollm`, as in
the shipped GGUF): the shipped tokenizer was rebuilt from that GGUF by transformers, so the converter's
check hash does not recognise it. Nothing else changes. Needs a llama.cpp checkout (e.g. the
`vendor/llama.cpp` folder of the llama-cpp-python sdist) and the `gguf` package.

    python benchmarks/convert_baked_to_gguf.py LLAMA_CPP_DIR BAKED_DIR --outfile baked-q8_0.gguf --outtype q8_0
"""

import sys

if len(sys.argv) < 3:
    sys.exit(__doc__)
root = sys.argv.pop(1)
sys.path[:0] = [root, f"{root}/gguf-py"]
import convert_hf_to_gguf as conv  # noqa: E402
from conversion.llama import LlamaModel  # noqa: E402

LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
LlamaModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
sys.argv[0] = "convert_hf_to_gguf.py"
conv.main()
