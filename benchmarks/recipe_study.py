#!/usr/bin/env python
"""Recipe study of the LCM scripts on the toy teacher (issue 22): which settings and which method (LCD or Phased
Consistency, PCM) make a student that beats the teacher's own few-step DDIM sampler, and by how much.

Each run is one training script launched as a user launches it (`accelerate launch`, one process,
OMP_NUM_THREADS=1), with a checkpoint every ``--every`` steps. Every checkpoint's student is sampled at 1, 2 and
4 steps on 192 samples (12 prompts x 16 noises, tools/toy_metrics.py) and compared with the teacher's DDIM at
the same step counts on the same prompts and noises. The teacher's rows and each evaluation are cached as JSON
in ``--work_dir``, so the study can be stopped, resumed and extended one run at a time:

    python benchmarks/recipe_study.py --runs pcm_full,lcd_full --jobs 2   # train (2 at a time), then evaluate
    python benchmarks/recipe_study.py --report                             # the tables of what is done

On the 2-core CPU this was written for a run of 200 steps at batch 32 takes 3-10 minutes (the toy networks gain
nothing from a second thread); see benchmarks/QUALITY.md for what was run and what was not.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "benchmarks")]

SCRIPTS = {"full": "train_lcm_distill_sd_wds.py", "lora": "train_lcm_distill_lora_sd_wds.py",
           "sdxl": "train_lcm_distill_sdxl_wds.py", "sdxl_lora": "train_lcm_distill_sdxl_wds.py"}
TEACHERS = {"sd": REPO / "tools" / "toy_teachers" / "toy-sd", "sdxl": REPO / "tools" / "toy_teachers" / "toy-sdxl"}
STEP_COUNTS = (1, 2, 4)


def run(kind, steps=200, **flags):
    """A run: the outcome tests' recipe (batch 32, omega 3 = the teacher's guidance 4, N = 10, pseudo-Huber
    c = 0.001; full lr 5e-4, LoRA rank 16 at lr 2e-3 with the online target), with `flags` (name -> value, None for a bare flag)
    changed."""
    base = {"resolution": 32, "train_batch_size": 32, "learning_rate": 5e-4, "lr_warmup_steps": 10,
            "loss_type": "huber", "huber_c": 0.001, "w_min": 3, "w_max": 3, "num_ddim_timesteps": 10,
            "dataloader_num_workers": 1, "validation_steps": 0, "seed": 0}
    if kind in ("lora", "sdxl_lora"):
        base.update(learning_rate=2e-3, lora_rank=16)
    if kind in ("lora", "sdxl_lora"):
        base.update(ema_decay="none")  # the online target, the default when the study ran; the EMA runs set it
    if kind == "sdxl_lora":
        base.update(use_lora=None)
    base.update(flags)
    return {"kind": kind, "steps": steps, "flags": base}


def teacher_of(spec):
    return "sdxl" if spec["kind"].startswith("sdxl") else "sd"


def is_lora(spec):
    return spec["kind"] in ("lora", "sdxl_lora")


# name -> run; PCM runs use N = 8 and M = 4 phases, so that 1, 2 and 4 sampling steps all land on phase edges
RUNS = {
    "lcd_full": run("full"),
    "pcm_full": run("full", num_ddim_timesteps=8, num_phases=4),
    "lcd_lora": run("lora"),
    "lcd_lora_ema": run("lora", ema_decay=0.95),
    "pcm_lora": run("lora", num_ddim_timesteps=8, num_phases=4),
    "lcd_full_n8": run("full", num_ddim_timesteps=8),  # LCD on PCM's grid: PCM vs LCD without the N difference
    "pcm_lora_ema": run("lora", num_ddim_timesteps=8, num_phases=4, ema_decay=0.95),
    # the sweep around the PCM full recipe (N = 8, M = 4, 200 steps): one setting changed per run
    "pcm_full_800": run("full", steps=800, num_ddim_timesteps=8, num_phases=4),  # training length
    "lcd_full_800": run("full", steps=800),
    "pcm_full_lr2.5e-4": run("full", learning_rate=2.5e-4, num_ddim_timesteps=8, num_phases=4),
    "pcm_full_lr1e-3": run("full", learning_rate=1e-3, num_ddim_timesteps=8, num_phases=4),
    "pcm_full_n16": run("full", num_ddim_timesteps=16, num_phases=4),
    "pcm_full_m1": run("full", num_ddim_timesteps=8, num_phases=1),
    "pcm_full_m2": run("full", num_ddim_timesteps=8, num_phases=2),
    "pcm_full_m8": run("full", num_ddim_timesteps=8, num_phases=8),
    "pcm_full_l2": run("full", num_ddim_timesteps=8, num_phases=4, loss_type="l2"),
    "pcm_full_huber0.01": run("full", num_ddim_timesteps=8, num_phases=4, huber_c=0.01),
    "pcm_full_omega2-8": run("full", num_ddim_timesteps=8, num_phases=4, w_min=2, w_max=8),
    "pcm_full_bs16": run("full", num_ddim_timesteps=8, num_phases=4, train_batch_size=16),
    "pcm_full_bs64": run("full", num_ddim_timesteps=8, num_phases=4, train_batch_size=64),
    "lcd_lora_ema0.99": run("lora", ema_decay=0.99),
    # the SDXL script on the toy SDXL teacher (two text encoders, micro-conditioning), full and LoRA
    "lcd_sdxl": run("sdxl"),
    "pcm_sdxl": run("sdxl", num_ddim_timesteps=8, num_phases=4),
    "lcd_sdxl_lora": run("sdxl_lora"),
    "pcm_sdxl_lora": run("sdxl_lora", num_ddim_timesteps=8, num_phases=4),
}


def flag_list(flags):
    out = []
    for name, value in flags.items():
        out += [f"--{name}"] if value is None else [f"--{name}", str(value)]
    return out


def train(name, spec, work_dir, shards, every):
    """Launch one run unless its output exists; returns its wall-clock seconds."""
    output_dir = Path(work_dir) / name
    done = output_dir / "train.json"
    if done.exists():
        return json.loads(done.read_text())["seconds"]
    flags = ["--pretrained_teacher_model", str(TEACHERS[teacher_of(spec)]), "--train_shards_path_or_url", shards,
             "--output_dir", str(output_dir), "--max_train_steps", str(spec["steps"]), "--checkpointing_steps",
             str(every), "--validation_prompts", "--overwrite_output_dir", *flag_list(spec["flags"])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / SCRIPTS[spec["kind"]]), *flags]
    start = time.perf_counter()
    with open(Path(work_dir) / f"{name}.log", "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"error: run {name} failed, see {Path(work_dir) / f'{name}.log'}")
    seconds = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps({"seconds": seconds, "spec": spec}))
    return seconds


def teacher_rows(work_dir, teacher="sd"):
    """The teacher's reference pictures and its DDIM rows at 1/2/4/50 steps, cached."""
    import toy_metrics

    cache = Path(work_dir) / ("teacher.pkl" if teacher == "sd" else f"teacher-{teacher}.pkl")
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    reference, rows = toy_metrics.measure_teacher(toy_metrics.load_pipeline(str(TEACHERS[teacher])))
    result = (reference, [without_images(row) for row in rows])
    cache.write_bytes(pickle.dumps(result))
    return result


