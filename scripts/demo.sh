#!/usr/bin/env bash
# Offline, CPU-capable end-to-end demo: a tiny random SD pipeline and a few WebDataset shards are built
# locally, distilled into an LCM for a few steps through `accelerate launch`, and a 4-step image is written.
# Everything lands in demo_output/. Nothing is downloaded except the Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
unset PYTHONDONTWRITEBYTECODE  # cache bytecode: setup_env.sh installs without it
PY=.venv/bin/python
OUT=demo_output
mkdir -p "$OUT"
[ -f "$OUT/tiny-sd/model_index.json" ] || $PY tools/make_random_pipeline.py --preset tiny-sd --output_dir "$OUT/tiny-sd"
[ -d "$OUT/images" ] || $PY tools/make_toy_dataset.py --output_dir "$OUT/images" --num_images 24 --captions jsonl
[ -f "$OUT/shards/shard-00000.tar" ] || $PY tools/make_wds_shards.py --input_dir "$OUT/images" --output_dir "$OUT/shards" --samples_per_shard 8
rm -rf "$OUT/lcm"
$PY -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_lcm_distill_sd_wds.py \
    --pretrained_teacher_model "$OUT/tiny-sd" \
    --train_shards_path_or_url "$OUT/shards/shard-{00000..00002}.tar" \
    --output_dir "$OUT/lcm" \
    --resolution 64 --train_batch_size 4 --max_train_steps ${DEMO_STEPS:-6} \
    --learning_rate 1e-4 --lr_warmup_steps 0 --loss_type huber \
    --dataloader_num_workers 1 --checkpointing_steps 3 --validation_steps 0 \
    --validation_prompts "a red circle on a blue background" --seed 0
$PY tools/lcm_generate.py --teacher "$OUT/tiny-sd" --unet "$OUT/lcm/unet_target" --steps 4 \
    --prompt "a red circle on a blue background" --output "$OUT/lcm_4_steps.png" --device cpu
echo "demo done: $OUT/lcm_4_steps.png (validation grid: $OUT/lcm/validation/, model card: $OUT/lcm/README.md)"
