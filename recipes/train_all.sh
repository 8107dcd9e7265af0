#!/usr/bin/env bash
# The whole training pipeline on the shipped base and dataset: persona layer, LoRA
# sub-personalities, persona classifier + evaluation, and the shipped checkpoint.
#   bash recipes/train_all.sh [accelerate config]   (default: recipes/accelerate/cpu.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
ACCEL=${1:-recipes/accelerate/cpu.yaml}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
accelerate launch --config_file "$ACCEL" recipes/sft.py --config recipes/configs/sft_persona.yaml
accelerate launch --config_file "$ACCEL" recipes/sft.py --config recipes/configs/sft_sub_personality.yaml
personaweave eval --model outputs/sft_sub_personality/final --num-prompts 25 --out outputs/eval.json
python -c "from personaweave.loading import export_persona_checkpoint as e; \
e('outputs/sft_sub_personality/final', 'personaweave/data/checkpoint')"
