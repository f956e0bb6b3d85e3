"""Outcome metrics on the toy world: does a model draw what its prompt asks, and what its teacher draws?

Used by the tests, the demo and ``benchmarks/benchmark_quality.py``; nothing here downloads anything.

* **prompt accuracy**: the share of samples that ``toy_world.classify`` finds showing the prompt's
  colour and shape (the 12 colour-and-shape prompts, ``SEEDS_PER_PROMPT`` fixed noises each), with its 95%
  Wilson interval;
* **distance to the teacher** (fidelity, lower is better): the root-mean-square pixel difference, in
  [0, 1] pixel units averaged over samples, between a sample and the teacher's 50-step guided DDIM
  sample from the same initial noise and prompt, with the 95% interval of the mean.

192 samples (16 noises a prompt) is the default: an accuracy near 0.5 is then known to about +-0.07; 48 samples
gave +-0.14, more than the gaps between the models compared. Every model sees the same prompts and noises, so
two models are best compared sample by sample (``paired_difference``), which removes the noises' share of the
spread.

Samplers: ``"ddim"`` is DDIM with trailing timestep spacing (so 1 step starts at t=999, the fair
few-step baseline); ``"lcm"`` is diffusers' ``LCMScheduler`` with the distillation's skipping-step
schedule; ``"tcd"`` is ``TCDScheduler`` with gamma (eta) 0 on the same grid, the deterministic sampler of a
Phased Consistency (PCM) student, whose steps land on its phase edges. A full LCD student takes its guidance through its omega embedding: the pipeline's
``guidance_scale`` g feeds omega = g - 1, and a student trained at omega matches the teacher guided with
g = omega + 1. An LCM-LoRA student has no omega input and samples with guidance 1 (no CFG). The LCM
multistep sampler re-noises between steps, so its 2- and 4-step samples leave the teacher's
deterministic trajectory by design: distance is the sharp test at 1 and 2 steps, accuracy at every count.
"""

import logging
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# diffusers' pipelines ask transformers for image processors, which without torchvision announce a fallback these
# tools never use (the training scripts silence the same notice)
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

import toy_world  # noqa: E402

TEACHER_GUIDANCE = 4.0  # the teachers' guidance scale; LCD students are trained at omega = 3
SEEDS_PER_PROMPT = 16
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
NOISE_SEED = 1234
TEACHER_STEPS = 50


def load_pipeline(path, unet=None, dtype=torch.float32):
    """The toy teacher at ``path`` (SD or SDXL, read from model_index.json) on the CPU, optionally with
    another UNet (a distilled or block-removed student); progress bars off."""
    import json

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    with open(os.path.join(path, "model_index.json")) as f:
        class_name = json.load(f)["_class_name"]
    cls = StableDiffusionXLPipeline if class_name == "StableDiffusionXLPipeline" else StableDiffusionPipeline
    extra = {"unet": unet} if unet is not None else {}
    if cls is StableDiffusionPipeline:
        extra.update(safety_checker=None, requires_safety_checker=False)
    pipeline = cls.from_pretrained(path, dtype=dtype, **extra)  # torch_dtype is deprecated in diffusers 0.42
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def eval_prompts(prompts=None, seeds_per_prompt=SEEDS_PER_PROMPT):
    """The evaluation prompts, each repeated ``seeds_per_prompt`` times (one noise each)."""
    prompts = prompts or toy_world.full_prompts()
    return [p for p in prompts for _ in range(seeds_per_prompt)]


def initial_noise(count, seed=NOISE_SEED, channels=4, size=8):
    return torch.randn((count, channels, size, size), generator=torch.Generator().manual_seed(seed))


def make_scheduler(pipeline, sampler, num_ddim_timesteps=50, timestep_scaling=10.0):
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    config = pipeline.scheduler.config
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if sampler == "lcm":
        return LCMScheduler.from_config(config, original_inference_steps=num_ddim_timesteps,
                                        timestep_scaling=timestep_scaling)
    if sampler == "tcd":  # deterministic with the pipelines' default eta = 0, which `sample` passes explicitly
        return TCDScheduler.from_config(config, original_inference_steps=num_ddim_timesteps)
    raise ValueError(f"unknown sampler {sampler!r}")


