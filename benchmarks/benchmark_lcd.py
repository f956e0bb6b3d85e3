#!/usr/bin/env python
"""Time Latent Consistency Distillation training steps on a random-weight pipeline of a preset, and report
samples/s, peak memory and the bytes of model weights held.

Each configuration runs in its own process (so peak memory is its own), with the scripts' own model set-up and
training step, on random images and fixed captions, so data loading is not measured. Modes:
  batched   train_lcm_distill_sd_wds.py: `lcd_loss` + backward + AdamW + EMA; teacher CFG as ONE 2B forward
  separate  the same with two teacher forwards (B + B), as the reference scripts do
  lora      train_lcm_distill_lora_sd_wds.py: `lcd_loss` + backward + AdamW on the LoRA weights; one UNet
  xl-full   train_lcm_distill_sdxl_wds.py, full mode (an SDXL preset: tiny-sdxl, sdxl)
  xl-lora   train_lcm_distill_sdxl_wds.py --use_lora
`--precomputed` also times each mode on precomputed latents (tools/precompute_latents.py): the step samples the
VAE posterior, encoded once before timing, through the scripts' `latents_from_batch` instead of encoding the
images (modes batched, separate; rows "+ precomputed latents" and the speed-up). Both run in ONE process, their
steps interleaved (raw, precomputed, raw, ...), so that a load change on a shared machine slows both alike;
peak memory is then the pair's.

    python benchmarks/benchmark_lcd.py --preset tiny-sd --resolution 64 --batch_size 4 --steps 10
    python benchmarks/benchmark_lcd.py --preset sd15 --resolution 512 --batch_size 12 --mixed_precision fp16 \
        --device cuda --gradient_checkpointing
    python benchmarks/benchmark_lcd.py --preset small-sd --resolution 512 --batch_size 2 --modes batched --precomputed
    python benchmarks/benchmark_lcd.py --preset sdxl --modes xl-full,xl-lora --resolution 1024 --batch_size 1 \
        --mixed_precision fp16 --device cuda --gradient_checkpointing --use_8bit_adam
"""

import argparse
import functools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]


def add_common_arguments(parser):
    """Flags every benchmark in this folder takes (each adds --batch_size and --modes of its own)."""
    parser.add_argument("--preset", default="tiny-sd", help="make_random_pipeline preset")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work_dir", default=str(REPO / "benchmarks" / "work"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--modes", default="batched,separate,lora", help="configurations to compare (see above)")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--precomputed", action="store_true",
                        help="also time each mode on precomputed latents (modes batched and separate)")
    return parser.parse_args(argv)


def latent_batch(vae, pixels, precomputed):
    """What a training step reads: the images, or (precomputed) their VAE posterior, encoded here once."""
    import torch

    if not precomputed:
        return {"pixel_values": pixels}
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    return {"latent_mean": dist.mean.float(), "latent_std": dist.std.float()}


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


def weight_bytes(*models):
    """Bytes of parameters and buffers held by these models (each tensor counted once)."""
    seen, total = set(), 0
    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def time_interleaved(args, steps, device):
    """{name: seconds of args.steps calls of steps[name]}, the calls interleaved (a, b, a, b, ...) after
    args.warmup calls of each: a load change on a shared machine slows every configuration alike."""
    import torch

    for _ in range(args.warmup):
        for step in steps.values():
            step()
    elapsed = dict.fromkeys(steps, 0.0)
    for _ in range(args.steps):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed[name] += time.perf_counter() - started
    return elapsed


