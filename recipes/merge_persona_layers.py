"""A linear merge of persona layers: `sum(w_i * layer_i)` of checkpoints in the shipped format.

Two layers trained from the same start trade persona evidence against relevance and fluency differently
(session 14: DPO on persona-evidence pairs vs on mixed pairs); a weighted average of their weights gives a
point between them, at no training cost. The LoRA adapters and bank metadata come from `--adapters_from`.

    python recipes/merge_persona_layers.py --config recipes/configs/merge_persona_layers.yaml

A saved PersonaWeave model folder is exported to the checkpoint format first
(`personaweave.loading.export_persona_checkpoint`, done here when a folder holds `config.json`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from trl import TrlParser


@dataclass
class MergePersonaLayersArguments:
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "Two or more persona checkpoints (persona_layer.safetensors) or saved PersonaWeave model folders."})
    weights: list[float] = field(default_factory=list, metadata={"help": "One weight per checkpoint, summing to 1."})
    output_dir: str = field(default="outputs/merged_persona_layer", metadata={"help": "Where the merged checkpoint goes."})
    adapters_from: int = field(default=0, metadata={"help": "Index of the checkpoint whose LoRA adapters are copied."})


def make_parser() -> TrlParser:
    return TrlParser((MergePersonaLayersArguments,))


def main(args: MergePersonaLayersArguments) -> str:
    from personaweave.loading import export_persona_checkpoint, merge_persona_checkpoints

    with tempfile.TemporaryDirectory() as scratch:
        paths = []
        for i, path in enumerate(args.checkpoints):
            if os.path.isfile(os.path.join(path, "config.json")):  # a model folder: its layer in checkpoint format
                path = export_persona_checkpoint(path, os.path.join(scratch, f"checkpoint_{i}"))
            paths.append(path)
        out = merge_persona_checkpoints(paths, args.weights, args.output_dir, adapters_from=args.adapters_from,
                                        labels=args.checkpoints)
    print(f"merged {len(paths)} persona layers ({', '.join(f'{w:g}' for w in args.weights)}) -> {out}")
    return out


if __name__ == "__main__":
    (arguments,) = make_parser().parse_args_and_config()
    main(arguments)
