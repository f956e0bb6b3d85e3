#!/usr/bin/env python
"""Time BK-SDM training steps and teacher-vs-student UNet inference on a random-weight pipeline of a preset.

Training (`--modes`, each in its own process so peak memory is its own): the script's own student derivation
and weight copy, `bk_sdm_loss` + backward + AdamW, VAE and text encoding included, on random images and fixed
captions (data loading not measured). A mode is a student name, `+gc` adds gradient checkpointing:
    bk_base, bk_small, bk_tiny, bk_small+gc, ...
`--precomputed` also times each training mode on precomputed latents (tools/precompute_latents.py): the step
samples the VAE posterior, encoded once before timing, through the script's `latents_from_batch` instead of
encoding the images (rows "precomputed: yes", and the speed-up). Both run in ONE process, their steps
interleaved (raw, precomputed, raw, ...), so that a load change on a shared machine slows both alike; peak
memory is then the pair's.

Inference (`--inference`): the latency of one classifier-free-guided UNet call (batch 2) of the teacher and of
each student, the part of sampling that block removal shrinks (x25 for a 25-step sampler).

    python benchmarks/benchmark_bk_sdm.py --preset tiny-sd --resolution 64 --batch_size 4
    python benchmarks/benchmark_bk_sdm.py --preset sd15 --resolution 512 --batch_size 16 --mixed_precision fp16 \
        --device cuda --modes bk_small,bk_small+gc --inference
    python benchmarks/benchmark_bk_sdm.py --preset small-sd --resolution 512 --batch_size 2 --modes bk_small \
        --precomputed
"""

import argparse
import functools
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "benchmarks")]

from benchmark_lcd import (  # noqa: E402
    add_common_arguments, latent_batch, peak_memory_gb, prepare_assets, time_interleaved, time_steps, weight_bytes,
)


def parse_args(argv=None):
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--modes", default="bk_base,bk_small,bk_tiny,bk_small+gc",
                        help="training configurations (see above); empty for none")
    parser.add_argument("--inference", action="store_true", help="also time teacher and student UNet calls")
    parser.add_argument("--precomputed", action="store_true", help="also time each mode on precomputed latents")
    return parser.parse_args(argv)