def without_images(row):
    return {k: v for k, v in row.items() if k != "images"}


def evaluate_student(path, spec, reference):
    """Rows of the student saved at `path` (an output or checkpoint folder) at 1/2/4 steps; cached in it."""
    import toy_metrics

    cache = Path(path) / "eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    flags = spec["flags"]
    teacher = str(TEACHERS[teacher_of(spec)])
    if is_lora(spec):
        student, guidance = toy_metrics.load_student(teacher, lora=str(path))
    else:
        student, guidance = toy_metrics.load_student(teacher, unet=str(Path(path) / "unet_target"))
    sampler = "tcd" if flags.get("num_phases") else "lcm"
    rows = [without_images(row) for row in toy_metrics.measure_student(
        student, guidance, reference, sampler=sampler, steps=STEP_COUNTS, num_ddim_timesteps=flags["num_ddim_timesteps"])]
    cache.write_text(json.dumps(rows))
    return rows


def evaluate_run(name, spec, work_dir, reference):
    """{step: rows} of every checkpoint and of the final output of a trained run."""
    output_dir = Path(work_dir) / name
    curve = {}
    for checkpoint in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        curve[int(checkpoint.name.split("-")[1])] = evaluate_student(checkpoint, spec, reference)
    if spec["steps"] not in curve:  # else the last checkpoint is the final output
        curve[spec["steps"]] = evaluate_student(output_dir, spec, reference)
    if (output_dir / "ema_target").exists():  # the LoRA EMA target, measured as a student of its own
        curve[f"{spec['steps']} (EMA adapter)"] = evaluate_student(output_dir / "ema_target", spec, reference)
    return curve


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="", help=f"comma-separated runs to train and evaluate: {', '.join(RUNS)}")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (at most 2 on 2 cores)")
    parser.add_argument("--every", type=int, default=100, help="checkpoint (and evaluate) every N steps")
    parser.add_argument("--work_dir", default=str(REPO / "benchmarks" / "work" / "study"))
    parser.add_argument("--report", action="store_true", help="print the tables of every evaluated run")
    parser.add_argument("--plot", default="", help="also draw the training-length curves (CURVES) to this PNG")
    args = parser.parse_args(argv)
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    return args


