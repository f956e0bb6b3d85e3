#!/usr/bin/env python
"""Outcome of BK-SDM's SDXL students on the committed toy SDXL teacher (tools/toy_teachers/toy-sdxl): each student
trained with the KD terms against the same student trained as long on the task loss alone, on prompt accuracy and
distance to the teacher (tools/toy_metrics.py), with 95% intervals.

The toy teacher has one transformer block per attention, so the SSD-1B and Vega rules (a share of each attention's
blocks, at least one kept) remove only its mid block's attention and second resnet there; KOALA-700M's rule also
halves every level's resnets and attentions (the BK-SDM "tiny" kind of removal). Both are measured.

Every model draws the same 12 colour-and-shape prompts from the same fixed noises (`--seeds_per_prompt` each,
guided DDIM, `--sampler_steps`), so KD and task-only samples are paired: the intervals are of the paired
differences, mean +- 1.96 standard errors (accuracy: of the per-sample 0/1 hits; distance: of the per-sample RMS
pixel distances to the teacher's picture).

    python benchmarks/outcome_bk_sdxl.py --students ssd-1b,koala-700m --steps 120 --seeds_per_prompt 16
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools")]

import toy_metrics  # noqa: E402
import toy_world  # noqa: E402
from make_wds_shards import make_shards  # noqa: E402

TEACHER = REPO / "tools" / "toy_teachers" / "toy-sdxl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", default="ssd-1b,koala-700m")
    parser.add_argument("--steps", type=int, default=120, help="training steps of every run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", default="5e-4")
    parser.add_argument("--lambda_kd", default="1.0", help="KD weights of the KD runs (output and feature)")
    parser.add_argument("--seeds_per_prompt", type=int, default=16, help="12 prompts x this many noises")
    parser.add_argument("--sampler_steps", type=int, default=25)
    parser.add_argument("--work_dir", default=None, help="where data and runs go (default: a temporary folder)")
    return parser.parse_args(argv)


def train(student, lambda_kd, shards, output_dir, args):
    flags = ["--pretrained_teacher_model", str(TEACHER), "--unet_config_name", student,
             "--train_shards_path_or_url", shards, "--output_dir", str(output_dir), "--resolution", "32",
             "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
             "--learning_rate", args.learning_rate, "--lambda_kd_output", lambda_kd, "--lambda_kd_feat", lambda_kd,
             "--dataloader_num_workers", "1", "--checkpointing_steps", "100000", "--validation_prompts",
             "--single_file", "none", "--report_to", "none", "--seed", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(REPO / "train_bk_sdm_kd.py"), *flags], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def per_sample(result, reference, prompts):
    hits = np.array([toy_world.shows_prompt(image, prompt) for image, prompt in zip(result["images"], prompts)], float)
    distances = np.sqrt(((result["images"] - reference) ** 2).mean(axis=(1, 2, 3)))
    return hits, distances


def interval(values):
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():+.3f} [{values.mean() - half:+.3f}, {values.mean() + half:+.3f}]"


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="outcome_bk_sdxl_"))
    toy_world.write_image_folder(str(work / "images"), 512, seed=11)
    shards = make_shards(str(work / "images"), str(work / "shards"), samples_per_shard=128)["url_pattern"]
    teacher = toy_metrics.load_pipeline(str(TEACHER))
    prompts = toy_metrics.eval_prompts(seeds_per_prompt=args.seeds_per_prompt)
    reference = toy_metrics.evaluate(teacher, "ddim", args.sampler_steps, toy_metrics.TEACHER_GUIDANCE,
                                     seeds_per_prompt=args.seeds_per_prompt)
    rows = [f"| teacher (toy-sdxl) | | {reference['accuracy']:.3f} | 0 | | |"]
    for student in args.students.split(","):
        measured = {}
        for label, lambda_kd in (("KD", args.lambda_kd), ("task loss only", "0")):
            output_dir = work / f"{student}-{'kd' if lambda_kd != '0' else 'task'}"
            start = time.time()
            train(student, lambda_kd, shards, output_dir, args)
            print(f"{student} {label}: trained in {time.time() - start:.0f} s", flush=True)
            result = toy_metrics.measure_bk_student(teacher, str(output_dir / "unet"), reference["images"],
                                                    steps=args.sampler_steps, seeds_per_prompt=args.seeds_per_prompt)
            measured[label] = per_sample(result, reference["images"], prompts)
        (kd_hits, kd_dist), (task_hits, task_dist) = measured["KD"], measured["task loss only"]
        for label, (hits, dist) in measured.items():
            rows.append(f"| {student} | {label} | {hits.mean():.3f} | {dist.mean():.4f} | | |")
        rows.append(f"| {student} | KD - task only (paired, 95%) | | | {interval(kd_hits - task_hits)} | "
                    f"{interval(kd_dist - task_dist)} |")
    print(f"\n{len(prompts)} samples per model ({args.seeds_per_prompt} per prompt), {args.steps} steps of "
          f"{args.batch_size}, lr {args.learning_rate}, sampler: guided DDIM {args.sampler_steps} steps\n")
    print("| model | training | accuracy | distance | accuracy difference | distance difference |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
