#!/usr/bin/env bash
# Trains the two embedded default models (issue 8): same recipe, same seed, 0 vs 4 registers. Exact commands used.
#   bash scripts/train_default_models.sh [OUT_DIR]     (about 30 min per model on a 2-core CPU, both in parallel)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/default-models}
python=.venv/bin/python
[ -f data/synthetic-objects/generation.json ] || $python scripts/make_dataset.py --output-dir data/synthetic-objects --seed 0
for registers in 4 0; do
  name=vit-tiny-objects-reg$registers
  OMP_NUM_THREADS=1 nice -n 5 $python scripts/finetune.py \
    --model-config scripts/default_models/$name.json \
    --dataset data/synthetic-objects \
    --output-dir "$out/$name" \
    --num-train-epochs 10 --per-device-batch-size 64 \
    --learning-rate 1e-3 --weight-decay 0.05 --warmup-steps 60 --crop-scale-min 0.35 \
    --checkpointing-steps 200 --seed 0 > "$out.$name.log" 2>&1 &
done
wait
