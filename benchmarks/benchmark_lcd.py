#!/usr/bin/env python
"""Time Latent Consistency Distillation training steps of train_lcm_distill_sd_wds.py on a random-weight
pipeline of a preset, and report samples/s and peak memory.

Each configuration runs in its own process (so peak memory is its own): the script's own model set-up
(`load_models`, `make_student_unet`) and training step (`lcd_loss` + backward + AdamW + EMA update), on random
images and fixed captions, so data loading is not measured. The modes compare the teacher's classifier-free
guidance as ONE batched forward (what the script does) against two separate forwards (the reference scripts).

    python benchmarks/benchmark_lcd.py --preset tiny-sd --resolution 64 --batch_size 4 --steps 10
    python benchmarks/benchmark_lcd.py --preset sd15 --resolution 512 --batch_size 12 --mixed_precision fp16 \
        --device cuda --gradient_checkpointing
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-sd", help="make_random_pipeline preset")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--modes", default="batched,separate", help="teacher CFG modes to compare")
    parser.add_argument("--work_dir", default=str(REPO / "benchmarks" / "work"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare_assets(args):
    """The random pipeline of the preset, and one tiny shard so the script's argument checks pass."""
    from make_random_pipeline import build_pipeline

    work = Path(args.work_dir)
    pipeline_dir = work / args.preset
    if not (pipeline_dir / "model_index.json").is_file():
        build_pipeline(args.preset, str(pipeline_dir), seed=0, overwrite=True)
    shard = work / "dummy-00000.tar"
    if not shard.is_file():
        import tarfile

        with tarfile.open(shard, "w"):
            pass
    return pipeline_dir, shard


def peak_memory_gb(device):
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_child(args):
    import torch

    import train_lcm_distill_sd_wds as lcd

    pipeline_dir, shard = prepare_assets(args)
    script_args = lcd.parse_args([
        "--pretrained_teacher_model", str(pipeline_dir), "--train_shards_path_or_url", str(shard),
        "--max_train_steps", str(args.steps), "--resolution", str(args.resolution),
        "--train_batch_size", str(args.batch_size), "--output_dir", str(Path(args.work_dir) / "out"),
    ] + (["--use_8bit_adam"] if args.use_8bit_adam else []))
    device = torch.device(args.device)
    weight_dtype = lcd.weight_dtype_for(args.mixed_precision)
    torch.manual_seed(0)
    noise_scheduler, tokenizer, text_encoder, vae, teacher_unet, unet, target_unet = lcd.load_models(script_args)
    for frozen in (vae, text_encoder, teacher_unet, target_unet):
        frozen.requires_grad_(False)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    teacher_unet.to(device)
    target_unet.to(device)
    unet.to(device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    alphas_cumprod = noise_scheduler.alphas_cumprod
    solver = lcd.DDIMSolver(alphas_cumprod, noise_scheduler.config.num_train_timesteps,
                            script_args.num_ddim_timesteps).to(device)
    noise_scheduler.alphas_cumprod = alphas_cumprod.to(device)

    def autocast():
        return torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    ctx = lcd.LCDContext(
        unet=unet, teacher_unet=teacher_unet, target_unet=target_unet, noise_scheduler=noise_scheduler,
        solver=solver, alpha_schedule=alphas_cumprod.sqrt().to(device),
        sigma_schedule=(1 - alphas_cumprod).sqrt().to(device), prediction_type=noise_scheduler.config.prediction_type,
        w_embedding_dim=unet.config.time_cond_proj_dim, args=script_args, autocast=autocast,
        batched_teacher=args.child == "batched",
    )
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(unet.parameters(), lr=1e-6)
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    captions = [f"a photo of object number {i}" for i in range(args.batch_size)]
    uncond = lcd.encode_prompts(text_encoder, tokenizer, [""])

    def step():
        latents = lcd.encode_latents(vae, pixels, script_args.vae_encode_batch_size)
        prompt_embeds = lcd.encode_prompts(text_encoder, tokenizer, captions)
        loss = lcd.lcd_loss(ctx, latents, prompt_embeds, uncond.expand(args.batch_size, -1, -1))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lcd.update_ema(target_unet.parameters(), unet.parameters(), script_args.ema_decay)
        return loss.item()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "mode": args.child,
        "samples_per_s": args.batch_size * args.steps / elapsed,
        "s_per_step": elapsed / args.steps,
        "peak_memory_gb": peak_memory_gb(args.device),
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
    }))


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    prepare_assets(args)
    rows = []
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--child", mode] + [a for a in (argv or sys.argv[1:])]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"benchmark child {mode} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\npreset {args.preset}, {args.resolution}px, batch {args.batch_size}, {args.mixed_precision}, "
          f"device {args.device} ({platform.processor() or platform.machine()}), grad ckpt "
          f"{args.gradient_checkpointing}, {args.steps} timed steps after {args.warmup}, "
          f"UNet {rows[0]['unet_params_m']:.1f}M params\n")
    print(f"| teacher CFG | samples/s | s/step | {memory} (GB) |")
    print("|---|---|---|---|")
    for row in rows:
        label = "one batched pass (2B)" if row["mode"] == "batched" else "two passes (B + B)"
        print(f"| {label} | {row['samples_per_s']:.3f} | {row['s_per_step']:.3f} | {row['peak_memory_gb']:.2f} |")
    if len(rows) == 2:
        print(f"\nbatched / separate throughput: {rows[0]['samples_per_s'] / rows[1]['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
