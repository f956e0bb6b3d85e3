#!/usr/bin/env python
"""Compare LCM and PCM students with their toy teacher: one labelled picture and the metric tables.

    python tools/toy_lcm_compare.py --teacher tools/toy_teachers/toy-sd --output OUT/comparison.png \
        --student "LCD student=OUT/lcd" --student "PCM student=OUT/pcm"
    python tools/toy_lcm_compare.py --unet OUT/lcd/unet_target --output OUT/comparison.png   # one student

Every model samples the same prompts from the same initial noises. Picture: a row per model and step count,
grouped by step count (the teacher's 50-step DDIM reference on top, then at 1, 2 and 4 steps the teacher's DDIM
and each student side by side), a column per prompt (its first noise). Tables (printed, and written as JSON with
``--metrics_json``): prompt accuracy and distance to the teacher's 50-step sample of every row over the 12 prompts
x ``--seeds_per_prompt`` noises (192 by default, see ``tools/toy_metrics.py``), each with its 95% interval; then
each student minus the teacher's DDIM at the same step count, sample by sample (paired differences).

A student is ``NAME=PATH[:SAMPLER]``: PATH a training output folder, a full student's UNet folder (its omega input
takes guidance - 1, so it samples at the teacher's guidance) or an LCM-LoRA (folder or .safetensors; sampled with
guidance 1, no CFG). The sampler (``lcm``, or ``tcd`` with eta 0 for a Phased Consistency student) and the DDIM
grid N default to the scheduler the training saved next to the student (a TCDScheduler means ``tcd``).
``--unet`` / ``--lora`` add one student named "student".
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_metrics  # noqa: E402
import toy_world  # noqa: E402
from lcm_generate import LORA_WEIGHT_NAME  # noqa: E402

PICTURE_PROMPTS = ("a red circle", "a yellow square", "a green triangle", "a blue circle", "a red triangle",
                   "a blue square")
STEP_COUNTS = (1, 2, 4)
SAMPLERS = {"ddim": "DDIM", "lcm": "LCM sampler", "tcd": "TCD, eta 0"}

# picture layout (pixels): a column per prompt, a row per model and step count, a gap between step-count groups
SCALE, GAP, GROUP_GAP, LABEL_WIDTH, HEADER = 3, 4, 14, 190, 34
CELL = toy_world.RESOLUTION * SCALE


def picture_size(num_rows, num_groups, num_prompts):
    """(width, height) of the comparison picture."""
    return (LABEL_WIDTH + num_prompts * (CELL + GAP),
            HEADER + num_rows * (CELL + GAP) + (num_groups - 1) * GROUP_GAP)


def picture_groups(rows):
    """The picture's rows in groups: first the teacher's rows at step counts no student has (its 50-step
    reference), then one group per student step count, the teacher's DDIM first."""
    student_steps = sorted({row["steps"] for row in rows if row["model"] != "teacher"})
    groups = [[row for row in rows if row["model"] == "teacher" and row["steps"] not in student_steps]]
    groups += [[row for row in rows if row["steps"] == steps] for steps in student_steps]
    return [group for group in groups if group]


def row_label(row):
    steps = f"{row['steps']} step" + ("s" if row["steps"] > 1 else "")
    reference = " (reference)" if row["model"] == "teacher" and row["steps"] == toy_metrics.TEACHER_STEPS else ""
    return f"{row['model']}\n{SAMPLERS.get(row['sampler'], row['sampler'])}, {steps}{reference}"


