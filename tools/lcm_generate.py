#!/usr/bin/env python
"""Generate images with a distilled LCM UNet or an LCM-LoRA in a few steps: the inference half of the demo and a
quick check of any output directory of train_lcm_distill_sd_wds.py (--unet) or train_lcm_distill_lora_sd_wds.py
(--lora).

    python tools/lcm_generate.py --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --unet lcm-sd15/unet_target --prompt "a red fox in the snow" --steps 4 --output fox.png
    python tools/lcm_generate.py --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --lora lcm-lora-sd15
"""

import argparse
import json
import os
import sys

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what the LoRA scripts write
DEFAULT_ORIGINAL_INFERENCE_STEPS = 50  # LCMScheduler's, for outputs saved without their scheduler/


class OneLineErrorParser(argparse.ArgumentParser):
    """Errors in one line on stderr (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv=None):
    parser = OneLineErrorParser(prog="lcm_generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="The teacher pipeline (hub id or directory).")
    parser.add_argument("--unet", default=None, help="A distilled UNet directory (e.g. OUTPUT/unet_target).")
    parser.add_argument("--lora", default=None,
                        help="An LCM-LoRA output directory (or its pytorch_lora_weights.safetensors), loaded onto the "
                             "teacher.")
    parser.add_argument("--scheduler", default=None,
                        help="LCMScheduler or TCDScheduler folder; default: the training output's scheduler/ (next to "
                             "--unet, or in the --lora directory: the DDIM grid and timestep scaling the student was "
                             "trained for; a PCM student's is a TCDScheduler, sampled deterministically), else the "
                             "teacher's schedule with LCMScheduler.")
    parser.add_argument("--prompt", default="a red circle", help="Default: a prompt of the demo's toy world.")
    parser.add_argument("--steps", type=positive_int, default=4,
                        help="Sampling steps (1-8 is what LCMs are for; at most the training DDIM grid's size; a PCM "
                             "student samples best on its phase edges: a divisor of its --num_phases).")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Pipeline guidance scale; a full student sees omega = guidance_scale - 1. Default: 4.0 "
                             "with --unet (the demo trains at omega = 3; see the model card for another student's "
                             "range), 1.0 (no CFG pass) with --lora.")
    parser.add_argument("--resolution", type=positive_int, default=None, help="Default: the UNet's native size.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="lcm.png")
    parser.add_argument("--device", default="cuda" if "--device" not in sys.argv and _cuda() else "cpu")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def looks_local(name):
    """True when `name` can only be a local path (hub ids are 'org/name' without a leading '.', '/' or '~')."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def config_class(path):
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def check_args(parser, args):
    """Refuse, in one line and before any model loads, what would fail later in a traceback: a LoRA given as
    --unet (or a UNet as --lora), a training output's root given as --unet, more steps than the student's DDIM
    grid has, a resolution the VAE cannot take."""
    if (args.unet is None) == (args.lora is None):
        parser.error("give exactly one of --unet (a full LCD student) and --lora (an LCM-LoRA)")
    if looks_local(args.teacher) and not os.path.isdir(os.path.expanduser(args.teacher)):
        parser.error(f"--teacher: no such directory: {args.teacher}")
    if args.unet is not None:
        unet = os.path.expanduser(args.unet)
        if os.path.isfile(os.path.join(unet, LORA_WEIGHT_NAME)) or unet.endswith(".safetensors"):
            parser.error(f"--unet: {args.unet} is a LoRA ({LORA_WEIGHT_NAME}), not a UNet folder: pass it as "
                         f"--lora {args.unet}")
        if os.path.isdir(unet) and config_class(unet) is None:
            trained = [name for name in ("unet_target", "unet") if config_class(os.path.join(unet, name))]
            hint = (f"pass --unet {os.path.join(args.unet, trained[0])}" if trained
                    else "expected a UNet folder such as OUTPUT/unet_target")
            parser.error(f"--unet: {args.unet} has no UNet config.json; {hint}")
        if os.path.isdir(unet) and config_class(unet) != "UNet2DConditionModel":
            parser.error(f"--unet: {args.unet} holds a {config_class(unet)}, not a UNet2DConditionModel")
        if looks_local(args.unet) and not os.path.isdir(unet):
            parser.error(f"--unet: no such directory: {args.unet}")
    else:
        lora = os.path.expanduser(args.lora)
        if os.path.isdir(lora) and not os.path.isfile(os.path.join(lora, LORA_WEIGHT_NAME)):
            what = (f"a {config_class(lora)} folder: pass a full student as --unet {args.lora}" if config_class(lora)
                    else f"no {LORA_WEIGHT_NAME}")
            parser.error(f"--lora: {args.lora} holds {what}")
        if looks_local(args.lora) and not os.path.exists(lora):
            parser.error(f"--lora: no such file or directory: {args.lora}")
    if args.resolution is not None and args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    if args.scheduler is not None and not os.path.isfile(os.path.join(args.scheduler, "scheduler_config.json")):
        parser.error(f"--scheduler: no scheduler_config.json in {args.scheduler}")
    if args.guidance_scale is None:
        args.guidance_scale = 1.0 if args.lora else 4.0
    saved = saved_scheduler_config(args) or {}  # no saved scheduler: LCMScheduler's default grid
    grid = saved.get("original_inference_steps", DEFAULT_ORIGINAL_INFERENCE_STEPS)
    if args.steps > grid:
        parser.error(f"--steps {args.steps} exceeds the {grid}-point DDIM grid the student was distilled on "
                     f"(original_inference_steps of its scheduler); use 1-{grid} (LCMs are made for 1-8)")


