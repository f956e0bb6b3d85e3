#!/usr/bin/env bash
# Offline, CPU-only demo of what consistency distillation buys: the trained toy teacher (tools/toy_teachers/toy-sd,
# 32x32 coloured shapes; rebuilt by tools/make_toy_teacher.py if missing) is distilled twice with
# train_lcm_distill_sd_wds.py through `accelerate launch`, both runs at once: an LCD student (Latent Consistency
# Distillation, N = 10) and a PCM student (Phased Consistency, N = 8 in 4 phases). Then the teacher (1/2/4/50 DDIM
# steps), the LCD student (1/2/4 LCM steps) and the PCM student (1/2/4 deterministic TCD steps) sample the same
# prompts and noises. Writes demo_output/comparison.png and prints the metric tables (192 samples, 95% intervals).
# About 5 minutes on 2 idle cores (6.5 on 2 busy ones); nothing is downloaded except the Python packages.
# Shorter runs: DEMO_STEPS (both students, default 200), DEMO_LCD_STEPS / DEMO_PCM_STEPS (one each),
# DEMO_SEEDS_PER_PROMPT (noises per prompt in the tables, default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One thread per process: the toy networks are too small to gain from a second (0.42-0.47 s per step with 1 thread
# on busy cores, 0.5 s with 2 on idle ones), and on cores that other work keeps busy 2 threads took 2.4-6.6 s per
# step. The two trainings run side by side, one core each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
unset PYTHONDONTWRITEBYTECODE  # cache bytecode: setup_env.sh installs without it
PY=.venv/bin/python
OUT=demo_output
TEACHER=tools/toy_teachers/toy-sd
# 200 steps each: in benchmarks/QUALITY.md the LCD student is no better at 400 (the demo's earlier length) than at
# 200, and the PCM student is as good at 100 as at 200; both 200-step recipes are the ones measured there.
LCD_STEPS=${DEMO_LCD_STEPS:-${DEMO_STEPS:-200}}
PCM_STEPS=${DEMO_PCM_STEPS:-${DEMO_STEPS:-200}}
mkdir -p "$OUT"
if [ ! -f "$TEACHER/model_index.json" ]; then
    TEACHER="$OUT/toy-sd"
    [ -f "$TEACHER/model_index.json" ] || $PY tools/make_toy_teacher.py --kind sd --output_dir "$TEACHER"
fi
if [ ! -f "$OUT/toy-shards/shard-00003.tar" ]; then
    rm -rf "$OUT/toy-images" "$OUT/toy-shards"
    $PY -c "import sys; sys.path.insert(0, 'tools'); import toy_world; toy_world.write_image_folder('$OUT/toy-images', 2048, seed=11)"
    $PY tools/make_wds_shards.py --input_dir "$OUT/toy-images" --output_dir "$OUT/toy-shards" --samples_per_shard 512
fi

# distil NAME STEPS FLAGS...: one student in the background, its output in $OUT/NAME and its log in $OUT/NAME.log.
# setsid gives each run its own process group, so that a failure or Ctrl-C stops the launcher and its training.
declare -A PIDS
distil() {
    local name=$1 steps=$2
    shift 2
    rm -rf "${OUT:?}/$name"
    setsid $PY -m accelerate.commands.launch --quiet --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
        --dynamo_backend no train_lcm_distill_sd_wds.py \
        --pretrained_teacher_model "$TEACHER" \
        --train_shards_path_or_url "$OUT/toy-shards/shard-{00000..00003}.tar" \
        --output_dir "$OUT/$name" \
        --resolution 32 --train_batch_size 32 --max_train_steps "$steps" \
        --learning_rate 5e-4 --lr_warmup_steps 10 --loss_type huber --w_min 3 --w_max 3 \
        --dataloader_num_workers 1 --checkpointing_steps 100000 --validation_steps 0 \
        --validation_prompts "a red circle" "a blue square" --seed 0 "$@" >"$OUT/$name.log" 2>&1 &
    PIDS[$!]=$name
}
stop_trainings() {  # SIGTERM asks a training for a graceful stop (it saves a checkpoint): wait until it is gone
    local pid
    for pid in "${!PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${!PIDS[@]}"; do while kill -0 -- "-$pid" 2>/dev/null; do sleep 0.2; done; done
}
trap stop_trainings EXIT

echo "distilling the LCD student ($LCD_STEPS steps) and the PCM student ($PCM_STEPS steps) side by side;" \
     "logs: $OUT/lcd.log, $OUT/pcm.log"
start=$SECONDS
distil lcd "$LCD_STEPS" --num_ddim_timesteps 10
distil pcm "$PCM_STEPS" --num_ddim_timesteps 8 --num_phases 4
while [ ${#PIDS[@]} -gt 0 ]; do
    status=0
    wait -n -p finished "${!PIDS[@]}" || status=$?
    name=${PIDS[$finished]}
    unset "PIDS[$finished]"
    if [ "$status" -ne 0 ]; then
        tail -n 15 "$OUT/$name.log" >&2
        echo "error: the $name student's training failed (exit $status); its log is $OUT/$name.log" >&2
        exit 1  # the EXIT trap stops the other training
    fi
    echo "$name student trained ($((SECONDS - start)) s since the start)"
done
trap - EXIT

$PY tools/toy_lcm_compare.py --teacher "$TEACHER" --output "$OUT/comparison.png" --metrics_json "$OUT/metrics.json" \
    --student "LCD student=$OUT/lcd:lcm" --student "PCM student=$OUT/pcm:tcd" \
    --seeds_per_prompt "${DEMO_SEEDS_PER_PROMPT:-16}"
echo "demo done in $((SECONDS - start)) s: $OUT/comparison.png (students: $OUT/lcd/unet_target and" \
     "$OUT/pcm/unet_target, model cards: $OUT/lcd/README.md, $OUT/pcm/README.md)"
echo "sample a student: $PY tools/lcm_generate.py --teacher $TEACHER --unet $OUT/pcm/unet_target" \
     "--steps 2 --prompt 'a green triangle'   (or --unet $OUT/lcd/unet_target)"