def comparison_picture(rows, prompts, images):
    """The labelled grid: a row per model and step count (``picture_groups``), a column per prompt; ``images`` maps
    id(row) to that row's pictures of ``prompts``."""
    groups = picture_groups(rows)
    num_rows = sum(len(group) for group in groups)
    canvas = Image.new("RGB", picture_size(num_rows, len(groups), len(prompts)), (255, 255, 255))
    painter = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    for c, prompt in enumerate(prompts):  # "a green triangle" is wider than a cell: colour and shape on two lines
        painter.multiline_text((LABEL_WIDTH + c * (CELL + GAP) + 2, 2), prompt.removeprefix("a ").replace(" ", "\n"),
                               fill=(0, 0, 0), font=font, spacing=2)
    y = HEADER
    for g, group in enumerate(groups):
        if g:
            y += GROUP_GAP
            painter.line((4, y - GROUP_GAP // 2 - 2, canvas.width - 4, y - GROUP_GAP // 2 - 2), fill=(170, 170, 170))
        for row in group:
            painter.multiline_text((4, y + CELL // 2 - 14), row_label(row), fill=(0, 0, 0), font=font, spacing=3)
            for c, image in enumerate(images[id(row)]):
                pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
                canvas.paste(Image.fromarray(pixels).resize((CELL, CELL), Image.NEAREST),
                             (LABEL_WIDTH + c * (CELL + GAP), y))
            y += CELL + GAP
    return canvas


def picture_images(rows, prompts, seeds_per_prompt):
    """Each row's pictures of ``prompts`` at their first noise, taken from the evaluation itself (its prompt p,
    noise 0 is sample index(p) * seeds_per_prompt), so the picture shows samples the tables count."""
    order = toy_world.full_prompts()
    picks = [order.index(prompt) * seeds_per_prompt for prompt in prompts]
    return {id(row): [row["images"][i] for i in picks] for row in rows}


def metric_rows(rows):
    keys = ("model", "sampler", "steps", "guidance", "accuracy", "accuracy_interval", "distance", "distance_interval")
    return [{k: row[k] for k in keys} for row in rows]


def paired_rows(rows):
    """Each student row minus the teacher's DDIM row at the same step count, sample by sample: mean difference of
    accuracy (up is better) and of distance (down is better) with 95% intervals."""
    teacher = {row["steps"]: row for row in rows if row["model"] == "teacher"}
    paired = []
    for row in rows:
        baseline = teacher.get(row["steps"])
        if row["model"] == "teacher" or baseline is None:
            continue
        accuracy, accuracy_interval = toy_metrics.paired_difference(row["correct"], baseline["correct"])
        distance, distance_interval = toy_metrics.paired_difference(row["distances"], baseline["distances"])
        paired.append({"model": row["model"], "baseline": "teacher DDIM", "steps": row["steps"],
                       "accuracy_difference": accuracy, "accuracy_difference_interval": list(accuracy_interval),
                       "distance_difference": distance, "distance_difference_interval": list(distance_interval)})
    return paired


def signed(value, interval):
    return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"


def paired_table(paired):
    lines = ["| model - teacher DDIM | steps | accuracy difference | distance difference |", "|---|---|---|---|"]
    lines += [f"| {p['model']} | {p['steps']} | {signed(p['accuracy_difference'], p['accuracy_difference_interval'])}"
              f" | {signed(p['distance_difference'], p['distance_difference_interval'])} |" for p in paired]
    return "\n".join(lines)


def lora_folder(path):
    """The folder of an LCM-LoRA at ``path`` (the folder, or its pytorch_lora_weights.safetensors), else None."""
    if os.path.basename(path) == LORA_WEIGHT_NAME and os.path.isfile(path):
        return os.path.dirname(path) or "."
    return path if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)) else None


def resolve_student(name, path, sampler=None, kind=None):
    """``{"name", "unet", "lora", "sampler", "scheduler_dir"}`` of a student path (a training output folder, a UNet
    folder, an LCM-LoRA folder or its weights file; ``kind`` "unet" or "lora" when the flag named it), or a
    ValueError with a one-line reason."""
    student = {"name": name, "unet": None, "lora": None, "sampler": sampler}
    if lora_folder(path):
        student.update(lora=lora_folder(path), scheduler_dir=os.path.join(lora_folder(path), "scheduler"))
    elif os.path.isfile(os.path.join(path, "unet_target", "config.json")):  # a full student's training output
        student.update(unet=os.path.join(path, "unet_target"), scheduler_dir=os.path.join(path, "scheduler"))
    elif os.path.isfile(os.path.join(path, "config.json")):
        student.update(unet=path, scheduler_dir=os.path.join(os.path.dirname(os.path.normpath(path)), "scheduler"))
    else:
        raise ValueError(f"{path} is not a student: expected a training output folder (with unet_target/), a UNet "
                         f"folder (with config.json) or an LCM-LoRA folder (with {LORA_WEIGHT_NAME})")
    if kind is not None and student[kind] is None:
        found, flag = ("an LCM-LoRA", "lora") if student["lora"] else ("a full student's UNet", "unet")
        raise ValueError(f"--{kind}: {path} holds {found}: pass it as --{flag}")
    return student


def parse_student(text):
    """``NAME=PATH[:SAMPLER]`` -> (name, path, sampler or None)."""
    name, separator, rest = text.partition("=")
    if not separator or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[:SAMPLER], got {text!r}")
    path, sampler = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and tail in ("lcm", "tcd"):
        path, sampler = head, tail
    elif colon and not os.path.exists(rest):
        raise argparse.ArgumentTypeError(f"unknown sampler {tail!r} in {text!r}: use lcm or tcd")
    return name, path, sampler


def saved_scheduler(scheduler_dir):
    """The scheduler config the training saved next to the student ({} when there is none)."""
    try:
        with open(os.path.join(scheduler_dir, "scheduler_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if config.get("_class_name") in ("LCMScheduler", "TCDScheduler") else {}


def sampling_settings(student, args):
    """The sampler and its scheduler arguments of a student: the flags when given, else what its training saved
    (a TCDScheduler is a PCM student's deterministic sampler), else LCM on a 50-point grid."""
    saved = saved_scheduler(student["scheduler_dir"])
    sampler = student["sampler"] or ("tcd" if saved.get("_class_name") == "TCDScheduler" else "lcm")
    grid = args.num_ddim_timesteps or saved.get("original_inference_steps") or 50
    scaling = args.timestep_scaling_factor or saved.get("timestep_scaling") or 10.0
    return sampler, {"num_ddim_timesteps": grid, "timestep_scaling": scaling}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "toy_teachers", "toy-sd"))
    parser.add_argument("--student", action="append", type=parse_student, default=[], metavar="NAME=PATH[:SAMPLER]",
                        help="a student to compare (repeatable): PATH a training output folder, a UNet folder or an "
                             "LCM-LoRA; SAMPLER lcm or tcd (default: from the scheduler saved with it)")
    parser.add_argument("--unet", default=None, help="full student UNet folder (OUTPUT/unet_target), named 'student'")
    parser.add_argument("--lora", default=None, help="LCM-LoRA folder or pytorch_lora_weights.safetensors, named "
                                                     "'student'")
    parser.add_argument("--num_ddim_timesteps", type=int, default=None,
                        help="the students' DDIM grid N (default: each student's saved scheduler, else 50)")
    parser.add_argument("--timestep_scaling_factor", type=float, default=None,
                        help="LCM boundary scaling (default: each student's saved scheduler, else 10)")
    parser.add_argument("--seeds_per_prompt", type=int, default=toy_metrics.SEEDS_PER_PROMPT,
                        help="noises per prompt in the tables (12 prompts each)")
    parser.add_argument("--output", default="comparison.png", help="the comparison picture (PNG)")
    parser.add_argument("--metrics_json", default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    if args.unet is not None and args.lora is not None:
        parser.error("give at most one of --unet and --lora (more students: --student NAME=PATH)")
    named = [("student", path, None, kind) for kind, path in (("unet", args.unet), ("lora", args.lora)) if path]
    named += [(name, path, sampler, None) for name, path, sampler in args.student]
    if not named:
        parser.error("give a student: --student NAME=PATH (repeatable), --unet or --lora")
    names = [name for name, *_ in named]
    if "teacher" in names or len(set(names)) < len(names):
        parser.error(f"student names must be distinct and not 'teacher', got {names}")
    if args.seeds_per_prompt < 1:
        parser.error(f"--seeds_per_prompt must be >= 1, got {args.seeds_per_prompt}")
    try:
        args.students = [resolve_student(*student) for student in named]
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    teacher = toy_metrics.load_pipeline(args.teacher)
    counts = {"seeds_per_prompt": args.seeds_per_prompt}
    reference, rows = toy_metrics.measure_teacher(teacher, steps=(*STEP_COUNTS, toy_metrics.TEACHER_STEPS), **counts)
    for student in args.students:
        pipeline, guidance = toy_metrics.load_student(args.teacher, student["unet"], student["lora"])
        sampler, scheduler_kwargs = sampling_settings(student, args)
        rows += toy_metrics.measure_student(pipeline, guidance, reference, name=student["name"], sampler=sampler,
                                            steps=STEP_COUNTS, **counts, **scheduler_kwargs)
    comparison_picture(rows, PICTURE_PROMPTS, picture_images(rows, PICTURE_PROMPTS, args.seeds_per_prompt)).save(
        args.output)
    samples = len(toy_metrics.eval_prompts(seeds_per_prompt=args.seeds_per_prompt))
    paired = paired_rows(rows)
    print(toy_metrics.table(metric_rows(rows), columns=("model", "sampler", "steps", "accuracy", "distance")))
    noises = f"{args.seeds_per_prompt} noise" + ("s" if args.seeds_per_prompt > 1 else "")
    print(f"accuracy: share of {samples} samples ({samples // args.seeds_per_prompt} prompts x {noises}) showing "
          f"the prompt's colour and shape; distance: RMS pixel distance to the teacher's {toy_metrics.TEACHER_STEPS}-"
          "step sample (lower is closer); [95% interval]")
    print()
    print(paired_table(paired))
    print(f"paired: each student minus the teacher's DDIM at the same step count on the same {samples} prompts and "
          "noises (accuracy up, distance down is better); an interval without 0 is a difference these samples show")
    print(f"wrote {args.output}")
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump({"samples": samples, "rows": metric_rows(rows), "paired_differences": paired}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