@torch.no_grad()
def sample(pipeline, prompts, noise, sampler, steps, guidance_scale, batch_size=48, **scheduler_kwargs):
    """Pictures (N x H x W x 3 floats in [0, 1]) of ``prompts`` from the initial ``noise``."""
    pipeline.scheduler = make_scheduler(pipeline, sampler, **scheduler_kwargs)
    size = noise.shape[-1] * pipeline.vae_scale_factor
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generator = torch.Generator().manual_seed(NOISE_SEED + start)  # the LCM sampler's re-noising
        output = pipeline(prompts[chunk], latents=noise[chunk].to(pipeline.unet.dtype), height=size, width=size,
                          num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
                          generator=generator, eta=0.0)
        images.append(np.asarray(output.images, dtype=np.float32))
    return np.concatenate(images)


def sample_distances(images, reference):
    """The RMS pixel difference (pixels in [0, 1]) of each sample from its reference."""
    return np.sqrt(((np.asarray(images) - np.asarray(reference)) ** 2).mean(axis=(1, 2, 3)))


def distance(images, reference):
    """Mean over samples of the RMS pixel difference (pixels in [0, 1])."""
    return float(sample_distances(images, reference).mean())


def wilson_interval(successes, count, z=Z95):
    """The 95% Wilson score interval of a share: unlike the normal one it stays inside [0, 1] and keeps its
    coverage near 0 and 1."""
    if count == 0:
        return (0.0, 1.0)
    share = successes / count
    centre = (share + z * z / (2 * count)) / (1 + z * z / count)
    half = z / (1 + z * z / count) * np.sqrt(share * (1 - share) / count + z * z / (4 * count * count))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends where rounding would miss them
    high = 1.0 if successes == count else min(1.0, centre + half)
    return (float(low), float(high))


def mean_interval(values, z=Z95):
    """The mean of per-sample values and its 95% interval (normal approximation, fine from about 30 samples)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    half = float(z * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("inf")
    return mean, (mean - half, mean + half)


def paired_difference(values, baseline_values):
    """Mean of ``values - baseline_values`` over the same samples (same prompts and noises) and its 95% interval:
    whether one model beats another on these samples, without the spread the noises cause in both."""
    return mean_interval(np.asarray(values, dtype=np.float64) - np.asarray(baseline_values, dtype=np.float64))


def evaluate(pipeline, sampler, steps, guidance_scale, reference=None, prompts=None,
             seeds_per_prompt=SEEDS_PER_PROMPT, **scheduler_kwargs):
    """One sampler setting: ``accuracy`` and its ``accuracy_interval``, ``distance`` and ``distance_interval``
    (None without a reference), the per-sample ``correct`` (bools) and ``distances`` that paired comparisons
    need, and the ``images``."""
    prompts = eval_prompts(prompts, seeds_per_prompt)
    noise = initial_noise(len(prompts))
    images = sample(pipeline, prompts, noise, sampler, steps, guidance_scale, **scheduler_kwargs)
    correct = [bool(toy_world.shows_prompt(image, prompt)) for image, prompt in zip(images, prompts)]
    result = {"accuracy": sum(correct) / len(correct), "accuracy_interval": wilson_interval(sum(correct), len(correct)),
              "correct": correct, "distance": None, "distance_interval": None, "distances": None, "images": images}
    if reference is not None:
        distances = sample_distances(images, reference)
        result["distance"], result["distance_interval"] = mean_interval(distances)
        result["distances"] = [float(d) for d in distances]
    return result


def teacher_reference(pipeline, guidance_scale=TEACHER_GUIDANCE, prompts=None, seeds_per_prompt=SEEDS_PER_PROMPT):
    """The teacher's 50-step guided DDIM pictures every distance is measured against."""
    return evaluate(pipeline, "ddim", TEACHER_STEPS, guidance_scale, prompts=prompts,
                    seeds_per_prompt=seeds_per_prompt)["images"]


def load_student(teacher, unet=None, lora=None):
    """The teacher pipeline with the student in it, and the guidance scale the student samples with (LCD and PCM
    alike: a full student's omega input takes the teacher's guidance, an adapter samples without CFG)."""
    from diffusers import UNet2DConditionModel

    if (unet is None) == (lora is None):
        raise ValueError("give exactly one of unet (a full LCD student) and lora (an LCM-LoRA)")
    if unet is not None:
        student = load_pipeline(teacher, unet=UNet2DConditionModel.from_pretrained(unet))
        return student, TEACHER_GUIDANCE
    student = load_pipeline(teacher)
    student.load_lora_weights(lora)
    student.fuse_lora()
    return student, 1.0