def load(args):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline_dir, _ = prepare_assets(args)
    torch.manual_seed(0)
    return (DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler"),
            CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder"),
            AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae"),
            UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet"))


def run_child_train(args):
    import torch

    import train_bk_sdm_kd as bk

    name, *options = args.child.split("+")
    device = torch.device(args.device)
    weight_dtype = bk.weight_dtype_for(args.mixed_precision)
    noise_scheduler, tokenizer, text_encoder, vae, teacher = load(args)
    student = bk.make_student_unet(teacher, name).to(device).train()
    if "gc" in options:
        student.enable_gradient_checkpointing()
    for frozen in (vae, text_encoder, teacher):
        frozen.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    pairs = bk.feature_pairs(student.config, teacher.config)
    ctx = bk.KDContext(
        unet=student, teacher_unet=teacher, noise_scheduler=noise_scheduler,
        student_features=bk.FeatureRecorder(student, [s for s, _ in pairs]),
        teacher_features=bk.FeatureRecorder(teacher, [t for _, t in pairs]), pairs=pairs,
        lambda_sd=1.0, lambda_kd_output=1.0, lambda_kd_feat=1.0,
        autocast=lambda: torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32),
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    captions = [f"a photo of object number {i}" for i in range(args.batch_size)]
    plain = "+".join([name] + [o for o in options if o != "pre"])
    batches = {plain: latent_batch(vae, pixels, False)}
    if "pre" in options:
        batches[f"{plain}+pre"] = latent_batch(vae, pixels, True)

    def step(batch):
        latents = bk.latents_from_batch(vae, batch, 32)
        prompt_embeds = bk.encode_prompts(text_encoder, tokenizer, captions)
        loss, _ = bk.bk_sdm_loss(ctx, latents, prompt_embeds)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    elapsed = time_interleaved(args, {mode: functools.partial(step, batch) for mode, batch in batches.items()},
                               device)
    return [{
        "mode": mode,
        "samples_per_s": args.batch_size * args.steps / seconds,
        "s_per_step": seconds / args.steps,
        "peak_memory_gb": peak_memory_gb(args.device),
        "unet_weights_gb": weight_bytes(student, teacher) / 2**30,
        "student_params_m": bk.count_parameters(student) / 1e6,
        "teacher_params_m": bk.count_parameters(teacher) / 1e6,
    } for mode, seconds in elapsed.items()]


def run_child_inference(args):
    import torch

    import train_bk_sdm_kd as bk

    device = torch.device(args.device)
    weight_dtype = bk.weight_dtype_for(args.mixed_precision)
    *_, teacher = load(args)
    latent_size = args.resolution // 8
    sample = torch.randn(2, 4, latent_size, latent_size, device=device, dtype=weight_dtype)
    embeds = torch.randn(2, 77, teacher.config.cross_attention_dim, device=device, dtype=weight_dtype)
    rows = []
    for name, unet in [("teacher", teacher)] + [(n, bk.make_student_unet(teacher, n)) for n in bk.UNET_CONFIG_NAMES]:
        unet = unet.to(device, dtype=weight_dtype).eval()

        def call():
            with torch.no_grad():
                unet(sample, 500, encoder_hidden_states=embeds)

        elapsed = time_steps(args, call, device)
        rows.append({"unet": name, "ms_per_call": 1000 * elapsed / args.steps,
                     "params_m": bk.count_parameters(unet) / 1e6})
        unet.to("cpu")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        result = run_child_inference(args) if args.child == "inference" else run_child_train(args)
        print(json.dumps(result))
        return
    prepare_assets(args)

    def child(mode):
        command = [sys.executable, __file__, "--child", mode] + list(argv or sys.argv[1:])
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"benchmark child {mode} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    print(f"\npreset {args.preset}, {args.resolution}px, batch {args.batch_size}, {args.mixed_precision}, device "
          f"{args.device} ({platform.processor() or platform.machine()}), {args.steps} timed after {args.warmup}\n")
    # with --precomputed one process times each mode on images and on precomputed latents
    rows = [row for mode in args.modes.split(",") if mode
            for row in child(f"{mode}+pre" if args.precomputed else mode)]
    if rows:
        memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS"
        print(f"training (teacher UNet {rows[0]['teacher_params_m']:.2f}M params)\n")
        print(f"| student | grad ckpt | precomputed latents | params (M) | samples/s | s/step | {memory} (GB) | "
              "UNet weights held (GB) |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            name, *options = row["mode"].split("+")
            print(f"| {name} | {'yes' if 'gc' in options else 'no'} | {'yes' if 'pre' in options else 'no'} | "
                  f"{row['student_params_m']:.2f} | "
                  f"{row['samples_per_s']:.3f} | {row['s_per_step']:.3f} | {row['peak_memory_gb']:.2f} | "
                  f"{row['unet_weights_gb']:.3f} |")
        by_mode = {row["mode"]: row for row in rows}
        for mode in by_mode:
            if f"{mode}+pre" in by_mode:
                ratio = by_mode[f"{mode}+pre"]["samples_per_s"] / by_mode[mode]["samples_per_s"]
                print(f"\n{mode}: precomputed latents / encoding each step: {ratio:.2f}x throughput")
    if args.inference:
        rows = child("inference")
        teacher_ms = rows[0]["ms_per_call"]
        print("\ninference: one CFG UNet call (batch 2)\n")
        print("| UNet | params (M) | ms per call | vs teacher |")
        print("|---|---|---|---|")
        for row in rows:
            print(f"| {row['unet']} | {row['params_m']:.2f} | {row['ms_per_call']:.1f} | "
                  f"{100 * (row['ms_per_call'] / teacher_ms - 1):+.0f}% |")


if __name__ == "__main__":
    main()
