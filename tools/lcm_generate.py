#!/usr/bin/env python
"""Generate images with a distilled LCM UNet in a few steps: the inference half of the demo and a quick check
of any output directory of train_lcm_distill_sd_wds.py.

    python tools/lcm_generate.py --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --unet lcm-sd15/unet_target --prompt "a red fox in the snow" --steps 4 --output fox.png
"""

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="The teacher pipeline (hub id or directory).")
    parser.add_argument("--unet", required=True, help="The distilled UNet directory (e.g. OUTPUT/unet_target).")
    parser.add_argument("--scheduler", default=None,
                        help="LCMScheduler folder; default: the training output's scheduler/ next to --unet (the "
                             "DDIM grid and timestep scaling the student was trained for), else the teacher's.")
    parser.add_argument("--prompt", default="a red circle", help="Default: a prompt of the demo's toy world.")
    parser.add_argument("--steps", type=int, default=4, help="LCM sampling steps (1-8).")
    parser.add_argument("--guidance_scale", type=float, default=4.0,
                        help="Pipeline guidance scale; the UNet sees omega = guidance_scale - 1 (default 4: the demo "
                             "trains at omega = 3; see the model card for another student's range).")
    parser.add_argument("--resolution", type=int, default=None, help="Default: the UNet's native size.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="lcm.png")
    parser.add_argument("--device", default="cuda" if "--device" not in sys.argv and _cuda() else "cpu")
    return parser.parse_args(argv)


def _cuda():
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    args = parse_args(argv)
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(args.unet, torch_dtype=dtype)
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, unet=unet, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    scheduler_dir = args.scheduler or os.path.join(os.path.dirname(os.path.normpath(args.unet)), "scheduler")
    if os.path.isfile(os.path.join(scheduler_dir, "scheduler_config.json")):
        pipe.scheduler = LCMScheduler.from_pretrained(scheduler_dir)
    elif args.scheduler:
        raise SystemExit(f"--scheduler: no scheduler_config.json in {args.scheduler}")
    else:  # an output of an older run: the teacher's schedule with LCMScheduler's defaults
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    size = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=size,
                 width=size, generator=torch.Generator(args.device).manual_seed(args.seed)).images[0]
    image.save(args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}, {args.steps} LCM steps)")


if __name__ == "__main__":
    main()