def measure_teacher(teacher_pipe, prompts=None, seeds_per_prompt=SEEDS_PER_PROMPT, steps=(1, 2, 4, 50)):
    """The reference pictures and the teacher's rows (guided DDIM at each step count) every student is measured
    against."""
    reference = teacher_reference(teacher_pipe, prompts=prompts, seeds_per_prompt=seeds_per_prompt)
    rows = [dict(evaluate(teacher_pipe, "ddim", count, TEACHER_GUIDANCE, reference, prompts, seeds_per_prompt),
                 model="teacher", sampler="ddim", steps=count, guidance=TEACHER_GUIDANCE) for count in steps]
    return reference, rows


def measure_student(student_pipe, student_guidance, reference, name="student", sampler="lcm", prompts=None,
                    seeds_per_prompt=SEEDS_PER_PROMPT, steps=(1, 2, 4), **scheduler_kwargs):
    """Rows of a student at each step count, on the teacher's prompts and noises (``reference`` from
    ``measure_teacher``)."""
    return [dict(evaluate(student_pipe, sampler, count, student_guidance, reference, prompts, seeds_per_prompt,
                          **scheduler_kwargs), model=name, sampler=sampler, steps=count, guidance=student_guidance)
            for count in steps]


def measure_lcm(teacher_pipe, student_pipe, student_guidance, prompts=None, seeds_per_prompt=SEEDS_PER_PROMPT,
                teacher_steps=(1, 2, 4, 50), student_steps=(1, 2, 4), sampler="lcm", **scheduler_kwargs):
    """Rows ``{"model", "sampler", "steps", "guidance", "accuracy", "distance", ..., "images"}`` of every column:
    the teacher's guided DDIM, then the student (``sampler`` "lcm", or "tcd" for a PCM student)."""
    reference, rows = measure_teacher(teacher_pipe, prompts, seeds_per_prompt, teacher_steps)
    return rows + measure_student(student_pipe, student_guidance, reference, sampler=sampler, prompts=prompts,
                                  seeds_per_prompt=seeds_per_prompt, steps=student_steps, **scheduler_kwargs)


