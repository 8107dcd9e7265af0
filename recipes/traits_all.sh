#!/usr/bin/env bash
# Traits and few-shot adaptation, end to end on CPU (~10 minutes on 2 cores):
# trait model, distilled student + benchmark, MAML vs fine-tuning, prototypical networks.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python recipes/traits.py --config recipes/configs/traits.yaml
# the shipped heads (frozen MiniLM, ~1 minute on 1 core): cp outputs/traits_heads/heads/* personaweave/data/traits/
python recipes/traits.py --config recipes/configs/traits_heads.yaml
python recipes/distill_traits.py --config recipes/configs/distill_traits.yaml
python benchmarks/traits.py | tee outputs/traits_benchmark.jsonl
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/maml.py --config recipes/configs/maml.yaml
python recipes/protonet.py --config recipes/configs/protonet.yaml
