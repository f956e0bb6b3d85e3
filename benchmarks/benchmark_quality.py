#!/usr/bin/env python
"""Quality benchmark on the trained toy teacher: does each method do what it promises?

Runs every training script through `accelerate launch` on the toy world (tools/toy_world.py) and measures
the result with tools/toy_metrics.py:

* LCD full and LCM-LoRA (and SDXL LCD when a toy SDXL teacher exists): prompt accuracy and distance to the
  teacher's 50-step sample of the student at 1, 2, 4 LCM steps against the teacher at 1, 2, 4, 50 DDIM steps,
  each with its 95% interval (192 samples); and curves of both against training steps (every checkpoint
  evaluated) with the teacher's DDIM figures as reference lines, plotted to ``quality_curve.png``;
* BK-SDM: each student (bk_base, bk_small, bk_tiny) trained with and without the KD terms, sampled with the
  teacher's settings; UNet latency of one guided call;
* DreamBooth LoRA: share of instance-prompt samples showing the subject, and the class prompt's drift from
  the base model with and without prior preservation.

Writes ``benchmarks/QUALITY.md`` (tables) and ``benchmarks/quality_curve.png``.

    python benchmarks/benchmark_quality.py                      # everything, about 40 minutes on 2 cores
    python benchmarks/benchmark_quality.py --methods lcd,lora   # a subset
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools")]

import toy_metrics  # noqa: E402
import toy_world  # noqa: E402

METHODS = ("lcd", "lora", "sdxl", "bk", "dreambooth")
NUM_DDIM_TIMESTEPS = 10  # skipping step k = 100, as in the outcome tests


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(REPO / "tools" / "toy_teachers" / "toy-sd"))
    parser.add_argument("--sdxl_teacher", default=str(REPO / "tools" / "toy_teachers" / "toy-sdxl"))
    parser.add_argument("--work_dir", default=str(REPO / "benchmarks" / "work" / "quality"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lcd_steps", type=int, default=400)
    parser.add_argument("--curve_every", type=int, default=100, help="checkpoint (and evaluate) every N steps")
    parser.add_argument("--bk_steps", type=int, default=120)
    parser.add_argument("--dreambooth_steps", type=int, default=150)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "QUALITY.md"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "quality_curve.png"))
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    return args


def launch(script, flags):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / script), *map(str, flags)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{script} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return time.perf_counter() - start


def toy_shards(work_dir):
    from make_wds_shards import make_shards

    shards = Path(work_dir) / "shards"
    if not (shards / "shard-00003.tar").exists():
        toy_world.write_image_folder(str(Path(work_dir) / "images"), 2048, seed=11)
        make_shards(str(Path(work_dir) / "images"), str(shards), samples_per_shard=512, overwrite=True)
    return str(shards / "shard-{00000..00003}.tar")


def lcd_flags(teacher, shards, output_dir, steps, every):
    return ["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", shards, "--output_dir", output_dir,
            "--resolution", "32", "--train_batch_size", "32", "--max_train_steps", steps,
            "--learning_rate", "5e-4", "--lr_warmup_steps", "10", "--loss_type", "huber", "--w_min", "3",
            "--w_max", "3", "--num_ddim_timesteps", NUM_DDIM_TIMESTEPS, "--validation_prompts", "a red circle",
            "--dataloader_num_workers", "1", "--checkpointing_steps", every,
            "--validation_steps", "0", "--seed", "0", "--overwrite_output_dir"]


def strip_images(rows):
    """Rows without their pictures and per-sample lists (what results.json and the tables keep)."""
    return [{k: v for k, v in row.items() if k not in ("images", "correct", "distances")} for row in rows]


def run_lcm(args, method, shards):
    """Final table rows (teacher DDIM at 1/2/4/50 steps, the student at 1/2/4) and the curve (every checkpoint's
    student rows) of an LCM method."""
    teacher_dir = args.sdxl_teacher if method == "sdxl" else args.teacher
    output_dir = Path(args.work_dir) / method
    flags = lcd_flags(teacher_dir, shards, output_dir, args.lcd_steps, args.curve_every)
    script = {"lcd": "train_lcm_distill_sd_wds.py", "lora": "train_lcm_distill_lora_sd_wds.py",
              "sdxl": "train_lcm_distill_sdxl_wds.py"}[method]
    if method == "lora":
        flags[flags.index("--learning_rate") + 1] = "2e-3"
        flags += ["--lora_rank", "16"]
    seconds = launch(script, flags)
    teacher = toy_metrics.load_pipeline(teacher_dir)
    reference, teacher_rows = toy_metrics.measure_teacher(teacher)

    def student_at(path):
        if method == "lora":
            return toy_metrics.load_student(teacher_dir, lora=str(path))
        return toy_metrics.load_student(teacher_dir, unet=str(path / "unet_target"))

    curve = []
    for step in range(args.curve_every, args.lcd_steps + 1, args.curve_every):
        path = output_dir / f"checkpoint-{step}"
        if not path.exists():
            continue
        student, guidance = student_at(path)
        rows = toy_metrics.measure_student(student, guidance, reference, num_ddim_timesteps=NUM_DDIM_TIMESTEPS)
        curve.append({"step": step, "rows": strip_images(rows)})
    student, guidance = student_at(output_dir)
    rows = toy_metrics.measure_student(student, guidance, reference, num_ddim_timesteps=NUM_DDIM_TIMESTEPS)
    return {"rows": strip_images(teacher_rows + rows), "curve": curve, "train_seconds": round(seconds, 1)}


def run_bk(args, shards):
    from diffusers import UNet2DConditionModel

    teacher = toy_metrics.load_pipeline(args.teacher)
    reference = toy_metrics.teacher_reference(teacher)
    rows = [{"student": "teacher", "kd": "-", "accuracy": toy_metrics.evaluate(
        teacher, "ddim", toy_metrics.TEACHER_STEPS, toy_metrics.TEACHER_GUIDANCE)["accuracy"], "distance": 0.0,
        "unet_params": sum(p.numel() for p in teacher.unet.parameters()),
        "latency_ms": unet_latency_ms(teacher.unet)}]
    for student in ("bk_base", "bk_small", "bk_tiny"):
        for kd in ("1.0", "0"):
            output_dir = Path(args.work_dir) / f"{student}_kd{kd}"
            launch("train_bk_sdm_kd.py", [
                "--pretrained_teacher_model", args.teacher, "--unet_config_name", student,
                "--train_shards_path_or_url", shards, "--output_dir", output_dir, "--resolution", "32",
                "--train_batch_size", "32", "--max_train_steps", args.bk_steps, "--learning_rate", "5e-4",
                "--lambda_kd_output", kd, "--lambda_kd_feat", kd, "--dataloader_num_workers", "1",
                "--checkpointing_steps", "100000", "--validation_steps", "0", "--seed", "0", "--overwrite_output_dir"])
            result = toy_metrics.measure_bk_student(teacher, str(output_dir / "unet"), reference)
            unet = UNet2DConditionModel.from_pretrained(output_dir / "unet")
            rows.append({"student": student, "kd": "yes" if kd != "0" else "no (task loss only)",
                         **{k: result[k] for k in ("accuracy", "accuracy_interval", "distance", "distance_interval")},
                         "unet_params": sum(p.numel() for p in unet.parameters()),
                         "latency_ms": unet_latency_ms(unet)})
    return {"rows": rows}


def unet_latency_ms(unet, repeats=20):
    """Median time of one classifier-free-guided UNet call (batch 2) at the toy size."""
    import statistics

    import torch

    latents = torch.randn(2, unet.config.in_channels, 8, 8)
    context = torch.randn(2, 8, unet.config.cross_attention_dim)  # the toy tokenizer's 8 tokens
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            start = time.perf_counter()
            unet(latents, torch.tensor([500, 500]), encoder_hidden_states=context)
            times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times[3:]), 2)


def run_dreambooth(args):
    rows = []
    subject = toy_world.write_subject_folder(str(Path(args.work_dir) / "subject"))
    for prior in (True, False):
        output_dir = Path(args.work_dir) / f"dreambooth_prior{int(prior)}"
        flags = ["--pretrained_model_name_or_path", args.teacher, "--instance_data_dir", subject,
                 "--instance_prompt", toy_world.SUBJECT_PROMPT, "--output_dir", output_dir, "--resolution", "32",
                 "--train_batch_size", "4", "--max_train_steps", args.dreambooth_steps, "--rank", "8",
                 "--learning_rate", "2e-3", "--checkpointing_steps", "100000", "--seed", "0",
                 "--overwrite_output_dir"]
        if prior:
            flags += ["--with_prior_preservation", "--class_prompt", toy_world.CLASS_PROMPT, "--class_data_dir",
                      Path(args.work_dir) / "class", "--num_class_images", "16", "--sample_batch_size", "16"]
        launch("train_dreambooth_lora.py", flags)
        result = toy_metrics.measure_dreambooth(args.teacher, str(output_dir))
        rows.append(dict({k: v for k, v in result.items() if k != "images"}, prior_preservation=prior))
    return {"rows": rows}


def curve_panels(curves, teacher_rows, step_counts=(1, 2, 4)):
    """The panels of ``toy_metrics.line_chart``: accuracy and distance at each step count against training steps,
    one curve per method, with the teacher's DDIM at the same step count (and at 50 steps) as dashed lines."""
    teacher = {row["steps"]: row for row in teacher_rows}
    panels = []
    for metric, better in (("accuracy", "higher"), ("distance", "lower")):
        for count in step_counts:
            series = [{"label": label, "points": [
                (point["step"], row[metric], row.get(f"{metric}_interval"))
                for point in curve for row in point["rows"] if row["steps"] == count]}
                for label, curve in curves.items()]
            references = [{"label": f"DDIM {count}", "y": teacher[count][metric]}]
            if metric == "accuracy":
                references.append({"label": f"DDIM {toy_metrics.TEACHER_STEPS}",
                                   "y": teacher[toy_metrics.TEACHER_STEPS][metric]})
            panels.append({"title": f"{'prompt accuracy' if metric == 'accuracy' else 'distance to teacher 50-step'}, "
                                    f"{count} step{'s' if count > 1 else ''} ({better} is better)",
                           "xlabel": "training steps", "series": series, "references": references,
                           **({"ylim": (0.0, 1.0)} if metric == "accuracy" else {})})
    return panels


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    shards = toy_shards(args.work_dir)
    results = {}
    for method in args.methods:
        if method == "sdxl" and not Path(args.sdxl_teacher, "model_index.json").exists():
            print(f"skipping sdxl: no toy SDXL teacher at {args.sdxl_teacher}")
            continue
        print(f"== {method}", flush=True)
        if method in ("lcd", "lora", "sdxl"):
            results[method] = run_lcm(args, method, shards)
        elif method == "bk":
            results[method] = run_bk(args, shards)
        else:
            results[method] = run_dreambooth(args)
    with open(Path(args.work_dir) / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    lines = ["# Quality on the toy teacher", "",
             f"Produced by `python benchmarks/benchmark_quality.py` ({time.strftime('%Y-%m-%d')}, CPU). "
             f"accuracy: share of samples showing the prompt's colour and shape "
             f"({len(toy_metrics.eval_prompts())} samples: 12 prompts x {toy_metrics.SEEDS_PER_PROMPT} noises); "
             "distance: RMS pixel distance to the teacher's 50-step guided DDIM sample from the same noise "
             "(lower is closer). Brackets: 95% intervals (Wilson for accuracy, normal for the mean distance). "
             "Teacher guidance 4; LCD students trained at omega 3 (= guidance 4).", ""]
    for method in ("lcd", "lora", "sdxl"):
        if method in results:
            name = {"lcd": "LCD full", "lora": "LCM-LoRA", "sdxl": "LCD SDXL"}[method]
            lines += [f"## {name} ({args.lcd_steps} steps, batch 32, {results[method]['train_seconds']} s)", "",
                      toy_metrics.table(results[method]["rows"]), ""]
    if "bk" in results:
        lines += [f"## BK-SDM ({args.bk_steps} steps, batch 32; {toy_metrics.TEACHER_STEPS}-step DDIM, guidance 4)",
                  "", toy_metrics.table(results["bk"]["rows"], columns=(
                      "student", "kd", "accuracy", "distance", "unet_params", "latency_ms")), ""]
    if "dreambooth" in results:
        lines += [f"## DreamBooth LoRA ({args.dreambooth_steps} steps, 4 instance pictures)", "",
                  toy_metrics.table(results["dreambooth"]["rows"], columns=(
                      "prior_preservation", "subject", "subject_base", "class_accuracy", "class_accuracy_base",
                      "class_drift", "class_subject_share")), ""]
    names = {"lcd": "LCD full", "lora": "LCM-LoRA", "sdxl": "LCD SDXL"}
    curves = {names[m]: results[m]["curve"] for m in ("lcd", "lora") if m in results}
    if curves:  # toy-sd methods: one teacher, so one set of reference lines
        teacher_rows = [row for row in results[next(m for m in ("lcd", "lora") if m in results)]["rows"]
                        if row["model"] == "teacher"]
        toy_metrics.line_chart(curve_panels(curves, teacher_rows), args.plot,
                               title="toy-sd students against training steps (95% intervals; 192 samples a point)")
        lines += ["## Against training steps", "", f"![curve]({Path(args.plot).name})", ""]
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