def cell(row, key):
    low, high = row[f"{key}_interval"]
    return f"{row[key]:.3f} [{low:.3f}, {high:.3f}]"


def report(work_dir, teacher, teacher_kind="sd"):
    lines = ["| model | steps trained | " + " | ".join(f"{s} step acc" for s in STEP_COUNTS) + " | "
             + " | ".join(f"{s} step dist" for s in STEP_COUNTS) + " |",
             "|---|---|" + "---|" * (2 * len(STEP_COUNTS))]
    by_steps = {row["steps"]: row for row in teacher}
    lines.append("| teacher DDIM | - | " + " | ".join(cell(by_steps[s], "accuracy") for s in STEP_COUNTS) + " | "
                 + " | ".join(cell(by_steps[s], "distance") for s in STEP_COUNTS) + " |")
    for name, spec in RUNS.items():
        if teacher_of(spec) != teacher_kind:
            continue
        output_dir = Path(work_dir) / name
        paths = sorted(output_dir.glob("checkpoint-*/eval.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        labels = [p.parent.name.split("-")[1] for p in paths]
        for extra, label in (("eval.json", str(spec["steps"])), ("ema_target/eval.json", f"{spec['steps']} EMA")):
            if (output_dir / extra).exists() and label not in labels:  # the final output = the last checkpoint
                paths.append(output_dir / extra)
                labels.append(label)
        for path, label in zip(paths, labels):
            rows = {row["steps"]: row for row in json.loads(path.read_text())}
            lines.append(f"| {name} | {label} | " + " | ".join(cell(rows[s], "accuracy") for s in STEP_COUNTS)
                         + " | " + " | ".join(cell(rows[s], "distance") for s in STEP_COUNTS) + " |")
    lines.append(f"| teacher DDIM 50 steps | - | {cell(by_steps[50], 'accuracy')} | | | | | |")
    return "\n".join(lines)


# paired comparisons on the same 192 prompts and noises: (label, model eval, baseline eval); "teacher" = its DDIM
PAIRS = [
    ("PCM full - teacher DDIM", "pcm_full/checkpoint-200", "teacher"),
    ("PCM full - LCD full", "pcm_full/checkpoint-200", "lcd_full/checkpoint-200"),
    ("LCD full - teacher DDIM", "lcd_full/checkpoint-200", "teacher"),
    ("LoRA EMA adapter - plain LoRA", "lcd_lora_ema/ema_target", "lcd_lora/checkpoint-200"),
    ("PCM LoRA - LCD LoRA", "pcm_lora/checkpoint-200", "lcd_lora/checkpoint-200"),
    ("PCM LoRA - teacher DDIM", "pcm_lora/checkpoint-200", "teacher"),
    ("PCM full - LCD full, both N = 8", "pcm_full/checkpoint-200", "lcd_full_n8/checkpoint-200"),
    ("PCM LoRA EMA adapter - PCM LoRA", "pcm_lora_ema/ema_target", "pcm_lora/checkpoint-200"),
    ("PCM full 800 steps - 200 steps", "pcm_full_800/checkpoint-800", "pcm_full_800/checkpoint-200"),
    ("LCD full 800 steps - 200 steps", "lcd_full_800/checkpoint-800", "lcd_full_800/checkpoint-200"),
    ("PCM full 800 steps - teacher DDIM", "pcm_full_800/checkpoint-800", "teacher"),
    ("PCM LoRA EMA adapter - teacher DDIM", "pcm_lora_ema/ema_target", "teacher"),
    ("LoRA EMA adapter - the same run's online adapter", "lcd_lora_ema/ema_target", "lcd_lora_ema/checkpoint-200"),
    ("PCM LoRA EMA adapter - the same run's online adapter", "pcm_lora_ema/ema_target",
     "pcm_lora_ema/checkpoint-200"),
    ("LoRA online adapter of the EMA run - plain LoRA", "lcd_lora_ema/checkpoint-200", "lcd_lora/checkpoint-200"),
    ("PCM full batch 64 - teacher DDIM", "pcm_full_bs64/checkpoint-200", "teacher"),
    ("PCM full lr 1e-3 - lr 5e-4", "pcm_full_lr1e-3/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full lr 2.5e-4 - lr 5e-4", "pcm_full_lr2.5e-4/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full N 16 - N 8", "pcm_full_n16/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full 1 phase - 4 phases", "pcm_full_m1/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full 2 phases - 4 phases", "pcm_full_m2/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full 8 phases - 4 phases", "pcm_full_m8/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full L2 - Huber c 0.001", "pcm_full_l2/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full Huber c 0.01 - c 0.001", "pcm_full_huber0.01/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full omega 2-8 - fixed 3", "pcm_full_omega2-8/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full batch 16 - batch 32", "pcm_full_bs16/checkpoint-200", "pcm_full/checkpoint-200"),
    ("PCM full batch 64 - batch 32", "pcm_full_bs64/checkpoint-200", "pcm_full/checkpoint-200"),
    ("LoRA EMA 0.99 adapter - EMA 0.95 adapter", "lcd_lora_ema0.99/ema_target", "lcd_lora_ema/ema_target"),
    ("PCM SDXL - teacher DDIM (SDXL)", "pcm_sdxl/checkpoint-200", "teacher-sdxl"),
    ("LCD SDXL - teacher DDIM (SDXL)", "lcd_sdxl/checkpoint-200", "teacher-sdxl"),
    ("PCM SDXL LoRA - teacher DDIM (SDXL)", "pcm_sdxl_lora/checkpoint-200", "teacher-sdxl"),
    ("LCD SDXL LoRA - teacher DDIM (SDXL)", "lcd_sdxl_lora/checkpoint-200", "teacher-sdxl"),
    ("PCM SDXL - LCD SDXL", "pcm_sdxl/checkpoint-200", "lcd_sdxl/checkpoint-200"),
    ("PCM SDXL LoRA - LCD SDXL LoRA", "pcm_sdxl_lora/checkpoint-200", "lcd_sdxl_lora/checkpoint-200"),
]


def paired_report(work_dir, teacher, teacher_sdxl=None):
    """Mean differences (model - baseline) of accuracy and distance at each step count, with 95% intervals."""
    import toy_metrics

    def rows_of(name):
        if name == "teacher":
            return {row["steps"]: row for row in teacher}
        if name == "teacher-sdxl":
            return {row["steps"]: row for row in teacher_sdxl} if teacher_sdxl else None
        path = Path(work_dir) / name / "eval.json"
        return {row["steps"]: row for row in json.loads(path.read_text())} if path.exists() else None

    lines = ["| model - baseline | " + " | ".join(f"{s} step acc diff" for s in STEP_COUNTS) + " | "
             + " | ".join(f"{s} step dist diff" for s in STEP_COUNTS) + " |", "|---|" + "---|" * 6]
    for label, model, baseline in PAIRS:
        a, b = rows_of(model), rows_of(baseline)
        if a is None or b is None:
            continue
        cells = []
        for key, per_sample in (("accuracy", "correct"), ("distance", "distances")):
            for count in STEP_COUNTS:
                mean, (low, high) = toy_metrics.paired_difference(a[count][per_sample], b[count][per_sample])
                cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CURVES = {"LCD full": "lcd_full_800", "PCM full (4 phases)": "pcm_full_800"}  # the runs trained past 400 steps


def plot_curves(work_dir, teacher, path):
    """Accuracy and distance at 1/2/4 steps against training steps for CURVES, with the teacher's DDIM (and its
    50-step accuracy) as reference lines: benchmark_quality's panels."""
    import toy_metrics
    from benchmark_quality import curve_panels

    curves = {}
    for label, name in CURVES.items():
        paths = sorted((Path(work_dir) / name).glob("checkpoint-*/eval.json"),
                       key=lambda p: int(p.parent.name.split("-")[1]))
        if len(paths) > 1:
            curves[label] = [{"step": int(p.parent.name.split("-")[1]), "rows": json.loads(p.read_text())}
                             for p in paths]
    if curves:
        toy_metrics.line_chart(curve_panels(curves, teacher), str(path),
                               title="toy-sd students against training steps (95% intervals; 192 samples a point)")
        print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    if args.runs:
        from benchmark_quality import toy_shards

        shards = toy_shards(args.work_dir)
        with ThreadPoolExecutor(args.jobs) as pool:
            seconds = list(pool.map(lambda n: train(n, RUNS[n], args.work_dir, shards, args.every), args.runs))
        for name, s in zip(args.runs, seconds):
            print(f"{name}: trained in {s} s", flush=True)
    references, teachers = {}, {}
    for name in args.runs:
        kind = teacher_of(RUNS[name])
        if kind not in references:
            references[kind], teachers[kind] = teacher_rows(args.work_dir, kind)
        evaluate_run(name, RUNS[name], args.work_dir, references[kind])
    if args.report or args.runs:
        teachers.setdefault("sd", teacher_rows(args.work_dir, "sd")[1])
        if (Path(args.work_dir) / "teacher-sdxl.pkl").exists():
            teachers.setdefault("sdxl", teacher_rows(args.work_dir, "sdxl")[1])
        for kind, rows in teachers.items():
            print(f"{kind} teacher:")
            print(report(args.work_dir, rows, kind))
            print()
        print(paired_report(args.work_dir, teachers["sd"], teachers.get("sdxl")))
    if args.plot:
        plot_curves(args.work_dir, teacher_rows(args.work_dir, "sd")[1], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
