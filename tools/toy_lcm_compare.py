#!/usr/bin/env python
"""Compare an LCM student with its toy teacher: one labelled picture and the metric table.

    python tools/toy_lcm_compare.py --teacher tools/toy_teachers/toy-sd --unet OUT/unet_target \
        --output OUT/comparison.png

Picture: a row per prompt; columns the teacher at 1, 2, 4 and 50 guided DDIM steps, then the student at
1, 2, 4 LCM steps, every cell from the same initial noise. Table (printed, and written as JSON with
``--metrics_json``): prompt accuracy of each column over the 12 prompts x 16 noises, and its distance to the
teacher's 50-step sample (see ``tools/toy_metrics.py``), each with its 95% interval. ``--unet`` is a full LCD student (its omega input
takes guidance - 1); ``--lora`` an LCM-LoRA file or folder (sampled with guidance 1, no CFG).
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_metrics  # noqa: E402
import toy_world  # noqa: E402

PICTURE_PROMPTS = ("a red circle", "a yellow square", "a green triangle", "a blue circle", "a red triangle",
                   "a blue square")


def comparison_picture(rows, prompts, scale=3, gap=4):
    """The labelled grid: one row per prompt (first noise), one column per measured row."""
    cell = toy_world.RESOLUTION * scale
    label_width, header = 120, 30
    width = label_width + len(rows) * (cell + gap)
    height = header + len(prompts) * (cell + gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    painter = ImageDraw.Draw(canvas)
    for c, row in enumerate(rows):
        x = label_width + c * (cell + gap)
        title = f"{row['model']}\n{row['steps']} {row['sampler'].upper()}"
        painter.multiline_text((x + 2, 2), title, fill=(0, 0, 0), spacing=2)
        for r in range(len(prompts)):
            pixels = (np.clip(row["images"][r], 0, 1) * 255).round().astype(np.uint8)
            picture = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            canvas.paste(picture, (x, header + r * (cell + gap)))
    for r, prompt in enumerate(prompts):
        painter.text((4, header + r * (cell + gap) + cell // 2 - 6), prompt, fill=(0, 0, 0))
    return canvas


def metric_rows(rows):
    keys = ("model", "sampler", "steps", "guidance", "accuracy", "accuracy_interval", "distance", "distance_interval")
    return [{k: row[k] for k in keys} for row in rows]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "toy_teachers", "toy-sd"))
    parser.add_argument("--unet", default=None, help="full LCD student UNet folder (OUTPUT/unet_target)")
    parser.add_argument("--lora", default=None, help="LCM-LoRA folder or pytorch_lora_weights.safetensors")
    parser.add_argument("--num_ddim_timesteps", type=int, default=50)
    parser.add_argument("--timestep_scaling_factor", type=float, default=10.0)
    parser.add_argument("--output", default="comparison.png", help="the comparison picture (PNG)")
    parser.add_argument("--metrics_json", default=None, help="also write the metric rows here")
    args = parser.parse_args(argv)
    if (args.unet is None) == (args.lora is None):
        parser.error("give exactly one of --unet and --lora")
    return args


def main(argv=None):
    args = parse_args(argv)
    teacher = toy_metrics.load_pipeline(args.teacher)
    student, guidance = toy_metrics.load_student(args.teacher, args.unet, args.lora)
    lcm = {"num_ddim_timesteps": args.num_ddim_timesteps, "timestep_scaling": args.timestep_scaling_factor}
    rows = toy_metrics.measure_lcm(teacher, student, guidance, **lcm)
    picture_rows = toy_metrics.measure_lcm(teacher, student, guidance, prompts=list(PICTURE_PROMPTS),
                                           seeds_per_prompt=1, **lcm)
    comparison_picture(picture_rows, PICTURE_PROMPTS).save(args.output)
    table = toy_metrics.table(metric_rows(rows), columns=("model", "sampler", "steps", "accuracy", "distance"))
    print(table)
    print(f"accuracy: share of {len(toy_metrics.eval_prompts())} samples showing the prompt's colour and shape; "
          f"distance: RMS pixel distance to the teacher's {toy_metrics.TEACHER_STEPS}-step sample (lower is closer); "
          "[95% interval]")
    print(f"wrote {args.output}")
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(metric_rows(rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