def measure_bk_student(teacher_pipe, student_unet_dir, reference, steps=TEACHER_STEPS, prompts=None,
                       seeds_per_prompt=SEEDS_PER_PROMPT):
    """A block-removed student in the teacher's pipeline, sampled with the teacher's settings
    (``steps`` guided DDIM steps): ``{"accuracy", "distance", "images"}``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(student_unet_dir)
    student = load_pipeline(teacher_pipe.name_or_path, unet=unet)
    return evaluate(student, "ddim", steps, TEACHER_GUIDANCE, reference, prompts, seeds_per_prompt)


DREAMBOOTH_STEPS = 25
DREAMBOOTH_SAMPLES = 16


def measure_dreambooth(base_dir, lora_dir, samples=DREAMBOOTH_SAMPLES, steps=DREAMBOOTH_STEPS):
    """What a DreamBooth LoRA learned and what it kept, sampled with guided DDIM from fixed noises:

    * ``subject``: share of ``SUBJECT_PROMPT`` samples showing the subject's colour (magenta, which the
      teacher never draws), after and (``subject_base``) before the LoRA;
    * ``class_drift``: distance of the class prompt's samples from the base model's (same noises), and
      ``class_subject_share``: how many of them turned into the subject (language drift).
    """
    base = load_pipeline(base_dir)
    tuned = load_pipeline(base_dir)
    tuned.load_lora_weights(lora_dir)
    noise = initial_noise(samples, seed=NOISE_SEED + 1)
    subject_prompts = [toy_world.SUBJECT_PROMPT] * samples
    class_prompts = [toy_world.CLASS_PROMPT] * samples
    shows_subject = lambda images: sum(  # noqa: E731
        toy_world.classify(i)[0] == toy_world.SUBJECT_COLOR for i in images) / samples
    base_subject = sample(base, subject_prompts, noise, "ddim", steps, TEACHER_GUIDANCE)
    tuned_subject = sample(tuned, subject_prompts, noise, "ddim", steps, TEACHER_GUIDANCE)
    base_class = sample(base, class_prompts, noise, "ddim", steps, TEACHER_GUIDANCE)
    tuned_class = sample(tuned, class_prompts, noise, "ddim", steps, TEACHER_GUIDANCE)
    return {"subject": shows_subject(tuned_subject), "subject_base": shows_subject(base_subject),
            "class_accuracy": toy_world.prompt_accuracy(tuned_class, class_prompts),
            "class_accuracy_base": toy_world.prompt_accuracy(base_class, class_prompts),
            "class_drift": distance(tuned_class, base_class), "class_subject_share": shows_subject(tuned_class),
            "images": {"subject": tuned_subject, "class": tuned_class, "class_base": base_class}}


@torch.no_grad()
def reconstruction_accuracy(vae, num_images=120, seed=99):
    """Share of freshly drawn pictures (teacher colours and the DreamBooth subject's) still classified
    correctly after a VAE round trip: a readable VAE scores 1.0."""
    import random

    rng = random.Random(seed)
    colors = toy_world.TEACHER_COLORS + (toy_world.SUBJECT_COLOR,)
    cases = [(rng.choice(colors), rng.choice(toy_world.SHAPES)) for _ in range(num_images)]
    images = [toy_world.draw(color, shape, rng) for color, shape in cases]
    pixels = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 127.5 - 1 for i in images]))
    decoded = vae.decode(vae.encode(pixels.permute(0, 3, 1, 2).to(vae.dtype)).latent_dist.mean).sample
    decoded = ((decoded.float().permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    return sum(toy_world.classify(d) == case for d, case in zip(decoded, cases)) / num_images


def with_interval(value, interval, digits=3):
    """``0.646 [0.576, 0.710]``: a figure with its 95% interval."""
    if value is None:
        return "-"
    if interval is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def table(rows, columns=("model", "sampler", "steps", "accuracy", "distance")):
    """A markdown table of result dicts; a figure with an ``<name>_interval`` entry is printed with it."""
    def cell(row, column):
        value = row.get(column)
        if value is None:
            return "-"
        if isinstance(value, float):
            return with_interval(value, row.get(f"{column}_interval"))
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


SERIES_COLORS = ((200, 40, 40), (40, 80, 200), (40, 150, 60), (200, 120, 0), (140, 40, 170), (0, 150, 160),
                 (120, 120, 120), (0, 0, 0))


def nice_ticks(low, high, count=5):
    """About ``count`` round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    span = max(high - low, 1e-9)
    raw = span / max(count - 1, 1)
    power = 10 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = np.floor(low / step) * step
    ticks = [round(float(first + i * step), 10) for i in range(int(np.ceil((high - first) / step)) + 1)]
    return [t for t in ticks if low - 1e-9 <= t <= high + 1e-9] or [low, high]


def _dashed_line(painter, start, end, color, dash=6, gap=4, width=1):
    (x0, y0), (x1, y1) = start, end
    length = max(abs(x1 - x0), abs(y1 - y0))
    position = 0.0
    while position < length:
        stop = min(position + dash, length)
        painter.line((x0 + (x1 - x0) * position / length, y0 + (y1 - y0) * position / length,
                      x0 + (x1 - x0) * stop / length, y0 + (y1 - y0) * stop / length), fill=color, width=width)
        position = stop + gap


def line_chart(panels, path, columns=3, panel_size=(430, 300), title=None):
    """Panels of curves that read on their own, drawn with PIL (no plotting package needed), saved to ``path``.

    Each panel: ``{"title", "xlabel", "series": [{"label", "points": [(x, y, (low, high) or None)]}],
    "references": [{"label", "y"}]}``, optionally ``"ylim"``. Series share colours across panels by label and
    are drawn with their 95% intervals as whiskers; references are dashed horizontal lines (the teacher's DDIM
    figures), labelled at their right end. One legend for the figure, below the panels."""
    from PIL import Image, ImageDraw, ImageFont

    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    labels = list(dict.fromkeys(s["label"] for panel in panels for s in panel["series"]))
    colors = {label: SERIES_COLORS[i % len(SERIES_COLORS)] for i, label in enumerate(labels)}
    width, height = panel_size
    rows = (len(panels) + columns - 1) // columns
    legend_rows = (len(labels) + 2) // 3 + 1
    top_title = 26 if title else 0
    canvas = Image.new("RGB", (columns * width, top_title + rows * height + 10 + legend_rows * 18), "white")
    painter = ImageDraw.Draw(canvas)
    if title:
        painter.text((10, 6), title, fill="black", font=font)
    for p, panel in enumerate(panels):
        ox, oy = (p % columns) * width, top_title + (p // columns) * height
        left, top, right, bottom = ox + 62, oy + 26, ox + width - 92, oy + height - 46
        xs = [pt[0] for s in panel["series"] for pt in s["points"]] or [0, 1]
        ys = [v for s in panel["series"] for pt in s["points"] for v in (pt[1], *(pt[2] or ()))]
        ys += [ref["y"] for ref in panel.get("references", ())]
        low, high = panel.get("ylim") or (min(ys), max(ys))
        if high - low < 1e-9:
            low, high = low - 0.05, high + 0.05
        y_ticks = nice_ticks(low, high)
        low, high = min(low, y_ticks[0]), max(high, y_ticks[-1])
        x_low, x_high = min(xs), max(xs)
        if x_high == x_low:
            x_low, x_high = x_low - 1, x_high + 1
        pad = 0.04 * (x_high - x_low)  # points and whiskers at the ends stay inside the frame
        x_low, x_high = x_low - pad, x_high + pad

        def to_px(x, y):
            return (left + (x - x_low) / (x_high - x_low) * (right - left),
                    bottom - (y - low) / (high - low) * (bottom - top))

        painter.text((left, oy + 6), panel["title"], fill="black", font=font)
        for tick in y_ticks:
            _, y = to_px(x_low, tick)
            painter.line((left + 1, y, right - 1, y), fill=(235, 235, 235))
            painter.line((left - 4, y, left, y), fill="black")
            painter.text((left - 8, y), f"{tick:g}", fill="black", font=small, anchor="rm")
        painter.rectangle((left, top, right, bottom), outline="black")
        for tick in nice_ticks(min(xs), max(xs), 6):
            x, _ = to_px(tick, low)
            painter.line((x, bottom, x, bottom + 4), fill="black")
            painter.text((x, bottom + 6), f"{tick:g}", fill="black", font=small, anchor="mt")
        painter.text(((left + right) / 2, bottom + 22), panel.get("xlabel", ""), fill="black", font=small, anchor="mt")
        label_ys = []
        for ref in sorted(panel.get("references", ()), key=lambda r: -r["y"]):
            _, y = to_px(x_low, ref["y"])
            _dashed_line(painter, (left, y), (right, y), (90, 90, 90))
            label_y = max([y] + [other + 13 for other in label_ys])  # labels of close lines stack downwards
            label_ys.append(label_y)
            painter.text((right + 4, label_y), ref["label"], fill=(60, 60, 60), font=small, anchor="lm")
        for series in panel["series"]:
            color = colors[series["label"]]
            points = sorted(series["points"], key=lambda pt: pt[0])
            pixels = [to_px(x, y) for x, y, _ in points]
            if len(pixels) > 1:
                painter.line(pixels, fill=color, width=2)
            for (x, y, interval), (px, py) in zip(points, pixels):
                if interval is not None:
                    _, y_low = to_px(x, interval[0])
                    _, y_high = to_px(x, interval[1])
                    painter.line((px, y_low, px, y_high), fill=color)
                    painter.line((px - 3, y_low, px + 3, y_low), fill=color)
                    painter.line((px - 3, y_high, px + 3, y_high), fill=color)
                painter.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    legend_top = top_title + rows * height + 6
    entries = [(label, colors[label]) for label in labels] + [("teacher (dashed; labelled at the right)", None)]
    for i, (label, color) in enumerate(entries):
        x, y = 12 + (i % 3) * (columns * width // 3), legend_top + (i // 3) * 18
        if color is None:
            _dashed_line(painter, (x, y + 7), (x + 24, y + 7), (90, 90, 90))
        else:
            painter.line((x, y + 7, x + 24, y + 7), fill=color, width=2)
            painter.ellipse((x + 9, y + 4, x + 15, y + 10), fill=color)
        painter.text((x + 30, y), label, fill="black", font=small)
    canvas.save(path)
    return path
