#!/usr/bin/env bash
# Persona quality v2, end to end (issue 14): best-of-N candidates -> judge-selected dataset ->
# persona stage -> LoRA sub-personalities -> DPO (shared adapter) -> persona reward model ->
# held-out comparison with the prompt baseline, evaluation judge. Every step resumes or is cheap to
# redo: candidate shards are skipped when present, judged shards are cached.
#   bash recipes/train_v2.sh [accelerate config]     (default: recipes/accelerate/cpu.yaml)
# Hours on 2 CPU cores; run it under nohup and commit shards as they arrive.
set -euo pipefail
cd "$(dirname "$0")/.."
ACCEL=${1:-recipes/accelerate/cpu.yaml}
# extra trainer flags, e.g. TRAIN_FLAGS="--bf16 true --use_cpu true" on CPUs with AMX-bf16
TRAIN_FLAGS=${TRAIN_FLAGS:-}
# GENERATE=0 trains on the shards there are (e.g. while generation runs elsewhere); BUILD_FLAGS, e.g.
# "--max_judge 0", are passed to the dataset builder
GENERATE=${GENERATE:-1}
BUILD_FLAGS=${BUILD_FLAGS:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SHARDS=datasets_scripts/shards/v2
DATA=personaweave/data/persona_dialogues_v2

if [ "$GENERATE" = 1 ]; then
    python datasets_scripts/generate_candidates.py --out "$SHARDS" --turns_per_shard 8 --splits train validation
fi
python datasets_scripts/build_persona_dialogues_v2.py --shards "$SHARDS" --out "$DATA" $BUILD_FLAGS
accelerate launch --config_file "$ACCEL" recipes/sft.py --config recipes/configs/sft_persona_v2.yaml $TRAIN_FLAGS
accelerate launch --config_file "$ACCEL" recipes/sft.py --config recipes/configs/sft_sub_personality_v2.yaml $TRAIN_FLAGS
accelerate launch --config_file "$ACCEL" recipes/dpo.py --config recipes/configs/dpo.yaml $TRAIN_FLAGS
# token-only DPO on the persona layer (the shipped layer since session 10: the persona stage above on all v2 data,
# then this, 800 pairs; the shipped LoRAs are the per-persona DPO ones, recipes/configs/dpo_persona_lora_v2*.yaml)
accelerate launch --config_file "$ACCEL" recipes/dpo.py --config recipes/configs/dpo_persona_layer.yaml \
    --master_model outputs/sft_persona_v2/final --output_dir outputs/dpo_persona_layer $TRAIN_FLAGS
# one folder with the per-persona LoRA sub-personalities and the shared DPO adapter, for one eval run
rm -rf outputs/v2_all && cp -r outputs/sft_sub_personality_v2/final outputs/v2_all
cp -r outputs/dpo/final/adapters/dpo outputs/v2_all/adapters/dpo
accelerate launch --config_file "$ACCEL" recipes/reward_model.py --config recipes/configs/reward_model_v2.yaml
python recipes/persona_quality.py --config recipes/configs/persona_quality.yaml --model outputs/v2_all \
    --output outputs/persona_quality_v2_trained.json
python recipes/persona_drift.py --config recipes/configs/persona_drift.yaml --model outputs/v2_all
