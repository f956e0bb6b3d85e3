#!/usr/bin/env python
"""Time DreamBooth LoRA training steps with caching on and off, side by side, on a random-weight pipeline.

Each configuration runs in its own process (peak memory is its own) and trains through the script's own method
class (`DreamBoothExamples`, `DreamBoothLoRA.loss`), then backward and AdamW (or 8-bit AdamW) on the LoRA weights.
SD and SDXL presets alike. With prior preservation every step trains on B instance + B class images. Modes:
  cached    latent distributions (and SDXL crop time_ids) and prompt embeddings computed once, text encoders
            freed (the default)
  uncached  VAE encoder and text encoders run every step (`--no_cache`; what the diffusers example does)

    python benchmarks/benchmark_dreambooth.py --preset tiny-sdxl --resolution 64 --batch_size 1,4
    python benchmarks/benchmark_dreambooth.py --preset sdxl --resolution 1024 --batch_size 1 \
        --mixed_precision fp16 --device cuda --gradient_checkpointing --use_8bit_adam --modes cached
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
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--use_8bit_adam", action="store_true")
    return parser.parse_args(argv)


def run_child(args):
    import torch
    from accelerate import Accelerator

    import train_dreambooth_lora as db

    mode, batch_size = args.child.split(":")
    batch_size, cached = int(batch_size), mode == "cached"
    pipeline_dir, _ = prepare_assets(args)
    image_dir = Path(args.work_dir) / f"dreambooth-images-{args.resolution}"
    for kind, count in (("instance", 5), ("class", 20)):  # DreamBooth-sized sets: 5 photos, 20 class images
        (image_dir / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = image_dir / kind / f"{i:05d}.png"
            if not path.exists():
                pixels = (torch.rand(args.resolution, args.resolution, 3) * 255).byte().numpy()
                db.Image.fromarray(pixels).save(path)
    flags = ["--pretrained_model_name_or_path", str(pipeline_dir), "--instance_data_dir", str(image_dir / "instance"),
             "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
             "--class_data_dir", str(image_dir / "class"), "--class_prompt", "a photo of dog",
             "--num_class_images", "20", "--rank", str(args.rank), "--resolution", str(args.resolution),
             "--train_batch_size", str(batch_size), "--random_flip", "--seed", "0", "--report_to", "none",
             "--output_dir", str(Path(args.work_dir) / f"db-{mode}-{batch_size}"), "--overwrite_output_dir",
             "--mixed_precision", args.mixed_precision]
    flags += ["--gradient_checkpointing"] * args.gradient_checkpointing + ["--use_8bit_adam"] * args.use_8bit_adam
    script_args = db.parse_args(flags + ([] if cached else ["--no_cache"]))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    torch.manual_seed(0)
    examples = db.DreamBoothExamples(script_args, accelerator)
    method = db.DreamBoothLoRA(script_args, accelerator, examples)
    optimizer = db.make_optimizer(script_args, method.optimizer_params(), 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    batches = examples.batches(script_args, accelerator)

    def step():
        loss, _ = method.loss(next(batches))  # its networks run under accelerate's autocast, as in training
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    elapsed = time_steps(args, step, device)
    db.OutputDirLock.release_all()
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
    extras = "".join(f", {flag}" for flag, on in (("gradient checkpointing", args.gradient_checkpointing),
                                                  ("8-bit Adam", args.use_8bit_adam)) if on)
    print(f"\npreset {args.preset}, {args.resolution}px, rank {args.rank}, {args.mixed_precision}{extras}, device "
          f"{args.device} ({platform.processor() or platform.machine()}), prior preservation (B instance + B class "
          f"per step), {args.steps} timed steps after {args.warmup}\n")
    print(f"| instance batch B | caching | samples/s | s/step | {memory} (GB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {'on' if row['mode'] == 'cached' else 'off (--no_cache)'} | "
              f"{row['samples_per_s']:.2f} | {row['s_per_step']:.3f} | {row['peak_memory_gb']:.2f} |")


if __name__ == "__main__":
    main()