def time_steps(args, step, device):
    import torch

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run_child_lora(args):
    import torch

    import train_lcm_distill_lora_sd_wds as lora

    pipeline_dir, shard = prepare_assets(args)
    script_args = lora.parse_args([
        "--pretrained_teacher_model", str(pipeline_dir), "--train_shards_path_or_url", str(shard),
        "--max_train_steps", str(args.steps), "--resolution", str(args.resolution), "--lora_rank", str(args.lora_rank),
        "--train_batch_size", str(args.batch_size), "--output_dir", str(Path(args.work_dir) / "out"),
    ] + (["--use_8bit_adam"] if args.use_8bit_adam else []))
    device = torch.device(args.device)
    weight_dtype = lora.weight_dtype_for(args.mixed_precision)
    torch.manual_seed(0)
    noise_scheduler, tokenizer, text_encoder, vae, unet = lora.load_models(script_args, weight_dtype)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    unet.to(device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    def autocast():
        return torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    ctx = lora.make_lcd_context(script_args, noise_scheduler, unet, teacher_unet=unet, target_unet=unet,
                                w_embedding_dim=0, device=device, autocast=autocast,
                                teacher_is_student_without_adapters=True)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = lora.make_optimizer(script_args, lora_params, 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    captions = [f"a photo of object number {i}" for i in range(args.batch_size)]
    uncond = lora.encode_prompts(text_encoder, tokenizer, [""])

    def step():
        latents = lora.encode_latents(vae, pixels, script_args.vae_encode_batch_size)
        prompt_embeds = lora.encode_prompts(text_encoder, tokenizer, captions)
        loss = lora.lcd_loss(ctx, latents, {"encoder_hidden_states": prompt_embeds},
                             {"encoder_hidden_states": uncond.expand(args.batch_size, -1, -1)})
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    elapsed = time_steps(args, step, device)
    print(json.dumps({
        "mode": args.child,
        "samples_per_s": args.batch_size * args.steps / elapsed,
        "s_per_step": elapsed / args.steps,
        "peak_memory_gb": peak_memory_gb(args.device),
        "unet_weights_gb": weight_bytes(unet) / 2**30,
        "trainable_m": sum(p.numel() for p in lora_params) / 1e6,
        "unet_params_m": sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n) / 1e6,
    }))


def run_child_xl(args):
    import torch

    import train_lcm_distill_sdxl_wds as xl

    use_lora = args.child == "xl-lora"
    pipeline_dir, shard = prepare_assets(args)
    script_args = xl.parse_args([
        "--pretrained_teacher_model", str(pipeline_dir), "--train_shards_path_or_url", str(shard),
        "--max_train_steps", str(args.steps), "--resolution", str(args.resolution),
        "--train_batch_size", str(args.batch_size), "--output_dir", str(Path(args.work_dir) / "out"),
    ] + (["--use_lora", "--lora_rank", str(args.lora_rank)] if use_lora else [])
      + (["--use_8bit_adam"] if args.use_8bit_adam else []))
    device = torch.device(args.device)
    weight_dtype = xl.weight_dtype_for(args.mixed_precision)
    torch.manual_seed(0)
    noise_scheduler, tokenizers, text_encoders, vae, teacher_unet, unet, target_unet = xl.load_models(
        script_args, weight_dtype)
    for frozen in (vae, *text_encoders, teacher_unet, target_unet):
        if frozen is not None:
            frozen.requires_grad_(False)
    vae.to(device)  # fp32, as the script does without an fp16-safe VAE
    for text_encoder in text_encoders:
        text_encoder.to(device, dtype=weight_dtype)
    unet.to(device).train()
    if teacher_unet is not None:
        teacher_unet.to(device)
        target_unet.to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    def autocast():
        return torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    ctx = xl.make_lcd_context(script_args, noise_scheduler, unet, teacher_unet=unet if use_lora else teacher_unet,
                              target_unet=unet if use_lora else target_unet,
                              w_embedding_dim=0 if use_lora else unet.config.time_cond_proj_dim, device=device,
                              autocast=autocast, teacher_is_student_without_adapters=use_lora)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = xl.make_optimizer(script_args, trainable, script_args.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    captions = [f"a photo of object number {i}" for i in range(args.batch_size)]
    sizes = torch.full((args.batch_size, 2), args.resolution)
    time_ids = xl.compute_time_ids(sizes, torch.zeros_like(sizes), args.resolution).to(device)

    def step():
        latents = xl.encode_latents(vae, pixels, script_args.vae_encode_batch_size)
        cond = xl.unet_conditioning(*xl.encode_prompts_sdxl(text_encoders, tokenizers, captions), time_ids)
        loss = xl.lcd_loss(ctx, latents, cond, xl.unconditional_conditioning(cond))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not use_lora:
            xl.update_ema(target_unet.parameters(), unet.parameters(), script_args.ema_decay)
        return loss.item()

    elapsed = time_steps(args, step, device)
    held = (unet,) if use_lora else (unet, teacher_unet, target_unet)
    print(json.dumps({
        "mode": args.child,
        "samples_per_s": args.batch_size * args.steps / elapsed,
        "s_per_step": elapsed / args.steps,
        "peak_memory_gb": peak_memory_gb(args.device),
        "unet_weights_gb": weight_bytes(*held) / 2**30,
        "trainable_m": sum(p.numel() for p in trainable) / 1e6,
        "unet_params_m": sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n) / 1e6,
    }))


def run_child(args):
    if args.child == "lora":
        return run_child_lora(args)
    if args.child.startswith("xl-"):
        return run_child_xl(args)
    import torch

    import train_lcm_distill_sd_wds as lcd

    mode, _, option = args.child.partition("+")
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

    def autocast():
        return torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    ctx = lcd.make_lcd_context(script_args, noise_scheduler, unet, teacher_unet, target_unet,
                               w_embedding_dim=unet.config.time_cond_proj_dim, device=device, autocast=autocast,
                               batched_teacher=mode == "batched")
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(unet.parameters(), lr=1e-6)  # the script's make_optimizer: same class
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    captions = [f"a photo of object number {i}" for i in range(args.batch_size)]
    uncond = lcd.encode_prompts(text_encoder, tokenizer, [""])
    batches = {mode: latent_batch(vae, pixels, False)}
    if option == "pre":
        batches[f"{mode}+pre"] = latent_batch(vae, pixels, True)

    def step(batch):
        latents = lcd.latents_from_batch(vae, batch, script_args.vae_encode_batch_size)
        prompt_embeds = lcd.encode_prompts(text_encoder, tokenizer, captions)
        loss = lcd.lcd_loss(ctx, latents, {"encoder_hidden_states": prompt_embeds},
                            {"encoder_hidden_states": uncond.expand(args.batch_size, -1, -1)})
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lcd.update_ema(target_unet.parameters(), unet.parameters(), script_args.ema_decay)
        return loss.item()

    elapsed = time_interleaved(args, {name: functools.partial(step, batch) for name, batch in batches.items()},
                               device)
    print(json.dumps([{
        "mode": name,
        "samples_per_s": args.batch_size * args.steps / seconds,
        "s_per_step": seconds / args.steps,
        "peak_memory_gb": peak_memory_gb(args.device),
        "unet_weights_gb": weight_bytes(unet, teacher_unet, target_unet) / 2**30,
        "trainable_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "unet_params_m": sum(p.numel() for p in teacher_unet.parameters()) / 1e6,
    } for name, seconds in elapsed.items()]))


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    prepare_assets(args)
    rows = []
    for mode in args.modes.split(","):
        if args.precomputed:
            mode = f"{mode}+pre"  # one process times the mode on images and on precomputed latents
        command = [sys.executable, __file__, "--child", mode] + [a for a in (argv or sys.argv[1:])]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"benchmark child {mode} failed:\n{result.stderr[-3000:]}")
        result = json.loads(result.stdout.strip().splitlines()[-1])
        rows.extend(result if isinstance(result, list) else [result])
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\npreset {args.preset}, {args.resolution}px, batch {args.batch_size}, {args.mixed_precision}, "
          f"device {args.device} ({platform.processor() or platform.machine()}), grad ckpt "
          f"{args.gradient_checkpointing}, {args.steps} timed steps after {args.warmup}, "
          f"UNet {rows[0]['unet_params_m']:.1f}M params\n")
    labels = {"batched": "full LCD, teacher CFG in one 2B pass", "separate": "full LCD, teacher CFG in two passes",
              "lora": f"LCM-LoRA rank {args.lora_rank}, one UNet",
              "xl-full": "SDXL full LCD (teacher + student + EMA)", "xl-lora": f"SDXL LCM-LoRA rank {args.lora_rank}"}
    print(f"| configuration | samples/s | s/step | {memory} (GB) | UNet weights held (GB) | trainable (M) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        mode, _, option = row["mode"].partition("+")
        label = labels[mode] + (" + precomputed latents" if option == "pre" else "")
        print(f"| {label} | {row['samples_per_s']:.3f} | {row['s_per_step']:.3f} | "
              f"{row['peak_memory_gb']:.2f} | {row['unet_weights_gb']:.3f} | {row['trainable_m']:.2f} |")
    by_mode = {row["mode"]: row for row in rows}
    if "batched" in by_mode and "separate" in by_mode:
        ratio = by_mode["batched"]["samples_per_s"] / by_mode["separate"]["samples_per_s"]
        print(f"\nbatched / separate throughput: {ratio:.2f}x")
    for mode in by_mode:
        if f"{mode}+pre" in by_mode:
            ratio = by_mode[f"{mode}+pre"]["samples_per_s"] / by_mode[mode]["samples_per_s"]
            print(f"\n{labels[mode]}: precomputed latents / encoding each step: {ratio:.2f}x throughput")


if __name__ == "__main__":
    main()
