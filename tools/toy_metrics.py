"""Outcome metrics on the toy world: does a model draw what its prompt asks, and what its teacher draws?

Used by the tests, the demo and ``benchmarks/benchmark_quality.py``; nothing here downloads anything.

* **prompt accuracy**: the share of samples that ``toy_world.classify`` finds showing the prompt's
  colour and shape (the 12 colour-and-shape prompts, ``SEEDS_PER_PROMPT`` fixed noises each);
* **distance to the teacher** (fidelity, lower is better): the root-mean-square pixel difference, in
  [0, 1] pixel units averaged over samples, between a sample and the teacher's 50-step guided DDIM
  sample from the same initial noise and prompt.

Samplers: ``"ddim"`` is DDIM with trailing timestep spacing (so 1 step starts at t=999, the fair
few-step baseline); ``"lcm"`` is diffusers' ``LCMScheduler`` with the distillation's skipping-step
schedule. A full LCD student takes its guidance through its omega embedding: the pipeline's
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
SEEDS_PER_PROMPT = 4
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
    from diffusers import DDIMScheduler, LCMScheduler

    config = pipeline.scheduler.config
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if sampler == "lcm":
        return LCMScheduler.from_config(config, original_inference_steps=num_ddim_timesteps,
                                        timestep_scaling=timestep_scaling)
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
                          generator=generator)
        images.append(np.asarray(output.images, dtype=np.float32))
    return np.concatenate(images)


def distance(images, reference):
    """Mean over samples of the RMS pixel difference (pixels in [0, 1])."""
    return float(np.sqrt(((np.asarray(images) - np.asarray(reference)) ** 2).mean(axis=(1, 2, 3))).mean())


def evaluate(pipeline, sampler, steps, guidance_scale, reference=None, prompts=None,
             seeds_per_prompt=SEEDS_PER_PROMPT, **scheduler_kwargs):
    """``{"accuracy", "distance" (None without a reference), "images"}`` of one sampler setting."""
    prompts = eval_prompts(prompts, seeds_per_prompt)
    noise = initial_noise(len(prompts))
    images = sample(pipeline, prompts, noise, sampler, steps, guidance_scale, **scheduler_kwargs)
    return {"accuracy": toy_world.prompt_accuracy(images, prompts),
            "distance": None if reference is None else distance(images, reference),
            "images": images}


def teacher_reference(pipeline, guidance_scale=TEACHER_GUIDANCE, prompts=None, seeds_per_prompt=SEEDS_PER_PROMPT):
    """The teacher's 50-step guided DDIM pictures every distance is measured against."""
    return evaluate(pipeline, "ddim", TEACHER_STEPS, guidance_scale, prompts=prompts,
                    seeds_per_prompt=seeds_per_prompt)["images"]


def load_student(teacher, unet=None, lora=None):
    """The teacher pipeline with the student in it, and the guidance scale the student samples with."""
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


def measure_lcm(teacher_pipe, student_pipe, student_guidance, prompts=None, seeds_per_prompt=SEEDS_PER_PROMPT,
            teacher_steps=(1, 2, 4, 50), student_steps=(1, 2, 4), **lcm_kwargs):
    """Rows ``{"model", "sampler", "steps", "guidance", "accuracy", "distance", "images"}`` of every column."""
    reference = teacher_reference(teacher_pipe, prompts=prompts, seeds_per_prompt=seeds_per_prompt)
    rows = []
    for steps in teacher_steps:
        result = evaluate(teacher_pipe, "ddim", steps, TEACHER_GUIDANCE, reference,
                                      prompts, seeds_per_prompt)
        rows.append(dict(result, model="teacher", sampler="ddim", steps=steps, guidance=TEACHER_GUIDANCE))
    for steps in student_steps:
        result = evaluate(student_pipe, "lcm", steps, student_guidance, reference, prompts,
                                      seeds_per_prompt, **lcm_kwargs)
        rows.append(dict(result, model="student", sampler="lcm", steps=steps, guidance=student_guidance))
    return rows


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


def table(rows, columns=("model", "sampler", "steps", "accuracy", "distance")):
    """A markdown table of result dicts."""
    def cell(value):
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