def scheduler_dir(args):
    """--scheduler, or the training output's own scheduler/ (next to OUTPUT/unet_target, or in the LoRA output)."""
    if args.scheduler:
        return args.scheduler
    if args.unet is not None:
        return os.path.join(os.path.dirname(os.path.normpath(os.path.expanduser(args.unet))), "scheduler")
    lora = os.path.expanduser(args.lora)
    return os.path.join(os.path.dirname(lora) if lora.endswith(".safetensors") else lora, "scheduler")


def saved_scheduler_config(args):
    """The scheduler config the training saved (or --scheduler's), None when there is none."""
    try:
        with open(os.path.join(scheduler_dir(args), "scheduler_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _cuda():
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    args = parse_args(argv)
    import logging

    import torch

    # the image-processor fallback notice transformers prints without torchvision: nothing here uses them
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    from diffusers import LCMScheduler, StableDiffusionPipeline, TCDScheduler, UNet2DConditionModel

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    extra = {}
    if args.unet is not None:
        extra["unet"] = UNet2DConditionModel.from_pretrained(os.path.expanduser(args.unet), dtype=dtype)
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, **extra)
    if args.lora is not None:
        lora = os.path.expanduser(args.lora)
        if lora.endswith(".safetensors"):
            pipe.load_lora_weights(os.path.dirname(lora) or ".", weight_name=os.path.basename(lora))
        else:
            pipe.load_lora_weights(lora)
    saved = saved_scheduler_config(args)
    if saved is not None:  # what the training saved: LCMScheduler (LCD), TCDScheduler (PCM)
        scheduler_class = TCDScheduler if saved.get("_class_name") == "TCDScheduler" else LCMScheduler
        pipe.scheduler = scheduler_class.from_pretrained(scheduler_dir(args))
    else:  # an output of an older run: the teacher's schedule with LCMScheduler's defaults
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    sampler = "TCD (eta 0, deterministic)" if isinstance(pipe.scheduler, TCDScheduler) else "LCM"
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    # eta reaches TCDScheduler.step (its gamma; 0 = the deterministic sampler PCM students are made for); the
    # pipeline drops it for LCMScheduler, whose step has none
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=size,
                 width=size, eta=0.0, generator=torch.Generator(args.device).manual_seed(args.seed)).images[0]
    image.save(args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}, {args.steps} {sampler} steps)")


if __name__ == "__main__":
    main()
