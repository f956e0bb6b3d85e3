#!/usr/bin/env python
"""Time DreamBooth LoRA training steps with caching on and off, side by side, on a random-weight pipeline.

Each configuration runs in its own process (peak memory is its own) and uses the script's own pieces:
`load_models`, `cache_latents`, `sample_latents`, `dreambooth_loss`, backward and AdamW on the LoRA weights.
With prior preservation every step trains on B instance + B class images. Modes:
  cached    latent distributions and prompt embeddings computed once, text encoder freed (the default)
  uncached  VAE encoder and text encoder run every step (`--no_cache`; what the diffusers example does)

    python benchmarks/benchmark_dreambooth.py --preset tiny-sd --resolution 64 --batch_size 1,4
    python benchmarks/benchmark_dreambooth.py --preset sd15 --resolution 512 --batch_size 1,4 \
        --mixed_precision fp16 --device cuda
"""

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "benchmarks")]

from benchmark_lcd import add_common_arguments, peak_memory_gb, prepare_assets, time_steps  # noqa: E402


def parse_args(argv=None):
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--batch_size", default="1,4", help="instance images per step, comma-separated")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--modes", default="cached,uncached")
    return parser.parse_args(argv)


def run_child(args):
    import torch

    import train_dreambooth_lora as db

    mode, batch_size = args.child.split(":")
    batch_size, cached = int(batch_size), mode == "cached"
    pipeline_dir, _ = prepare_assets(args)
    image_dir = Path(args.work_dir) / "dreambooth-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in range(5):  # DreamBooth-sized sets: 5 instance photos, 20 class images
        for kind in ("instance", "class"):
            path = image_dir / f"{kind}-{i}.png"
            if not path.exists():
                db.Image.fromarray((torch.rand(args.resolution, args.resolution, 3) * 255).byte().numpy()).save(path)
    script_args = db.parse_args([
        "--pretrained_model_name_or_path", str(pipeline_dir), "--instance_data_dir", str(image_dir),
        "--instance_prompt", "a photo of sks dog", "--rank", str(args.rank),
        "--output_dir", str(Path(args.work_dir) / "db"),
    ])
    device = torch.device(args.device)
    weight_dtype = db.weight_dtype_for(args.mixed_precision)
    torch.manual_seed(0)
    noise_scheduler, tokenizer, text_encoder, vae, unet = db.load_models(script_args, weight_dtype)
    vae.to(device)
    text_encoder.to(device)
    unet.to(device).train()
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    images = [db.load_image(p) for p in sorted(image_dir.glob("instance-*.png"))]
    instances = db.ImageSet(images)
    classes = db.ImageSet([db.load_image(p) for p in sorted(image_dir.glob("class-*.png"))] * 4)
    transform = db.ImageTransform(args.resolution, center_crop=True)
    prompt_ids = tokenizer(["a photo of sks dog", "a photo of dog"], padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device)
    prompt_embeds = None
    if cached:
        for kind, image_set in (("instance", instances), ("class", classes)):
            db.cache_latents(vae, image_set, transform, True, 0, kind)
        with torch.no_grad():
            prompt_embeds = text_encoder(prompt_ids)[0]
        text_encoder = None
    ctx = db.DreamBoothContext(unet=unet, noise_scheduler=noise_scheduler, prior_loss_weight=1.0,
                               autocast=lambda: torch.autocast(device.type, dtype=weight_dtype,
                                                               enabled=weight_dtype != torch.float32))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    counter = iter(range(10**9))

    def step():
        positions = db.example_positions(next(counter), batch_size, 0, 1)
        flips = [p % 2 == 1 for p in positions]
        latents = torch.cat([
            db.sample_latents(vae, instances, [p % 5 for p in positions], flips, transform, positions, 0, "instance",
                              cached),
            db.sample_latents(vae, classes, [p % 20 for p in positions], flips, transform, positions, 0, "class",
                              cached),
        ])
        embeds = prompt_embeds
        if embeds is None:
            with torch.no_grad():
                embeds = text_encoder(prompt_ids)[0]
        loss, _ = db.dreambooth_loss(ctx, latents, embeds.repeat_interleave(batch_size, dim=0).float(), batch_size)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    elapsed = time_steps(args, step, device)
    return {"mode": mode, "batch_size": batch_size, "samples_per_s": 2 * batch_size * args.steps / elapsed,
            "s_per_step": elapsed / args.steps, "peak_memory_gb": peak_memory_gb(args.device)}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    prepare_assets(args)
    rows = []
    for batch_size in args.batch_size.split(","):
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--child", f"{mode}:{batch_size}"] + list(argv or sys.argv[1:])
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"benchmark child {mode}:{batch_size} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\npreset {args.preset}, {args.resolution}px, rank {args.rank}, {args.mixed_precision}, device "
          f"{args.device} ({platform.processor() or platform.machine()}), prior preservation (B instance + B class "
          f"per step), {args.steps} timed steps after {args.warmup}\n")
    print(f"| instance batch B | caching | samples/s | s/step | {memory} (GB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {'on' if row['mode'] == 'cached' else 'off (--no_cache)'} | "
              f"{row['samples_per_s']:.2f} | {row['s_per_step']:.3f} | {row['peak_memory_gb']:.2f} |")


if __name__ == "__main__":
    main()
