#!/usr/bin/env python
# Copyright 2026 The SD Distillation Suite authors. Apache License 2.0.
"""Latent Consistency Distillation for SDXL: a full LCM-SDXL UNet, or with `--use_lora` an LCM-LoRA-SDXL.

Papers: Luo et al., "Latent Consistency Models" (arXiv:2310.04378), Algorithm 1; Luo et al., "LCM-LoRA"
(arXiv:2311.05556). Full mode: the student is the teacher's UNet plus a guidance-scale (omega) embedding and an
EMA target, as train_lcm_distill_sd_wds.py. LoRA mode: one UNet, the teacher is that UNet with its adapters
disabled and the target is an EMA of the adapter (--ema_decay none: the online student), as
train_lcm_distill_lora_sd_wds.py.

SDXL specifics: two text encoders (prompt embeds = both penultimate hidden states concatenated, pooled = the
second encoder's projection); micro-conditioning time_ids = [orig_h, orig_w, crop_top, crop_left, target_h,
target_w], height first; the unconditional input is zeros shaped like the conditional one, as in SDXL base (a
teacher pipeline with force_zeros_for_empty_prompt false gets the encoded empty prompt); the SDXL VAE overflows
in fp16, so it stays fp32 unless `--pretrained_vae_model_name_or_path` names an fp16-safe VAE.

Launch:
    accelerate launch train_lcm_distill_sdxl_wds.py \
        --pretrained_teacher_model=stabilityai/stable-diffusion-xl-base-1.0 \
        --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
        --train_shards_path_or_url="pipe:curl -fsSL --speed-limit 10000 --speed-time 60 $URL/{00000..01099}.tar" \
        --output_dir=lcm-sdxl --mixed_precision=fp16 --resolution=1024 --train_batch_size=12 --max_train_steps=1000

The METHOD section comes first: the flags, the paper's math (the training step is `lcd_loss`, one screen),
the models and `LatentConsistencyDistillationXL`, which the shared ENGINE region trains through.
"""

import argparse
import contextlib
import copy
import errno
import functools
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import logging
import math
import os
import random
import re
import select
import shlex
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from PIL import Image, ImageOps

# region IMPORT_NOTICES copied from train_lcm_distill_sd_wds
# diffusers (and peft) import bitsandbytes whenever it is installed, and on a CPU with AVX512-BF16 its 4-bit kernel
# loader warns that it cannot fetch them; diffusers' pipelines ask transformers for image processors, which without
# torchvision announce a fallback. A start-up error should be the one line a user sees.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
# endregion IMPORT_NOTICES

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys
import diffusers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from accelerate.utils import DistributedType, ProjectConfiguration, fsdp2_prepare_model, set_seed
from braceexpand import braceexpand
from diffusers import (AutoencoderKL, DDPMScheduler, LCMScheduler, StableDiffusionXLPipeline, TCDScheduler,
                       UNet2DConditionModel)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, free_memory
from diffusers.utils import make_image_grid
from huggingface_hub import ModelCardData, create_repo, get_token, is_offline_mode, snapshot_download, upload_folder
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = get_logger(__name__)

SCRIPT_NAME = "train_lcm_distill_sdxl_wds.py"  # recorded in checkpoints (a literal: survives a renamed file)
# LoRA target kinds: module-name suffixes in diffusers' UNet2DConditionModel (attention, feed-forward, resnet convs,
# time-embedding projections, down/upsampler convs): the layers the LCM-LoRA paper adapts.
LORA_TARGET_KINDS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
FULL_ONLY_FLAGS = ("unet_time_cond_proj_dim", "teacher_unet_fp32")
LORA_ONLY_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "save_precision")


# ==========================================================================================================
# METHOD: Latent Consistency Distillation for SDXL (Luo et al., 2023, Algorithm 1): a full student with an EMA
# target, or LCM-LoRA adapters (--use_lora). What to edit for a new teacher or method: its flags, the loss, the
# models, what is saved and validated.
# ==========================================================================================================


def parse_args(input_args=None):
    parser = OneLineErrorParser(
        prog="train_lcm_distill_sdxl_wds.py",
        description="Latent Consistency Distillation of an SDXL teacher: a full LCM UNet, or LCM-LoRA with --use_lora.",
    )
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_teacher_model", type=str, required=True,
                       help="Hub id or local directory of the teacher pipeline (any SDXL-architecture model).")
    group.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="A VAE to use instead of the teacher's, e.g. madebyollin/sdxl-vae-fp16-fix; it runs in the "
                            "mixed-precision dtype (the teacher's SDXL VAE stays fp32: it overflows in fp16).")
    group.add_argument("--teacher_revision", type=str, default=None, help="Revision of the teacher on the Hub.")
    group.add_argument("--variant", type=str, default=None, help="Weight variant of the teacher files, e.g. 'fp16'.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are cached.")
    group = add_stream_args(parser, resolution=1024)
    group.add_argument("--use_fix_crop_and_size", action="store_true",
                       help="Micro-condition every sample on original size (resolution, resolution) and crop (0, 0) "
                            "instead of its real size (json, else image) and real crop.")
    group = add_lcd_args(parser, w_min=3.0)
    group.add_argument("--unet_time_cond_proj_dim", type=bounded(int, 1, None), default=None,
                       help="Full mode: size of the omega embedding when the teacher UNet has none (default 256).")
    group.add_argument("--ema_decay", type=ema_decay_or_none, default=None,
                       help=f"mu, EMA decay of the consistency target: full mode, of the student ({DEFAULT_EMA_DECAY}); "
                            f"--use_lora, of the adapter weights ({DEFAULT_EMA_DECAY}, or none under FSDP/DeepSpeed, "
                            f"which shard the adapter; 'none': the online adapter is the target, as in LCM-LoRA).")
    group.add_argument("--teacher_unet_fp32", action="store_true",
                       help="Full mode: keep the frozen teacher UNet in fp32 (default: the mixed-precision dtype; "
                            "autocast would run it in that dtype anyway, so fp32 weights only cost memory unless "
                            "there is no autocast, as under DeepSpeed).")
    group = parser.add_argument_group("LoRA (--use_lora)")
    group.add_argument("--use_lora", action="store_true",
                       help="Distil into LoRA adapters (LCM-LoRA): one UNet, the teacher is it with adapters disabled.")
    group.add_argument("--lora_rank", type=bounded(int, 1, None),
                       default=None, help="Rank r of every LoRA adapter (64).")
    group.add_argument("--lora_alpha", type=bounded(float, 0, None, low_open=True), default=None,
                       help="LoRA alpha (the update is scaled by alpha / r); default: equal to --lora_rank.")
    group.add_argument("--lora_dropout", type=bounded(float, 0, 1, high_open=True),
                       default=None, help="Dropout on the LoRA branch input (0).")
    group.add_argument("--lora_target_modules", type=str, default=None,
                       help="Comma-separated layer kinds that get an adapter (module-name suffixes of the UNet); "
                            f"default: all of {', '.join(LORA_TARGET_KINDS)}.")
    group.add_argument("--save_precision", type=str, default=None, choices=["fp16", "bf16", "fp32"],
                       help="dtype of the final LoRA files (fp16; checkpoints always keep fp32).")
    group = parser.add_argument_group("validation")
    group.add_argument("--validation_prompts", type=str, nargs="*", default=None,
                       help="Prompts for the validation grids (default: the lines of the model folder's "
                            "validation_prompts.txt, else four general prompts); the flag alone disables validation.")
    group.add_argument("--validation_guidance_scale", type=bounded(float, 0, None), default=None,
                       help="Pipeline guidance_scale of validation images: default 8.0 (full: the student sees "
                            "omega = scale - 1) or 1.0 (--use_lora: no CFG pass).")
    add_engine_args(parser, output_dir="lcm-sdxl-model", learning_rate=None)  # 1e-6, or 1e-4 with --use_lora

    args = parse_and_check(parser, input_args, "sdxl")
    check_shard_args(parser, args)
    check_lcd_args(parser, args)
    check_mode_args(parser, args)
    return args


def check_mode_args(parser, args):
    """Full LCD or LCM-LoRA: refuse the other mode's flags, then fill in this mode's defaults."""
    # a flag of the other mode would silently do nothing: refuse it
    wrong_mode = FULL_ONLY_FLAGS if args.use_lora else LORA_ONLY_FLAGS
    for name in wrong_mode:
        if getattr(args, name) not in (None, False):
            parser.error(f"--{name} applies only {'without' if args.use_lora else 'with'} --use_lora")
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.use_lora else 1e-6
    if args.validation_guidance_scale is None:
        args.validation_guidance_scale = 1.0 if args.use_lora else 8.0
    if args.use_lora:
        args.lora_rank = 64 if args.lora_rank is None else args.lora_rank
        args.lora_alpha = float(args.lora_rank) if args.lora_alpha is None else args.lora_alpha
        args.lora_dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
        try:
            args.lora_target_modules = parse_lora_target_modules(
                args.lora_target_modules or ",".join(LORA_TARGET_KINDS))
        except ValueError as error:
            parser.error(f"--lora_target_modules: {error}")
        args.save_precision = args.save_precision or "fp16"
    else:
        if args.ema_decay == "none":
            parser.error("--ema_decay none applies only with --use_lora: the full student's target is its EMA")
        args.ema_decay = DEFAULT_EMA_DECAY if args.ema_decay is None else args.ema_decay
        args.unet_time_cond_proj_dim = args.unet_time_cond_proj_dim or 256


# Copied from train_lcm_distill_lora_sd_wds.parse_lora_target_modules
def parse_lora_target_modules(spec):
    """'to_q,to_k,conv1' -> ['to_q', 'to_k', 'conv1'], every entry one of LORA_TARGET_KINDS."""
    kinds = [kind.strip() for kind in spec.split(",") if kind.strip()]
    if not kinds:
        raise ValueError("names no module kind")
    unknown = [kind for kind in kinds if kind not in LORA_TARGET_KINDS]
    if unknown:
        raise ValueError(f"unknown module kind {unknown[0]!r}; valid kinds: {', '.join(LORA_TARGET_KINDS)}")
    return list(dict.fromkeys(kinds))


# region LCD copied from train_lcm_distill_sd_wds


VALIDATION_STEP_COUNTS = (1, 2, 4, 8)  # the sampling steps a validation grid shows (PCM: those on its phase edges)


def add_lcd_args(parser, *, w_min=5.0):
    """The flags of latent consistency distillation itself; returns their group for the script's own."""
    group = parser.add_argument_group("latent consistency distillation")
    group.add_argument("--w_min", type=bounded(float, 0, None),
                       default=w_min, help="Lowest guidance scale omega sampled per example.")
    group.add_argument("--w_max", type=bounded(float, 0, None),
                       default=15.0, help="Highest guidance scale omega sampled per example.")
    group.add_argument("--num_ddim_timesteps", type=bounded(int, 1, 1000),
                       default=50, help="N: DDIM solver steps of the teacher ODE.")
    group.add_argument("--loss_type", type=str, default="l2", choices=["l2", "huber"], help="Consistency distance.")
    group.add_argument("--huber_c", type=bounded(float, 0, None, low_open=True),
                       default=0.001, help="c of the pseudo-Huber loss.")
    group.add_argument("--timestep_scaling_factor", type=bounded(float, 0, None, low_open=True), default=None,
                       help="s in the boundary scalings c_skip/c_out (larger = closer to the exact boundary); 10. "
                            "LCD only: PCM has no boundary scalings.")
    group.add_argument("--num_phases", type=bounded(int, 1, 1000), default=None,
                       help="M: Phased Consistency distillation (PCM, Wang et al. 2024) with M phases of the DDIM grid "
                            "instead of LCD; the student then samples deterministically in M steps (TCDScheduler, "
                            "eta 0). Must divide --num_ddim_timesteps. Default: LCD.")
    group.add_argument("--proportion_empty_prompts", type=bounded(float, 0, 1), default=0.0,
                       help="Fraction of captions replaced by the empty prompt.")
    return group


def check_lcd_args(parser, args):
    if args.w_min > args.w_max:
        parser.error(f"--w_min ({args.w_min}) must not exceed --w_max ({args.w_max})")
    if args.num_phases is not None:
        if args.timestep_scaling_factor is not None:
            parser.error("--timestep_scaling_factor applies only to LCD: a PCM student jumps to its phase edge by DDIM, "
                         "with no boundary scalings; drop it or --num_phases")
        if args.num_ddim_timesteps % args.num_phases:
            parser.error(f"--num_phases {args.num_phases} must divide --num_ddim_timesteps {args.num_ddim_timesteps}: "
                         "phases of equal length are what TCDScheduler and DDIM (trailing) sample on")
    elif args.timestep_scaling_factor is None:
        args.timestep_scaling_factor = 10.0
    # a local teacher's schedule is one small file away; a Hub teacher's is checked once it loads (make_lcd_context)
    config_path = os.path.join(os.path.expanduser(args.pretrained_teacher_model), "scheduler", "scheduler_config.json")
    num_train_timesteps = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(config_path, encoding="utf-8") as f:
            num_train_timesteps = json.load(f).get("num_train_timesteps", 1000)  # DDPMScheduler's default
    problem = ddim_timesteps_problem(args, num_train_timesteps) if isinstance(num_train_timesteps, int) else None
    if problem:
        parser.error(problem)


def ddim_timesteps_problem(args, num_train_timesteps):
    """Why the DDIM grid of --num_ddim_timesteps does not fit the teacher's schedule, or None: N points need at
    least N training timesteps (the grid's step k = T // N would be 0, and its timesteps -1)."""
    if args.num_ddim_timesteps > num_train_timesteps:
        return (f"--num_ddim_timesteps {args.num_ddim_timesteps} exceeds the teacher's {num_train_timesteps} training "
                f"timesteps (num_train_timesteps of its scheduler); use at most {num_train_timesteps}")
    return None


# ----------------------------------------
# LCD math
# ----------------------------------------


def append_dims(x, target_dims):
    """Append trailing singleton dimensions so a per-sample vector broadcasts against a batch of latents."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def extract_into_tensor(schedule, timesteps, x_shape):
    """schedule[timesteps] reshaped to (B, 1, 1, 1) for broadcasting against x."""
    out = schedule.gather(-1, timesteps)
    return out.reshape(timesteps.shape[0], *((1,) * (len(x_shape) - 1)))


def guidance_scale_embedding(w, embedding_dim=512, dtype=torch.float32):
    """Sinusoidal embedding of 1000*w (VDM-style), the student's extra input for the guidance scale omega."""
    assert w.ndim == 1
    w = w * 1000.0
    half_dim = embedding_dim // 2
    # float32 log and this op order on purpose: w is scaled by 1000, so rounding differences become visible,
    # and the diffusers pipelines compute the inference-time embedding exactly this way
    log_step = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=dtype) * -log_step).to(w.device)
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    """c_skip(t), c_out(t) of the consistency parameterisation: c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x."""
    scaled_timestep = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
    c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def get_predicted_original_sample(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    """x0 predicted from a model output at (sample, t); alphas/sigmas are sqrt(abar) and sqrt(1 - abar)."""
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return (sample - sigmas * model_output) / alphas
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alphas * sample - sigmas * model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, sample, v_prediction)")


def get_predicted_noise(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    """epsilon predicted from a model output at (sample, t)."""
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alphas * model_output) / sigmas
    if prediction_type == "v_prediction":
        return alphas * model_output + sigmas * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, sample, v_prediction)")


class DDIMSolver:
    """The teacher's ODE solver on the N-point DDIM grid t = k-1, 2k-1, ..., T-1 (k = T // N)."""

    def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=50):
        alpha_cumprods = torch.as_tensor(alpha_cumprods, dtype=torch.float32)
        step_ratio = timesteps // ddim_timesteps
        self.step_ratio = step_ratio
        self.ddim_timesteps = (torch.arange(1, ddim_timesteps + 1) * step_ratio).round().long() - 1
        self.ddim_alpha_cumprods = alpha_cumprods[self.ddim_timesteps]
        # abar at the previous grid point; abar[0] for the first one
        self.ddim_alpha_cumprods_prev = torch.cat([alpha_cumprods[:1], alpha_cumprods[self.ddim_timesteps[:-1]]])

    def to(self, device):
        self.ddim_timesteps = self.ddim_timesteps.to(device)
        self.ddim_alpha_cumprods = self.ddim_alpha_cumprods.to(device)
        self.ddim_alpha_cumprods_prev = self.ddim_alpha_cumprods_prev.to(device)
        return self

    def ddim_step(self, pred_x0, pred_noise, timestep_index):
        """One deterministic DDIM step from grid point `timestep_index` to the previous one. With the index of a
        phase edge it is also the DDIM jump from anywhere in that phase to the phase's lower end (PCM)."""
        alpha_cumprod_prev = extract_into_tensor(self.ddim_alpha_cumprods_prev, timestep_index, pred_x0.shape)
        return alpha_cumprod_prev.sqrt() * pred_x0 + (1.0 - alpha_cumprod_prev).sqrt() * pred_noise


def phase_edge_index(timestep_index, num_ddim_timesteps, num_phases):
    """PCM: the grid index e_j = floor(j N / M) where the phase of each grid index i starts (the largest e_j <= i).
    Its lower end, where the phase's trajectory segment ends, is the grid point below e_j (t = 0 side for e_0 = 0):
    `DDIMSolver.ddim_step(x0, eps, e_j)` lands there. Closed form of the largest j with j N / M < i + 1."""
    phase = torch.div((timestep_index + 1) * num_phases - 1, num_ddim_timesteps, rounding_mode="floor")
    return torch.div(phase * num_ddim_timesteps, num_phases, rounding_mode="floor")


def consistency_loss(model_pred, target, loss_type="l2", huber_c=0.001):
    """d(f_theta, f_theta-): mean squared error, or the pseudo-Huber mean(sqrt(diff^2 + c^2) - c). fp32."""
    model_pred, target = model_pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(model_pred, target, reduction="mean")
    if loss_type == "huber":
        return torch.mean(torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def concat_unet_kwargs(first, second):
    """Concatenate two sets of UNet keyword inputs on the batch dim (nested dicts such as added_cond_kwargs too)."""
    if isinstance(first, dict):
        return {key: concat_unet_kwargs(first[key], second[key]) for key in first}
    return torch.cat([first, second])


@torch.no_grad()
def teacher_guided_ddim_step(teacher_unet, noisy_latents, timesteps, timestep_index, w, cond_kwargs, uncond_kwargs,
                             solver, alpha_schedule, sigma_schedule, prediction_type, batched=True, denoiser_call=None):
    """x_{t_n} from x_{t_{n+k}}: classifier-free-guided teacher (scale omega) + one DDIM step. The teacher runs
    through `denoiser_call` (see denoiser_forward; default: the UNet call).

    Conditional and unconditional passes run as ONE forward of batch 2B (`batched=True`, the default): the
    same FLOPs in fewer, larger kernels. `batched=False` runs two passes (less peak memory; benchmark baseline).
    """
    if batched:
        both = denoiser_forward(teacher_unet, torch.cat([noisy_latents, noisy_latents]),
                                torch.cat([timesteps, timesteps]), call=denoiser_call,
                                **concat_unet_kwargs(cond_kwargs, uncond_kwargs))
        cond_output, uncond_output = both.chunk(2)
    else:
        cond_output = denoiser_forward(teacher_unet, noisy_latents, timesteps, call=denoiser_call, **cond_kwargs)
        uncond_output = denoiser_forward(teacher_unet, noisy_latents, timesteps, call=denoiser_call, **uncond_kwargs)
    schedules = (prediction_type, alpha_schedule, sigma_schedule)
    cond_x0 = get_predicted_original_sample(cond_output, timesteps, noisy_latents, *schedules)
    uncond_x0 = get_predicted_original_sample(uncond_output, timesteps, noisy_latents, *schedules)
    cond_eps = get_predicted_noise(cond_output, timesteps, noisy_latents, *schedules)
    uncond_eps = get_predicted_noise(uncond_output, timesteps, noisy_latents, *schedules)
    w = append_dims(w, noisy_latents.ndim)
    pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
    pred_eps = cond_eps + w * (cond_eps - uncond_eps)
    return solver.ddim_step(pred_x0, pred_eps, timestep_index)


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model, i.e. the teacher, for the duration of the block: LoRA layers pass their input through.

    Through peft's own adapter layers, not diffusers' LoRA mixin: any model that peft put adapters into (diffusers'
    add_adapter, peft's inject_adapter_in_model or get_peft_model) can be its own teacher. Each layer gets back the
    state it had."""
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ValueError("adapters_disabled: the model has no peft adapter layers (is it the LoRA student?)")
    were_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, were_disabled):
            layer.enable_adapters(not disabled)


@dataclass
class LCDContext:
    """Everything the LCD loss needs besides the batch: networks, schedules and hyper-parameters.

    A full student has its own frozen teacher and an EMA target, and takes omega as an input. An LCM-LoRA
    student is the teacher's UNet plus adapters: the teacher is that UNet with the adapters off, the target is
    the student itself (with `target_weights`, an EMA of its adapters put in place), and it has no omega input
    (w_embedding_dim 0)."""

    unet: torch.nn.Module  # online student theta (possibly DDP-wrapped)
    teacher_unet: torch.nn.Module  # frozen teacher; LoRA: the unwrapped student, run with its adapters off
    target_unet: torch.nn.Module  # EMA target theta-; LoRA: the unwrapped student
    noise_scheduler: DDPMScheduler
    solver: DDIMSolver
    alpha_schedule: torch.Tensor
    sigma_schedule: torch.Tensor
    prediction_type: str
    w_embedding_dim: int  # size of the student's omega embedding; 0: the student has no omega input
    teacher_is_student_without_adapters: bool
    args: argparse.Namespace
    autocast: object = field(default=None)
    batched_teacher: bool = True
    denoiser_call: object = None  # how the networks are called (denoiser_forward's `call`); None: the UNet call
    # LoRA with an EMA target: a context manager that puts the EMA adapter weights in place for the target's forward
    target_weights: object = None


def make_lcd_context(args, noise_scheduler, unet, teacher_unet, target_unet, *, w_embedding_dim, device, autocast,
                     teacher_is_student_without_adapters=False, batched_teacher=True, denoiser_call=None,
                     target_weights=None):
    """The LCDContext of a run: the DDIM solver on the teacher's schedule, its sqrt(abar), sqrt(1 - abar).
    `denoiser_call` is the METHOD's call of its networks (see denoiser_forward); None: the UNet call.
    `target_weights`: see LCDContext (None: the target network runs with its own weights)."""
    problem = ddim_timesteps_problem(args, noise_scheduler.config.num_train_timesteps)
    if problem:
        raise SystemExit(f"error: {problem}")
    alphas_cumprod = noise_scheduler.alphas_cumprod
    noise_scheduler.alphas_cumprod = alphas_cumprod.to(device)  # add_noise on device without a per-step copy
    return LCDContext(
        unet=unet, teacher_unet=teacher_unet, target_unet=target_unet, noise_scheduler=noise_scheduler,
        solver=DDIMSolver(alphas_cumprod, noise_scheduler.config.num_train_timesteps,
                          args.num_ddim_timesteps).to(device),
        alpha_schedule=alphas_cumprod.sqrt().to(device), sigma_schedule=(1.0 - alphas_cumprod).sqrt().to(device),
        prediction_type=noise_scheduler.config.prediction_type, w_embedding_dim=w_embedding_dim,
        teacher_is_student_without_adapters=teacher_is_student_without_adapters, args=args, autocast=autocast,
        batched_teacher=batched_teacher, denoiser_call=denoiser_call, target_weights=target_weights,
    )


def distillation_loss(ctx, latents, cond, uncond):
    """The training loss of the run: Phased Consistency distillation with --num_phases, else LCD."""
    return (pcm_loss if ctx.args.num_phases else lcd_loss)(ctx, latents, cond, uncond)


def sample_training_points(ctx, latents):
    """Steps shared by LCD and PCM. n ~ U{0..N-1}: the start t_{n+k} on the DDIM grid, and t_n one solver step
    (k) below it; x_{t_{n+k}} ~ q(x_t | z0) with the teacher's DDPM schedule; omega ~ U[w_min, w_max], which a
    full student also takes as an embedding (LoRA students do not)."""
    args, solver, bsz = ctx.args, ctx.solver, latents.shape[0]
    index = torch.randint(0, args.num_ddim_timesteps, (bsz,), device=latents.device)
    start_timesteps = solver.ddim_timesteps[index]
    timesteps = (start_timesteps - solver.step_ratio).clamp(min=0)
    noise = torch.randn_like(latents)
    noisy_latents = ctx.noise_scheduler.add_noise(latents, noise, start_timesteps)
    w = (args.w_max - args.w_min) * torch.rand((bsz,), device=latents.device) + args.w_min
    w_input = {} if not ctx.w_embedding_dim else {
        "timestep_cond": guidance_scale_embedding(w, embedding_dim=ctx.w_embedding_dim).to(latents.device)}
    return index, start_timesteps, timesteps, noisy_latents, w, w_input


def teacher_step(ctx, noisy_latents, start_timesteps, index, w, cond, uncond):
    """x_{t_n}: the teacher with CFG omega and one DDIM step (no grad, cond and uncond in one batched pass)."""
    teacher = (adapters_disabled(ctx.teacher_unet) if ctx.teacher_is_student_without_adapters
               else contextlib.nullcontext(ctx.teacher_unet))
    with ctx.autocast(), eval_mode(ctx.teacher_unet), teacher as teacher_unet:
        return teacher_guided_ddim_step(teacher_unet, noisy_latents, start_timesteps, index, w, cond, uncond,
                                        ctx.solver, ctx.alpha_schedule, ctx.sigma_schedule, ctx.prediction_type,
                                        batched=ctx.batched_teacher, denoiser_call=ctx.denoiser_call)


@torch.no_grad()
def target_prediction(ctx, x_prev, timesteps, w_input, cond):
    """The target network's output at (x_{t_n}, t_n), in eval mode: with LoRA dropout active the target would be a
    random draw, not the network's prediction. A LoRA student with an EMA target runs with the EMA adapter."""
    with ctx.autocast(), eval_mode(ctx.target_unet), (ctx.target_weights or contextlib.nullcontext)():
        return denoiser_forward(ctx.target_unet, x_prev, timesteps, call=ctx.denoiser_call, **w_input, **cond)


def lcd_loss(ctx, latents, cond, uncond):
    """One Latent Consistency Distillation loss (LCM paper, Algorithm 1) for latents z0. cond and uncond are the
    denoiser's conditioning inputs (keywords of ctx.denoiser_call): {"encoder_hidden_states": c}, plus
    "added_cond_kwargs" for SDXL."""
    args, schedules = ctx.args, (ctx.prediction_type, ctx.alpha_schedule, ctx.sigma_schedule)

    # 1. n, x_{t_{n+k}}, omega (see sample_training_points).
    index, start_timesteps, timesteps, noisy_latents, w, w_input = sample_training_points(ctx, latents)

    # 2. Boundary scalings, so that f(x, 0) = x exactly.
    c_skip_start, c_out_start = (append_dims(c, latents.ndim) for c in scalings_for_boundary_conditions(
        start_timesteps, timestep_scaling=args.timestep_scaling_factor))
    c_skip, c_out = (append_dims(c, latents.ndim) for c in scalings_for_boundary_conditions(
        timesteps, timestep_scaling=args.timestep_scaling_factor))

    # 3. Online student: f_theta(x_{t_{n+k}}, omega, c, t_{n+k}) = c_skip x + c_out x0_hat.
    with ctx.autocast():
        student_output = denoiser_forward(ctx.unet, noisy_latents, start_timesteps, call=ctx.denoiser_call,
                                          **w_input, **cond)
    pred_x0 = get_predicted_original_sample(student_output, start_timesteps, noisy_latents, *schedules)
    model_pred = c_skip_start * noisy_latents + c_out_start * pred_x0

    # 4. Teacher with CFG omega + DDIM step: x_{t_n}.
    x_prev = teacher_step(ctx, noisy_latents, start_timesteps, index, w, cond, uncond)

    # 5. Target f_theta-(x_{t_n}, omega, c, t_n), no grad.
    target_x0 = get_predicted_original_sample(target_prediction(ctx, x_prev, timesteps, w_input, cond), timesteps,
                                              x_prev, *schedules)
    target = c_skip * x_prev + c_out * target_x0

    # 6. Consistency distance d(f_theta, f_theta-).
    return consistency_loss(model_pred, target, args.loss_type, args.huber_c)


def pcm_loss(ctx, latents, cond, uncond):
    """One Phased Consistency distillation loss (Wang et al. 2024, "Phased Consistency Models"): the DDIM grid is
    cut into M phases, and the student maps any point of a phase to the phase's lower end s, by a DDIM jump with its
    own x0 and epsilon predictions (no boundary scalings: s is a real point of the trajectory). Sampling visits the
    M phase ends deterministically."""
    args, solver, schedules = ctx.args, ctx.solver, (ctx.prediction_type, ctx.alpha_schedule, ctx.sigma_schedule)

    # 1. n, x_{t_{n+k}}, omega (see sample_training_points), and the phase edge e_j of grid index n+k.
    index, start_timesteps, timesteps, noisy_latents, w, w_input = sample_training_points(ctx, latents)
    edge = phase_edge_index(index, args.num_ddim_timesteps, args.num_phases)

    # 2. Online student: DDIM jump from x_{t_{n+k}} to s with its own x0_hat and eps_hat.
    with ctx.autocast():
        student_output = denoiser_forward(ctx.unet, noisy_latents, start_timesteps, call=ctx.denoiser_call,
                                          **w_input, **cond)
    model_pred = solver.ddim_step(
        get_predicted_original_sample(student_output, start_timesteps, noisy_latents, *schedules),
        get_predicted_noise(student_output, start_timesteps, noisy_latents, *schedules), edge)

    # 3. Teacher with CFG omega + DDIM step: x_{t_n}.
    x_prev = teacher_step(ctx, noisy_latents, start_timesteps, index, w, cond, uncond)

    # 4. Target, no grad: x_{t_n} itself where t_n is the edge s (n+k = e_j), else the target network's DDIM jump
    #    from x_{t_n} to s. With M = N every point is an edge, and the target network is never needed.
    at_edge = append_dims(index == edge, latents.ndim)
    if bool(at_edge.all()):
        target = x_prev
    else:
        target_output = target_prediction(ctx, x_prev, timesteps, w_input, cond)
        target_jump = solver.ddim_step(get_predicted_original_sample(target_output, timesteps, x_prev, *schedules),
                                       get_predicted_noise(target_output, timesteps, x_prev, *schedules), edge)
        target = torch.where(at_edge, x_prev, target_jump)

    # 5. Consistency distance d(student jump, target jump).
    return consistency_loss(model_pred, target, args.loss_type, args.huber_c)


def lcd_table_rows(args):
    """The model card rows of the distillation's own settings."""
    rows = [("method", f"PCM, {args.num_phases} phases" if args.num_phases else "LCD"),
            ("loss", f"{args.loss_type} (huber c = {args.huber_c})"), ("DDIM steps N", args.num_ddim_timesteps)]
    if not args.num_phases:
        rows.append(("timestep scaling (c_skip, c_out)", args.timestep_scaling_factor))
    return rows


def trained_guidance(args):
    """How a model card names the guidance the student was trained for and the pipeline `guidance_scale` that
    gives it (the pipeline feeds omega = guidance_scale - 1): one value when --w_min == --w_max, else a range."""
    if args.w_min == args.w_max:
        return f"omega = {args.w_min}", f"`guidance_scale` {args.w_min + 1}"
    return (f"omega in [{args.w_min}, {args.w_max}]",
            f"`guidance_scale` between {args.w_min + 1} and {args.w_max + 1}")


def example_guidance_scale(args):
    """The guidance_scale of a model card's inference example: the validation one, moved into the trained range."""
    return min(max(args.validation_guidance_scale, args.w_min + 1), args.w_max + 1)


def student_scheduler_for(args):
    """The scheduler the student is trained for, on the teacher's noise schedule and the distillation's DDIM grid
    (N = --num_ddim_timesteps). Saved as the output's scheduler/ and used by validation, so inference samples on
    the timesteps the student learned.

    LCD: `LCMScheduler` with the boundary scalings (--timestep_scaling_factor). PCM: `TCDScheduler`, which with
    eta (gamma) 0, the pipelines' default, is a deterministic DDIM jump between the timesteps it picks, and with
    M = --num_phases steps it picks exactly the phase edges (evenly spaced indices of the same grid)."""
    common = {"subfolder": "scheduler", "revision": args.teacher_revision, "cache_dir": args.cache_dir,
              "original_inference_steps": args.num_ddim_timesteps}
    if args.num_phases:
        return scheduler_from_pretrained(TCDScheduler, args.pretrained_teacher_model, **common)
    return scheduler_from_pretrained(LCMScheduler, args.pretrained_teacher_model,
                                     timestep_scaling=args.timestep_scaling_factor, **common)


def validation_step_counts(args):
    """The sampling steps of a validation grid: 1, 2, 4, 8; for PCM those that land on phase edges (that divide
    M), and M itself."""
    if not args.num_phases:
        return VALIDATION_STEP_COUNTS
    return tuple(sorted({c for c in VALIDATION_STEP_COUNTS if args.num_phases % c == 0} | {args.num_phases}))


def sampler_card(args):
    """How a model card names the method, its paper, the scheduler to load and the steps to sample with."""
    if args.num_phases:
        return {"method": f"Phased Consistency distillation (PCM, Wang et al., 2024, arXiv:2405.18407) with "
                          f"{args.num_phases} phases",
                "scheduler": "TCDScheduler", "steps": args.num_phases, "eta": ", eta=0.0",
                "sampling": f"It samples deterministically in {args.num_phases} steps, one per phase, with "
                            "`TCDScheduler` and `eta=0.0` (or `DDIMScheduler` with `timestep_spacing=\"trailing\"` "
                            "when N x (1000 // N) = 1000); step counts that divide the number of phases land on "
                            "phase edges too."}
    return {"method": "Latent Consistency Distillation (Luo et al., 2023, arXiv:2310.04378)",
            "scheduler": "LCMScheduler", "steps": 4, "eta": "",
            "sampling": "It samples in 1-8 steps with `LCMScheduler`; 4 steps is the usual trade-off."}


# endregion LCD


# ----------------------------------------
# SDXL conditioning and models
# ----------------------------------------


def compute_time_ids(original_sizes, crop_top_lefts, resolution, use_fix_crop_and_size=False):
    """SDXL micro-conditioning per sample: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (height first).

    original_sizes and crop_top_lefts are (B, 2) tensors of (height, width) and (top, left).
    """
    bsz = original_sizes.shape[0]
    if use_fix_crop_and_size:
        original_sizes = torch.full((bsz, 2), resolution)
        crop_top_lefts = torch.zeros((bsz, 2), dtype=torch.long)
    target_sizes = torch.full((bsz, 2), resolution)
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).float()


# Copied from train_lcm_distill_sd_wds.encode_latents
@torch.no_grad()
def encode_latents(vae, pixel_values, batch_size):
    """VAE-encode in chunks of `batch_size` images (memory) and scale to the diffusion latent space."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype)
    latents = [vae.encode(chunk).latent_dist.sample() for chunk in pixel_values.split(batch_size)]
    return torch.cat(latents).float() * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts_sdxl(text_encoders, tokenizers, prompts):
    """SDXL text conditioning: both encoders' penultimate hidden states concatenated on the last dim, and the
    second encoder's pooled projection."""
    hidden_states = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        input_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
        output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
        pooled = output[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1).float(), pooled.float()


def unet_conditioning(prompt_embeds, pooled_embeds, time_ids):
    return {"encoder_hidden_states": prompt_embeds,
            "added_cond_kwargs": {"text_embeds": pooled_embeds, "time_ids": time_ids}}


def teacher_zeroes_empty_prompt(args):
    """The teacher pipeline's `force_zeros_for_empty_prompt` (model_index.json; SDXL base and its default: true):
    whether its unconditional input is zeros or the encoded empty prompt."""
    config = StableDiffusionXLPipeline.load_config(args.pretrained_teacher_model, revision=args.teacher_revision,
                                                   cache_dir=args.cache_dir)
    return bool(config.get("force_zeros_for_empty_prompt", True))


def unconditional_conditioning(cond, empty_prompt=None):
    """The teacher's unconditional input, with the same micro-conditioning as `cond`: zeros shaped like the text
    inputs when the pipeline zeroes the empty prompt (SDXL base), else `empty_prompt`, the encoded "" (embeddings,
    pooled) broadcast over the batch."""
    hidden, pooled = cond["encoder_hidden_states"], cond["added_cond_kwargs"]["text_embeds"]
    if empty_prompt is None:
        uncond_hidden, uncond_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    else:
        uncond_hidden, uncond_pooled = (embeds.to(hidden.device).expand_as(like)
                                        for embeds, like in zip(empty_prompt, (hidden, pooled)))
    return {"encoder_hidden_states": uncond_hidden,
            "added_cond_kwargs": {"text_embeds": uncond_pooled, "time_ids": cond["added_cond_kwargs"]["time_ids"]}}


# Copied from train_lcm_distill_sd_wds.make_student_unet
def make_student_unet(args):
    """The teacher's UNet with a guidance-scale input, in fp32; it starts as an exact copy of the teacher (read
    from the teacher's files: a copy of the teacher held in bf16 would start it rounded).

    When the teacher has no `time_cond_proj_dim`, the new `time_embedding.cond_proj` layer is zero, so the
    omega embedding adds nothing until training moves it.
    """
    config = UNet2DConditionModel.load_config(args.pretrained_teacher_model, subfolder="unet",
                                              revision=args.teacher_revision, cache_dir=args.cache_dir)
    adds_cond_proj = config.get("time_cond_proj_dim") is None
    with diffusers_log_level(logging.ERROR):  # not a warning: the one weight the teacher lacks is set just below
        student = load_teacher_unet(args, torch.float32,
                                    **({"time_cond_proj_dim": args.unet_time_cond_proj_dim} if adds_cond_proj else {}))
    if adds_cond_proj:
        student.time_embedding.cond_proj.to_empty(device="cpu")
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    missing = [name for name, param in student.named_parameters() if param.is_meta]
    if missing:
        raise RuntimeError(f"student weights not in the teacher's UNet: {missing}")
    return student


# Copied from train_lcm_distill_lora_sd_wds.lora_config
def lora_config(args):
    # gaussian init of A with B = 0: the adapter starts as the identity, so the student starts at the teacher
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      init_lora_weights="gaussian", target_modules=list(args.lora_target_modules))


# Copied from train_lcm_distill_lora_sd_wds.LoraTargetError
class LoraTargetError(ValueError):
    """A requested LoRA target kind that this UNet does not have."""


# Copied from train_lcm_distill_lora_sd_wds.check_lora_targets
def check_lora_targets(unet, target_kinds):
    """Fail in one line when a requested kind matches no Linear/Conv2d of this UNet (PEFT would ignore it)."""
    names = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    for kind in target_kinds:
        if not any(name == kind or name.endswith("." + kind) for name in names):
            raise LoraTargetError(f"--lora_target_modules: {kind!r} matches no layer of this UNet; "
                             f"valid kinds: {', '.join(LORA_TARGET_KINDS)}")


# Copied from train_lcm_distill_lora_sd_wds.add_lora
def add_lora(unet, args):
    """Freeze the base UNet (loaded in `weight_dtype`) and add trainable fp32 LoRA adapters to it."""
    check_lora_targets(unet, args.lora_target_modules)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(args))
    cast_training_params(unet)
    return unet


def load_models(args, weight_dtype):
    """Teacher components, frozen and loaded directly in `weight_dtype` (the UNet in fp32 with --teacher_unet_fp32;
    the VAE in fp32 unless --pretrained_vae_model_name_or_path names an fp16-safe one: SDXL's own overflows in
    fp16); full mode adds the omega student and its EMA target (fp32), LoRA mode adapters."""
    teacher = args.pretrained_teacher_model
    common = {"revision": args.teacher_revision, "cache_dir": args.cache_dir}
    noise_scheduler = DDPMScheduler.from_pretrained(teacher, subfolder="scheduler", **common)
    tokenizers = [CLIPTokenizer.from_pretrained(teacher, subfolder=name, **common)
                  for name in ("tokenizer", "tokenizer_2")]
    text_encoders = [
        from_pretrained_in_dtype(model_class, weight_dtype, teacher, subfolder=name, variant=args.variant, **common)
        for model_class, name in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
    ]
    if args.pretrained_vae_model_name_or_path is not None:
        vae = from_pretrained_in_dtype(AutoencoderKL, weight_dtype, args.pretrained_vae_model_name_or_path,
                                       cache_dir=args.cache_dir)
    else:
        vae = from_pretrained_in_dtype(AutoencoderKL, torch.float32, teacher, subfolder="vae", variant=args.variant,
                                       **common)
    if args.use_lora:
        unet = add_lora(load_teacher_unet(args, weight_dtype), args)
        return noise_scheduler, tokenizers, text_encoders, vae, None, unet, None
    teacher_unet = load_teacher_unet(args, torch.float32 if args.teacher_unet_fp32 else weight_dtype)
    unet = make_student_unet(args)
    return noise_scheduler, tokenizers, text_encoders, vae, teacher_unet, unet, copy.deepcopy(unet)


# Copied from train_lcm_distill_sd_wds.load_teacher_unet
def load_teacher_unet(args, dtype, **config_overrides):
    return from_pretrained_in_dtype(UNet2DConditionModel, dtype, args.pretrained_teacher_model, subfolder="unet",
                                    revision=args.teacher_revision, variant=args.variant, cache_dir=args.cache_dir,
                                    **config_overrides)


# Copied from train_lcm_distill_sd_wds.diffusers_log_level
@contextlib.contextmanager
def diffusers_log_level(level):
    previous = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(level)
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(previous)


# ----------------------------------------
# Checkpoints and outputs of the method
# ----------------------------------------


# Copied from train_lcm_distill_lora_sd_wds.lora_state_dict
def lora_state_dict(unet, dtype=None, full_state=None):
    """PEFT-style LoRA tensors of `unet` ('<module>.lora_A.weight' / '.lora_B.weight'), optionally cast; taken
    from `full_state` (the gathered weights, see full_state_dict) where DeepSpeed/FSDP shard them."""
    state = get_peft_model_state_dict(unet, state_dict=full_state)
    return {key: tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous() for key, tensor in state.items()}


# Copied from train_lcm_distill_lora_sd_wds.lora_adapter_metadata
def lora_adapter_metadata(unet):
    """The adapter's LoraConfig as a dict: stored in the file so that loading keeps alpha (the scale alpha/r)."""
    return unet.peft_config["default"].to_dict()


# Copied from train_lcm_distill_lora_sd_wds.peft_to_kohya_state_dict
def peft_to_kohya_state_dict(peft_state_dict, alpha):
    """PEFT LoRA keys -> kohya/A1111 keys: lora_unet_<module path with '_'>.lora_down / .lora_up / .alpha.
    Not diffusers' convert_state_dict_to_kohya: it writes alpha = rank, and drops lora_unet_ without a unet. prefix."""
    kohya = {}
    for key, tensor in peft_state_dict.items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        if kind == "A.weight":
            kohya[f"{name}.lora_down.weight"] = tensor
            kohya[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=tensor.dtype)
        elif kind == "B.weight":
            kohya[f"{name}.lora_up.weight"] = tensor
        else:
            raise ValueError(f"unexpected LoRA tensor {key}")
    return kohya


# Copied from train_lcm_distill_lora_sd_wds.save_lora_files with StableDiffusionPipeline->StableDiffusionXLPipeline
def save_lora_files(unet, output_dir, dtype=None, kohya=True, full_state=None):
    """Write the adapter in diffusers format (alpha in the metadata) and, optionally, in kohya format."""
    state = lora_state_dict(unet, dtype, full_state)
    StableDiffusionXLPipeline.save_lora_weights(output_dir, unet_lora_layers=state,
                                              unet_lora_adapter_metadata=lora_adapter_metadata(unet),
                                              weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    if kohya:
        alpha = unet.peft_config["default"].lora_alpha
        save_file(peft_to_kohya_state_dict(state, alpha), os.path.join(output_dir, KOHYA_WEIGHT_NAME),
                  metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(unet.peft_config["default"].r),
                            "ss_network_alpha": str(alpha)})


# Copied from train_lcm_distill_lora_sd_wds.load_lora_checkpoint
def load_lora_checkpoint(unet, checkpoint_dir):
    """Load the adapter saved by `save_lora_files` into `unet` (same LoRA config), keeping LoRA params fp32."""
    state = load_file(os.path.join(checkpoint_dir, LORA_WEIGHT_NAME))
    state = {key.removeprefix("unet."): tensor for key, tensor in state.items()}
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {checkpoint_dir} does not match the LoRA config: unexpected {unexpected[:3]}")
    cast_training_params(unet)


# Copied from train_lcm_distill_sd_wds.load_unet_weights
def load_unet_weights(checkpoint_dir, subfolder):
    return UNet2DConditionModel.from_pretrained(checkpoint_dir, subfolder=subfolder).state_dict()


EMA_ADAPTER_NAME = "ema_adapter.safetensors"  # the EMA adapter in checkpoints (--ema_decay)
# The recipe study (benchmarks/QUALITY.md) measured the EMA adapter target against the online one: accuracy +0.06 to
# +0.15 and distance to the teacher -0.010 to -0.014 at 1, 2 and 4 steps, every paired interval excluding 0.
DEFAULT_EMA_DECAY = 0.95


# Copied from train_lcm_distill_lora_sd_wds.ema_decay_or_none
def ema_decay_or_none(text):
    """--ema_decay: a decay in [0, 1), or 'none' (the online adapter is the target), kept as the string until
    resolve_ema_decay knows the distributed setup."""
    if text.strip().lower() == "none":
        return "none"
    return bounded(float, 0, 1, high_open=True)(text)


# Copied from train_lcm_distill_lora_sd_wds.resolve_ema_decay
def resolve_ema_decay(args, accelerator):
    """--ema_decay as the run uses it: a float, or None for the online target. The default is DEFAULT_EMA_DECAY
    where the EMA copy can live (one process, DDP) and none under FSDP/DeepSpeed, which shard the adapter it
    copies; an explicit decay there is refused when the method starts."""
    if args.ema_decay == "none":
        args.ema_decay = None
    elif args.ema_decay is None:
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        args.ema_decay = None if sharded else DEFAULT_EMA_DECAY
        if sharded:
            logger.info("the consistency target is the online adapter: FSDP/DeepSpeed shard the adapter that the "
                        "default EMA target (--ema_decay) would copy")


# Copied from train_lcm_distill_lora_sd_wds.EmaAdapter
class EmaAdapter:
    """An EMA of a UNet's trainable (LoRA) weights, used as the consistency target (--ema_decay). The one UNet in
    memory runs the target with these weights put in place for the forward (`in_place`), so the EMA costs a copy
    of the adapter, not a second UNet. The diffusers LCM-LoRA script has no EMA target (their issue #6505)."""

    def __init__(self, unet):
        self.named = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
        self.weights = [p.detach().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self, decay):
        update_ema(self.weights, [p for _, p in self.named], decay)

    @contextlib.contextmanager
    def in_place(self):
        """The block runs the UNet with the EMA adapter; the online weights are back afterwards. The parameters'
        tensors are swapped, not copied (no transient copy of the adapter), and the Parameter objects stay the
        same, so the optimiser's and DDP's references to them stay valid."""
        online = [p.data for _, p in self.named]
        for (_, p), weight in zip(self.named, self.weights):
            p.data = weight
        try:
            yield
        finally:
            for (_, p), tensor in zip(self.named, online):
                p.data = tensor

    def state_dict(self):
        return {name: weight.detach().cpu().contiguous() for (name, _), weight in zip(self.named, self.weights)}

    def load_state_dict(self, state):
        missing = [name for name, _ in self.named if name not in state]
        if missing or len(state) != len(self.named):
            raise SystemExit(f"error: the checkpoint's EMA adapter does not match this run's LoRA config "
                             f"(missing {missing[:2]}, {len(state)} tensors for {len(self.named)}); resume with the "
                             "checkpoint's --lora_rank/--lora_target_modules")
        for (name, _), weight in zip(self.named, self.weights):
            weight.copy_(state[name])


def checkpoint_hooks(accelerator, target_unet, use_lora, ema_adapter=None):
    """accelerate's save/load pre-hooks. Checkpoints hold loadable diffusers folders, unet/ (the student, full
    weights even when DeepSpeed/FSDP shard it) and unet_target/ (the EMA target, which accelerate does not know
    about, so it is restored from there in every regime; gathered and re-sliced under FSDP, which shards it like
    the student); or, with LoRA, the adapter file and the EMA adapter (`ema_adapter`, --ema_decay) beside it."""

    def save_model_hook(models, weights, output_dir):
        if use_lora:
            full_state = full_state_dict(accelerator, models[0])  # every rank: under DeepSpeed/FSDP it gathers
            if accelerator.is_main_process:
                save_lora_files(unwrap(accelerator, models[0]), output_dir, kohya=False, full_state=full_state)
                if ema_adapter is not None:
                    save_file(ema_adapter.state_dict(), os.path.join(output_dir, EMA_ADAPTER_NAME))
        else:
            save_model_folder(accelerator, models[0], os.path.join(output_dir, "unet"))
            save_target_folder(accelerator, target_unet, os.path.join(output_dir, "unet_target"))
        if weights:  # empty under DeepSpeed/FSDP, which save the model themselves
            weights.pop()

    def load_model_hook(models, input_dir):
        # under DeepSpeed/FSDP accelerate passes no models: they restored the student from their own files
        if models and use_lora:
            load_lora_checkpoint(unwrap(accelerator, models.pop()), input_dir)
        elif models:
            models.pop().load_state_dict(load_unet_weights(input_dir, "unet"))
        if not use_lora:
            load_whole_weights(target_unet, load_unet_weights(input_dir, "unet_target"))
        elif ema_adapter is not None:
            ema_adapter.load_state_dict(load_file(os.path.join(input_dir, EMA_ADAPTER_NAME)))

    return save_model_hook, load_model_hook


# Copied from train_lcm_distill_sd_wds.teacher_record
def teacher_record(flag, model, revision, denoiser):
    """What checkpoints record of the model a run learns from (the engine refuses a resume with another one): its
    flag, id or path and revision, and a fingerprint of its denoiser's weights (weights_fingerprint: the signs of
    each tensor's first values, cheap, the same in any precision). Of the base weights only: LoRA adapters, which
    train, are left out, and PEFT's wrapped names are read as the plain network's."""
    base = ((name.replace(".base_layer", ""), param) for name, param in denoiser.named_parameters()
            if "lora_" not in name)
    return {"flag": flag, "model": model, "revision": revision, "denoiser weights": weights_fingerprint(base)}


def decode_latents_to_image(pipeline, latents):
    """The first image of a batch of SDXL latents, decoded as the pipeline does but outside autocast."""
    vae = pipeline.vae
    latents_mean, latents_std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if latents_mean is not None and latents_std is not None:
        mean = torch.tensor(latents_mean).view(1, -1, 1, 1).to(latents.device, torch.float32)
        std = torch.tensor(latents_std).view(1, -1, 1, 1).to(latents.device, torch.float32)
        latents = latents.float() * std / vae.config.scaling_factor + mean
    else:
        latents = latents.float() / vae.config.scaling_factor
    with torch.autocast(latents.device.type, enabled=False):
        image = vae.decode(latents.to(vae.dtype)).sample
    return pipeline.image_processor.postprocess(image.float(), output_type="pil")[0]


def log_validation(args, accelerator, vae, text_encoders, tokenizers, unet, name, step, weight_dtype):
    """A grid of validation prompts (rows) x step counts 1, 2, 4, 8 (columns; PCM: those on its phase edges),
    sampled with the student's own scheduler, saved as PNG and logged."""
    prompts = args.validation_prompts  # parse_args resolves the default (see parse_and_check)
    if not prompts:
        return None
    scheduler = student_scheduler_for(args)
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
                                         unet=unwrap(accelerator, unet), scheduler=scheduler,
                                         force_zeros_for_empty_prompt=teacher_zeroes_empty_prompt(args))
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    with torch.no_grad(), eval_mode(pipeline.unet):
        for prompt in prompts:
            row = []
            for num_steps in validation_step_counts(args):
                generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
                # autocast for the text encoders and the UNet only: the VAE decodes in its own dtype (fp32 unless
                # an fp16-safe VAE was given), because the SDXL VAE overflows in fp16 and loses detail in bf16
                with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                    latents = pipeline(prompt, num_inference_steps=num_steps, eta=0.0, height=args.resolution,
                                       width=args.resolution, guidance_scale=args.validation_guidance_scale,
                                       generator=generator, output_type="latent").images
                row.append(decode_latents_to_image(pipeline, latents))
            rows.append(row)
    path = save_validation_grid(accelerator, args.output_dir, rows, f"{name}_step_{step:06d}.png", f"validation/{name}",
                                step)
    del pipeline
    free_memory()
    return path


def model_card_text(args, repo_id, validation_image=None):
    """The README.md of the output directory (and of the Hub repo)."""
    sampler = sampler_card(args)
    steps = ", ".join(map(str, validation_step_counts(args)))
    image_line = f"\n![validation grid: prompts x {steps} steps]({validation_image})\n" if validation_image else ""
    vae_line = (f'vae = AutoencoderKL.from_pretrained("{args.pretrained_vae_model_name_or_path}", '
                'torch_dtype=torch.float16)\n' if args.pretrained_vae_model_name_or_path else "")
    vae_kwarg = ", vae=vae" if vae_line else ""
    short = "PCM" if args.num_phases else "LCM"
    if args.use_lora:
        what = f"an {short}-LoRA adapter"
        load = (f'pipe = StableDiffusionXLPipeline.from_pretrained("{args.pretrained_teacher_model}"{vae_kwarg}, '
                f'torch_dtype=torch.float16)\npipe.load_lora_weights("{repo_id}")')
        imports = f"AutoencoderKL, {sampler['scheduler']}, StableDiffusionXLPipeline"
        guidance, tags = 1.0, ["lora", f"{short.lower()}-lora"]
        details = [("LoRA rank / alpha / dropout", f"{args.lora_rank} / {args.lora_alpha} / {args.lora_dropout}"),
                   ("LoRA targets", ", ".join(args.lora_target_modules)),
                   ("consistency target", f"EMA of the adapter, decay {args.ema_decay} (`ema_target/`)"
                    if args.ema_decay is not None else "the online adapter")]
        advice = ("Use `guidance_scale` between 1.0 and 2.0: the teacher's guidance is distilled into the adapter; "
                  "above 1.0 the pipeline runs ordinary classifier-free guidance with the adapter, and "
                  f"`negative_prompt` works as usual. `{KOHYA_WEIGHT_NAME}` holds the same weights in kohya format for "
                  "AUTOMATIC1111 and ComfyUI.")
    else:
        what = f"a {'Phased' if args.num_phases else 'Latent'} Consistency Model UNet"
        load = (f'unet = UNet2DConditionModel.from_pretrained("{repo_id}", subfolder="unet_target", '
                f'torch_dtype=torch.float16)\npipe = StableDiffusionXLPipeline.from_pretrained('
                f'"{args.pretrained_teacher_model}", unet=unet{vae_kwarg}, torch_dtype=torch.float16)')
        imports = f"AutoencoderKL, {sampler['scheduler']}, StableDiffusionXLPipeline, UNet2DConditionModel"
        tags = []
        details = [("EMA decay", args.ema_decay)]
        omega, guidance_scale = trained_guidance(args)
        guidance = example_guidance_scale(args)
        advice = (f"The guidance scale is a model input, trained with {omega}; the pipeline feeds "
                  f"`guidance_scale - 1`, so use {guidance_scale}. `unet_target` is the EMA network, `unet` the "
                  "online student.")
    method_tags = (["pcm", "phased-consistency-distillation"] if args.num_phases
                   else ["lcm", "latent-consistency-distillation"])
    front_matter = ModelCardData(base_model=args.pretrained_teacher_model, library_name="diffusers",
                                 license="openrail++", inference=True,
                                 tags=["stable-diffusion-xl", "text-to-image", "diffusers", *tags,
                                       *method_tags]).to_yaml()
    return f"""---
{front_matter}
---

# {repo_id}: {what} distilled from {args.pretrained_teacher_model}

Trained with {sampler["method"]} from `{args.pretrained_teacher_model}` by `train_lcm_distill_sdxl_wds.py`.
{sampler["sampling"]}
{image_line}
## Inference

```python
import torch
from diffusers import {imports}

{vae_line}{load}
pipe.scheduler = {sampler["scheduler"]}.from_pretrained("{repo_id}", subfolder="scheduler")  # the timesteps it was trained on
pipe.to("cuda")
image = pipe("a photo of a red fox in the snow", num_inference_steps={sampler["steps"]}, guidance_scale={guidance}{sampler["eta"]}).images[0]
```

{advice}

## Training

{training_table(args, [("teacher", f"`{args.pretrained_teacher_model}`"),
                       ("VAE", f"`{args.pretrained_vae_model_name_or_path or args.pretrained_teacher_model}`"),
                       ("data", f"`{args.train_shards_path_or_url}`")],
               [*details, *lcd_table_rows(args), ("trained guidance", trained_guidance(args)[0])])}"""


class LatentConsistencyDistillationXL:
    """LCD of an SDXL teacher (LCM paper, Algorithm 1), in one of two modes.

    Full: the frozen teacher (mixed-precision dtype unless --teacher_unet_fp32), an fp32 student (the teacher's UNet
    plus an omega embedding) and its fp32 EMA target. LoRA (--use_lora, LCM-LoRA): one UNet whose base is frozen in
    the mixed-precision dtype with fp32 adapters; the teacher is that UNet with its adapters off, the target is the
    same UNet with the EMA adapter in place (--ema_decay none: the online student). The text encoders run in the
    mixed-precision dtype; the SDXL VAE overflows in fp16, so it stays fp32 unless
    --pretrained_vae_model_name_or_path names another (fp16-safe) VAE."""

    def __init__(self, args, accelerator):
        self.args, self.accelerator = args, accelerator
        if not args.use_lora:
            check_ema_sharding(accelerator)
        device, self.weight_dtype = accelerator.device, weight_dtype_for(accelerator.mixed_precision)
        try:
            noise_scheduler, self.tokenizers, self.text_encoders, self.vae, teacher_unet, unet, self.target_unet = (
                load_models(args, self.weight_dtype))
        except LoraTargetError as error:
            raise SystemExit(f"error: {error}") from None
        # LoRA mode: the teacher is the UNet's base weights
        self.teacher = teacher_record("--pretrained_teacher_model", args.pretrained_teacher_model,
                                      args.teacher_revision, unet if args.use_lora else teacher_unet)
        for frozen in (self.vae, *self.text_encoders, teacher_unet, self.target_unet):
            if frozen is not None:  # LoRA mode has no separate teacher or target network
                frozen.requires_grad_(False)
                frozen.eval()
        unet.train()
        for model in (self.vae, *self.text_encoders, teacher_unet, unet, self.target_unet):
            if model is not None:
                model.to(device)
        set_denoiser_kernels(args, unet, teacher_unet, self.target_unet)
        if self.target_unet is not None:
            self.target_unet = shard_like_prepared(accelerator, self.target_unet)  # FSDP: each rank keeps a slice
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.modules = [unet]
        mode = "LoRA" if args.use_lora else "full UNet"
        self.title = f"LCD for SDXL ({mode}, {sum(p.numel() for p in self.optimizer_params()):,} trainable parameters)"
        self.ema_adapter = None
        if args.use_lora and args.ema_decay is not None:
            if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                raise SystemExit("error: --ema_decay with --use_lora runs on one process or under DDP: FSDP and "
                                 "DeepSpeed shard the adapter the EMA copies; drop --ema_decay or the sharding")
            self.ema_adapter = EmaAdapter(unet)

        self.ctx = make_lcd_context(
            args, noise_scheduler, unet, teacher_unet=unet if args.use_lora else teacher_unet,
            target_unet=unet if args.use_lora else self.target_unet,
            w_embedding_dim=0 if args.use_lora else unet.config.time_cond_proj_dim, device=device,
            autocast=accelerator.autocast, teacher_is_student_without_adapters=args.use_lora,
            target_weights=self.ema_adapter.in_place if self.ema_adapter else None)
        # SDXL base zeroes the unconditional text inputs; a teacher whose pipeline does not is guided against ""
        self.empty_prompt = (None if teacher_zeroes_empty_prompt(args)
                             else encode_prompts_sdxl(self.text_encoders, self.tokenizers, [""]))

    def use_prepared(self, modules):
        self.modules = list(modules)
        self.ctx.unet = modules[0]
        if self.args.use_lora:  # teacher (adapters off) and target are the student itself, unwrapped
            self.ctx.teacher_unet = self.ctx.target_unet = unwrap(self.accelerator, modules[0])

    def optimizer_params(self):
        return [p for p in self.modules[0].parameters() if p.requires_grad]  # LoRA: the adapters only

    def loss(self, batch):
        args = self.args
        latents = latents_from_batch(self.vae, batch, args.vae_encode_batch_size)
        prompt_embeds, pooled_embeds = text_embeddings_from_batch(
            batch, lambda captions: encode_prompts_sdxl(self.text_encoders, self.tokenizers, captions), latents.device)
        time_ids = compute_time_ids(batch["original_sizes"], batch["crop_top_lefts"], args.resolution,
                                    args.use_fix_crop_and_size).to(latents.device)
        cond = unet_conditioning(prompt_embeds, pooled_embeds, time_ids)
        return distillation_loss(self.ctx, latents, cond, unconditional_conditioning(cond, self.empty_prompt)), {}

    def after_update(self, step):
        if self.ema_adapter is not None:  # LoRA mode: the EMA of the adapter
            self.ema_adapter.update(self.args.ema_decay)
        elif not self.args.use_lora:
            student = unwrap(self.accelerator, self.modules[0])
            update_ema(self.target_unet.parameters(), student.parameters(), self.args.ema_decay)

    def checkpoint_hooks(self, accelerator):
        return checkpoint_hooks(accelerator, self.target_unet, self.args.use_lora, self.ema_adapter)

    @staticmethod
    def checkpoint_files(args):
        if args.use_lora:  # what checkpoint_hooks write
            return [LORA_WEIGHT_NAME] + ([EMA_ADAPTER_NAME] if args.ema_decay is not None else [])
        return ["unet/", "unet_target/"]

    @staticmethod
    def checkpoint_settings(args):
        if args.use_lora:
            return {"--lora_rank": args.lora_rank, "--lora_alpha": args.lora_alpha,
                    "--lora_target_modules": list(args.lora_target_modules),
                    "--ema_decay": "none" if args.ema_decay is None else "a decay"}  # the EMA adapter: kept or not
        return {"--unet_time_cond_proj_dim": args.unet_time_cond_proj_dim}  # the omega embedding's size

    def validate(self, step):
        networks = ([("lora", self.modules[0])] if self.args.use_lora
                    else [("unet", self.modules[0]), ("unet_target", self.target_unet)])
        paths = [log_validation(self.args, self.accelerator, self.vae, self.text_encoders, self.tokenizers, model,
                                name, step, self.weight_dtype) for name, model in networks]
        return paths[-1]  # the model card shows what users load: the EMA target, or the adapter

    def save_outputs(self):
        args, accelerator, unet = self.args, self.accelerator, self.modules[0]
        if args.use_lora:
            full_state = full_state_dict(accelerator, unet)  # every rank: under DeepSpeed/FSDP it gathers shards
            if accelerator.is_main_process:
                save_lora_files(unwrap(accelerator, unet), args.output_dir,
                                dtype=weight_dtype_for(args.save_precision), full_state=full_state)
                if self.ema_adapter is not None:  # the EMA target as an adapter folder of its own
                    with self.ema_adapter.in_place():
                        save_lora_files(unwrap(accelerator, unet), os.path.join(args.output_dir, "ema_target"),
                                        dtype=weight_dtype_for(args.save_precision))
        else:
            save_model_folder(accelerator, unet, os.path.join(args.output_dir, "unet"))  # gathers shards
            save_target_folder(accelerator, self.target_unet, os.path.join(args.output_dir, "unet_target"))  # too
        if accelerator.is_main_process:
            student_scheduler_for(args).save_pretrained(os.path.join(args.output_dir, "scheduler"))

    # Copied from train_lcm_distill_sd_wds.LatentConsistencyDistillation.model_card
    def model_card(self, repo_id, validation_image):
        return model_card_text(self.args, repo_id, validation_image)

    def close(self):
        pass


# ==========================================================================================================
# region ENGINE copied from train_lcm_distill_sd_wds
# ==========================================================================================================


# ----------------------------------------
# Flags and checks every script shares
# ----------------------------------------


# what validation draws when no --validation_prompts are given and the model folder has no VALIDATION_PROMPTS_FILE
DEFAULT_VALIDATION_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse at dawn",
]
VALIDATION_PROMPTS_FILE = "validation_prompts.txt"
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
OPTIMIZER_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}  # the optional ones
SCRIPT_LEARNING_RATE = "script_learning_rate"  # where add_engine_args leaves the script's default --learning_rate


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no 60-flag usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse `type` for a number of `kind` (int or float) in [low, high] (an end excluded when open).
    NaN and infinities are refused, so every numeric flag fails at parse time, in one line, when out of range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value > high or high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    parse.bounds = (low, high, low_open, high_open)  # for the tests that walk every flag
    return parse


def add_engine_args(parser, *, output_dir, learning_rate, train_batch_size=16, lr_warmup_steps=500,
                    adam_weight_decay=0.0, validation_steps=200, tracker_project_name="text2image-fine-tune"):
    """The flags every script shares: optimiser, precision, run control, output and Hub. The keyword arguments
    are the defaults that differ between scripts (`learning_rate` None: the script resolves it itself)."""
    group = parser.add_argument_group("optimiser")
    group.add_argument("--optimizer", type=str, default=None, choices=OPTIMIZERS,
                       help="adamw (default; fused on CUDA), adamw8bit (bitsandbytes: 8-bit state), prodigy "
                            "(prodigyopt: estimates its own step size; --learning_rate is a multiplier, default 1.0) "
                            "or adafactor (transformers: factored second moments, no first moment by default; run "
                            "with the given --learning_rate and schedule, relative_step off).")
    group.add_argument("--learning_rate", type=bounded(float, 0, None, low_open=True), default=None,
                       help=f"Peak learning rate (default: {learning_rate if learning_rate is not None else 'per mode'}"
                            ", 1.0 with --optimizer prodigy).")
    parser.set_defaults(**{SCRIPT_LEARNING_RATE: learning_rate})  # resolved by check_optimizer_args, then dropped
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by batch size x accumulation steps x number of processes.")
    group.add_argument("--lr_scheduler", type=str, default="constant",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"])
    group.add_argument("--lr_warmup_steps", type=bounded(int, 0, None),
                       default=lr_warmup_steps, help="Warm-up length in optimiser steps.")
    group.add_argument("--lr_num_cycles", type=bounded(int, 1, None),
                       default=1, help="Restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=bounded(float, 0, None, low_open=True),
                       default=1.0, help="Power of the polynomial schedule.")
    group.add_argument("--adam_beta1", type=bounded(float, 0, 1, high_open=True), default=0.9,
                       help="First-moment decay of adamw, adamw8bit and prodigy.")
    group.add_argument("--adam_beta2", type=bounded(float, 0, 1, high_open=True), default=0.999,
                       help="Second-moment decay of adamw, adamw8bit and prodigy.")
    group.add_argument("--adam_weight_decay", type=bounded(float, 0, None), default=adam_weight_decay,
                       help="Decoupled weight decay (every --optimizer).")
    group.add_argument("--adam_epsilon", type=bounded(float, 0, None, low_open=True), default=1e-08,
                       help="Denominator epsilon of adamw, adamw8bit and prodigy.")
    group.add_argument("--use_8bit_adam", action="store_true", help="Alias of --optimizer adamw8bit.")
    group.add_argument("--prodigy_beta3", type=bounded(float, 0, 1, low_open=True, high_open=True), default=None,
                       help="Prodigy: decay of its step-size estimate (default: the square root of --adam_beta2).")
    group.add_argument("--prodigy_d_coef", type=bounded(float, 0, None, low_open=True), default=None,
                       help="Prodigy: multiplier of the estimated step size (default 1.0; below 1 is more careful).")
    group.add_argument("--prodigy_decouple", action=argparse.BooleanOptionalAction, default=None,
                       help="Prodigy: AdamW-style decoupled weight decay (default: on).")
    group.add_argument("--prodigy_use_bias_correction", action=argparse.BooleanOptionalAction, default=None,
                       help="Prodigy: Adam's bias correction (default: on, as diffusers recommends for diffusion).")
    group.add_argument("--prodigy_safeguard_warmup", action=argparse.BooleanOptionalAction, default=None,
                       help="Prodigy: keep the step-size estimate from growing during learning-rate warm-up "
                            "(default: on).")
    group.add_argument("--adafactor_beta1", type=bounded(float, 0, 1, high_open=True), default=None,
                       help="Adafactor: first-moment decay (default: none, no first moment: the memory saving).")
    group.add_argument("--adafactor_decay_rate", type=bounded(float, -1, 0, high_open=True), default=None,
                       help="Adafactor: exponent of its second-moment decay 1 - step^rate (default -0.8).")
    group.add_argument("--adafactor_clip_threshold", type=bounded(float, 0, None, low_open=True), default=None,
                       help="Adafactor: clip each update to this root-mean-square (default 1.0).")
    group.add_argument("--adafactor_scale_parameter", action="store_true", default=None,
                       help="Adafactor: scale the learning rate by each parameter's root-mean-square.")
    group.add_argument("--max_grad_norm", type=bounded(float, 0, None),
                       default=1.0, help="Gradient clipping norm (0 disables); under DeepSpeed it sets DeepSpeed's "
                                         "gradient_clipping.")

    group = parser.add_argument_group("precision and speed")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Overrides the accelerate config. Trained weights stay fp32.")
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="Trade compute for the trained network's activation memory.")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (default: PyTorch scaled-dot-product attention).")
    group.add_argument("--channels_last", action="store_true",
                       help="Keep the UNets' weights (and so their activations) channels-last (NHWC): the layout "
                            "tensor-core convolutions prefer on recent GPUs; measure it with benchmarks/gpu_check.sh.")

    group = parser.add_argument_group("run control")
    group.add_argument("--train_batch_size", type=bounded(int, 1, None), default=train_batch_size,
                       help="Examples per process and micro-step.")
    group.add_argument("--max_train_steps", type=bounded(int, 1, None), default=None,
                       help="Optimiser steps; overrides --num_train_epochs.")
    group.add_argument("--num_train_epochs", type=bounded(int, 1, None), default=1,
                       help="Passes over the training data, used when --max_train_steps is not set (a shard "
                            "stream's pass is --max_train_samples samples).")
    group.add_argument("--gradient_accumulation_steps", type=bounded(int, 1, None), default=1)
    group.add_argument("--seed", type=bounded(int, 0, 2**32 - 1),
                       default=None, help="Seed for a reproducible (and resumable-equal) run.")
    group.add_argument("--validation_steps", type=bounded(int, 0, None), default=validation_steps,
                       help="Validate every N optimiser steps (and at the end); 0 validates only at the end.")
    group.add_argument("--checkpointing_steps", type=bounded(int, 1, None),
                       default=500, help="Save a resumable checkpoint every N steps.")
    group.add_argument("--checkpoints_total_limit", type=bounded(int, 1, None),
                       default=None, help="Keep at most this many checkpoints.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="'latest' or a checkpoint directory ('latest' with none saved starts fresh).")
    group.add_argument("--allow_topology_change", action="store_true",
                       help="Resume even though processes, loader workers, batch size, accumulation, seed or the "
                            "training data differ from the checkpoint's run; the data position is then approximate.")
    group.add_argument("--max_nonfinite_steps", type=bounded(int, 1, None), default=3,
                       help="Skip optimiser steps whose loss is NaN/inf; stop after this many in a row.")

    group = parser.add_argument_group("output and logging")
    group.add_argument("--output_dir", type=str, default=output_dir)
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Train into an --output_dir that already holds a finished run.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker directory, relative to --output_dir.")
    group.add_argument("--report_to", type=str, default="tensorboard",
                       help="'tensorboard', 'wandb', 'all' or a comma-separated list of accelerate trackers.")
    group.add_argument("--tracker_project_name", type=str, default=tracker_project_name)

    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the output directory to the Hub at the end.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: output_dir name).")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `huggingface-cli login`).")


def looks_like_local_path(name):
    """True when `name` can only mean a local path (hub ids are 'org/name' without a leading '.', '/' or '~')."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name


def parse_and_check(parser, input_args, model_kind, model_flag="pretrained_teacher_model", resolution_multiple=8):
    """Parse the command line, then run the checks every script shares: one line each, before any model loads.
    `model_kind` and `resolution_multiple` are the METHOD's: see check_model_kinds and check_common_args."""
    args = parser.parse_args(input_args)
    check_model_kinds(parser, args, model_kind, model_flag)
    check_common_args(parser, args, model_flag, resolution_multiple)
    if args.validation_prompts is None:
        args.validation_prompts = teacher_validation_prompts(getattr(args, model_flag)) or DEFAULT_VALIDATION_PROMPTS
    return args


def check_common_args(parser, args, model_flag="pretrained_teacher_model", resolution_multiple=8):
    """Checks shared by every script: fail at start-up, in one line, before any model is loaded.
    `resolution_multiple`: what the image side must divide by, 8 for a UNet under an 8x VAE, 8 x the patch size
    for a transformer that cuts the latents into patches (PixArt: 16)."""
    if args.resolution % resolution_multiple != 0 or args.resolution <= 0:
        why = "the VAE downsamples by 8" + (f" and the denoiser takes patches of {resolution_multiple // 8} latent "
                                            "pixels" if resolution_multiple != 8 else "")
        parser.error(f"--resolution must be a positive multiple of {resolution_multiple} ({why}), got "
                     f"{args.resolution}")
    model = getattr(args, model_flag)
    if looks_like_local_path(model) and not os.path.isdir(os.path.expanduser(model)):
        parser.error(f"--{model_flag}: no such directory: {model}")
    vae_path = getattr(args, "pretrained_vae_model_name_or_path", None)
    if vae_path and looks_like_local_path(vae_path) and not os.path.isdir(os.path.expanduser(vae_path)):
        parser.error(f"--pretrained_vae_model_name_or_path: no such directory: {vae_path}")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        parser.error("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (CUDA only)")
    check_optimizer_args(parser, args)
    trackers = {"tensorboard", "wandb"} if args.report_to == "all" else set(args.report_to.split(","))
    if args.hub_token is not None and "wandb" in trackers:
        parser.error(
            "--hub_token together with --report_to wandb would leak the token into the wandb config; "
            "log in with `huggingface-cli login` instead"
        )
    problem = report_to_problem(args.report_to)
    if problem:
        parser.error(problem)
    if args.resume_from_checkpoint not in (None, "latest"):
        path = args.resume_from_checkpoint
        if not os.path.isdir(path) and not os.path.isdir(os.path.join(args.output_dir, path)):
            parser.error(f"--resume_from_checkpoint: no such checkpoint directory: {path}")
        path = path if os.path.isdir(path) else os.path.join(args.output_dir, path)
        if not os.path.isfile(os.path.join(path, "training_state.json")):
            parser.error(f"--resume_from_checkpoint: {path} is incomplete (no training_state.json)")
    check_push_to_hub(parser, args)
    check_output_dir(parser, args)


def check_optimizer_args(parser, args):
    """--optimizer (--use_8bit_adam is its alias), its package installed, no flag of another optimiser (it would
    do nothing), and the learning rate: the script's default, or 1.0 for Prodigy, whose rate multiplies the step
    size it estimates itself (1e-4 there would barely move the weights)."""
    flag = f"--optimizer {args.optimizer}"
    if args.use_8bit_adam:
        if args.optimizer not in (None, "adamw8bit"):
            parser.error(f"--use_8bit_adam is an alias of --optimizer adamw8bit; it contradicts {flag}")
        args.optimizer, flag = "adamw8bit", "--use_8bit_adam"
    args.optimizer = args.optimizer or "adamw"
    args.use_8bit_adam = args.optimizer == "adamw8bit"
    package = OPTIMIZER_PACKAGES.get(args.optimizer)
    if package and importlib.util.find_spec(package) is None:
        parser.error(f"{flag} needs {package}: pip install {package}")
    for name, value in sorted(vars(args).items()):
        kind = name.split("_")[0]
        if kind in ("prodigy", "adafactor") and value is not None and kind != args.optimizer:
            parser.error(f"--{name} applies to --optimizer {kind} only (this run uses {args.optimizer})")
    script_default = vars(args).pop(SCRIPT_LEARNING_RATE, None)
    if args.learning_rate is None:
        args.learning_rate = 1.0 if args.optimizer == "prodigy" else script_default


TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX")}  # where a tracker's module is not its own name


def report_to_problem(report_to):
    """Why --report_to cannot be honoured, or None: a tracker accelerate does not know (a typo such as
    'tensorbord') or one that is not installed. accelerate itself only warns and trains without it: a run that
    tracks nothing, noticed when it is over."""
    known = list(LOGGER_TYPE_TO_CLASS)

    def is_installed(name):
        return any(importlib.util.find_spec(module) for module in TRACKER_MODULES.get(name, (name,)))

    for name in tracker_names(report_to) or []:
        if name not in known or not is_installed(name):
            installed = ", ".join(tracker for tracker in known if is_installed(tracker)) or "none"
            if name not in known:
                return (f"--report_to: unknown tracker {name!r}; accelerate knows {', '.join(known)} (installed here: "
                        f"{installed}), or 'none'")
            return f"--report_to {name}: {name} is not installed (pip install {name}); installed trackers: {installed}"
    return None


def hub_is_offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when it was set after huggingface_hub was imported."""
    value = os.environ.get("HF_HUB_OFFLINE")
    return is_offline_mode() if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_repo_id(args):
    return args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))


def check_push_to_hub(parser, args):
    """--push_to_hub uploads when training is over: refuse now, before any model loads, what would make that upload
    fail after hours of training: the Hub offline, no token, a repository that cannot be created. The main process
    creates the repository now (the upload would anyway), which proves the token works and may create it."""
    if not args.push_to_hub:
        return
    if hub_is_offline():
        parser.error("--push_to_hub: the Hub is offline here (HF_HUB_OFFLINE is set); unset it, or train without "
                     "--push_to_hub and upload the output dir afterwards (`hf upload`)")
    if not (args.hub_token or get_token()):
        parser.error("--push_to_hub needs a Hub token: log in with `hf auth login` (or set HF_TOKEN)")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    repo_id = hub_repo_id(args)
    try:
        create_repo(repo_id=repo_id, exist_ok=True, token=args.hub_token)
    except Exception as error:  # HTTP, permission and name errors come in many types; the message says which
        parser.error(f"--push_to_hub: cannot create the Hub repository {repo_id}: {error_summary(error)}")


def error_summary(error):
    """The first line of an error's message (library errors can span many), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_output_dir(parser, args, min_free_bytes=2**30):
    """Refuse, before any model loads, an --output_dir that cannot take this run: one holding a finished run or
    an earlier run's checkpoints (unless this run resumes one, or --overwrite_output_dir, which deletes those
    checkpoints), one that cannot be written, one on a nearly full disk, one that another run is writing to."""
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per run: the other ranks of this launch share it
        OutputDirLock.acquire(parser, args.output_dir)
    resumes = args.resume_from_checkpoint not in (None, "latest") or (
        args.resume_from_checkpoint == "latest" and complete_checkpoints(args.output_dir))
    if not resumes:
        card = os.path.join(args.output_dir, "README.md")
        finished = False
        if os.path.isfile(card):
            with open(card, encoding="utf-8", errors="replace") as f:
                finished = "library_name: diffusers" in f.read()
        earlier = complete_checkpoints(args.output_dir)
        if (finished or earlier) and not args.overwrite_output_dir:
            what = ("a finished run (see its README.md)" if finished
                    else f"checkpoints of an earlier run ({earlier[-1]})")
            parser.error(f"--output_dir {args.output_dir} already holds {what}: pass --resume_from_checkpoint latest "
                         "to continue it, or --overwrite_output_dir to start over (its checkpoints are deleted)")
        if args.overwrite_output_dir:  # a later 'latest' must never pick the old run's checkpoints
            for name in list_checkpoints(args.output_dir):
                shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, f".write-test-{os.uname().nodename}-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        parser.error(f"--output_dir {args.output_dir} is not writable: {error.strerror or error}")
    free = shutil.disk_usage(args.output_dir).free
    if free < min_free_bytes:
        parser.error(f"--output_dir {args.output_dir}: only {free / 2**30:.2f} GiB free on its disk; checkpoints need "
                     f"at least {min_free_bytes / 2**30:.0f} GiB")


def read_config_class(path):
    """`_class_name` of a diffusers config file, '' when it has none; None when the file is absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return str(config.get("_class_name", "")) if isinstance(config, dict) else None


def pipeline_kind_problem(path, kind):
    """Why the local folder `path` is not a diffusers pipeline of `kind` ('sd': SD 1.x / 2.x, 'sdxl'), or None.

    Reads config files only (model_index.json, unet/config.json), so the wrong model is named in one line before
    any weight loads instead of a traceback after."""
    expected = {"sd": "a Stable Diffusion 1.x/2.x pipeline", "sdxl": "an SDXL pipeline"}[kind]
    if not os.listdir(path):
        return f"{path} is empty; expected {expected} folder (model_index.json, unet/, vae/, text_encoder/, ...)"
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        found = read_config_class(os.path.join(path, "config.json"))
        what = f"a single {found} folder" if found else "not a diffusers pipeline folder (no model_index.json)"
        return f"{path} is {what}; expected {expected} folder (model_index.json, unet/, vae/, text_encoder/, ...)"
    with open(index_path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except ValueError:
            return f"{index_path} is not valid JSON"
    pipeline = str(index.get("_class_name", "?")) if isinstance(index, dict) else "?"
    unet_config = {}
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
            unet_config = json.load(f)
    is_sdxl = (isinstance(index, dict) and "text_encoder_2" in index or "XL" in pipeline
               or isinstance(unet_config, dict) and unet_config.get("addition_embed_type") == "text_time")
    if kind == "sd" and is_sdxl:
        return (f"{path} is an SDXL pipeline ({pipeline}); expected {expected} (for SDXL use "
                "train_lcm_distill_sdxl_wds.py)")
    if kind == "sdxl" and not is_sdxl:
        return (f"{path} is a {pipeline} without SDXL's second text encoder and text_time conditioning; expected "
                f"{expected} (for SD 1.x/2.x use train_lcm_distill_sd_wds.py or train_lcm_distill_lora_sd_wds.py)")
    parts = ["scheduler", "tokenizer", "text_encoder", "vae", "unet"]
    parts += ["tokenizer_2", "text_encoder_2"] if kind == "sdxl" else []
    for part in parts:
        if not os.path.isdir(os.path.join(path, part)):
            return f"{path} ({pipeline}) has no {part}/ folder; expected {expected} with {', '.join(parts)}"
    unet_class = read_config_class(os.path.join(path, "unet", "config.json"))
    if unet_class != "UNet2DConditionModel":
        found = f"a {unet_class}" if unet_class else "no readable config.json"
        return f"{path}/unet holds {found}; expected a UNet2DConditionModel"
    return None


def vae_kind_problem(path):
    """Why the local folder `path` given as a VAE is not an AutoencoderKL folder, or None (config files only)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return f"{path} is a whole pipeline; pass its vae/ subfolder (expected an AutoencoderKL folder)"
    found = read_config_class(os.path.join(path, "config.json"))
    if found != "AutoencoderKL":
        what = f"a {found} folder" if found else "not a diffusers model folder (no config.json)"
        return f"{path} is {what}; expected an AutoencoderKL (VAE) folder"
    return None


def native_resolution(path):
    """The image size a local pipeline folder was made for: its denoiser's sample_size (in latent pixels; unet/ or
    transformer/) times the VAE's downsampling factor (2 ** (VAE blocks - 1)), from the config files; None where
    they are not local."""
    try:
        denoiser = "unet" if os.path.isdir(os.path.join(path, "unet")) else "transformer"
        with open(os.path.join(path, denoiser, "config.json"), encoding="utf-8") as f:
            sample_size = json.load(f)["sample_size"]
        with open(os.path.join(path, "vae", "config.json"), encoding="utf-8") as f:
            vae_factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        return int(sample_size) * vae_factor
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolution_warning(path, resolution, model_flag="pretrained_teacher_model"):
    """One line when --resolution is more than 2x off the model's native size, either way, else None: a 32 px toy
    teacher trained at the default 512 costs 256x the compute per step, and a model far below its size draws
    nothing it learned; both run without an error, so say it before the models load."""
    native = native_resolution(os.path.expanduser(path))
    if native is None or native / 2 <= resolution <= native * 2:
        return None
    cost = (resolution / native) ** 2
    effect = (f"each step costs about {cost:.0f}x the compute and memory of {native} px" if cost > 1
              else "the model works far below the size it learned")
    return (f"--resolution {resolution} is far from the {native} px that --{model_flag} {path} was made for "
            f"(denoiser sample_size x VAE factor): {effect}; pass --resolution {native} unless that is intended")


def teacher_validation_prompts(path):
    """The prompts a local model folder lists in validation_prompts.txt (one a line), or None: a model that only
    knows a small world (the toy teachers) names what validation should draw, where the default prompts would
    be out of its vocabulary and over its tokenizer's length."""
    try:
        with open(os.path.join(os.path.expanduser(path), VALIDATION_PROMPTS_FILE), encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError:
        return None
    return prompts or None


def check_model_kinds(parser, args, kind, model_flag="pretrained_teacher_model"):
    """Refuse, in one line, local model folders of the wrong kind. Hub ids are left to loading: nothing is
    downloaded here. `kind` is 'sd' or 'sdxl' (pipeline_kind_problem), or the METHOD's own check for a teacher of
    another kind: a function of the local folder's path that returns why it does not fit, or None."""
    path = os.path.expanduser(getattr(args, model_flag))
    if os.path.isdir(path):
        problem = kind(path) if callable(kind) else pipeline_kind_problem(path, kind)
        if problem:
            parser.error(f"--{model_flag}: {problem}")
    vae_path = getattr(args, "pretrained_vae_model_name_or_path", None)
    if vae_path and os.path.isdir(os.path.expanduser(vae_path)):
        problem = vae_kind_problem(os.path.expanduser(vae_path))
        if problem:
            parser.error(f"--pretrained_vae_model_name_or_path: {problem}")


# ----------------------------------------
# Precision
# ----------------------------------------


def weight_dtype_for(mixed_precision):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def set_denoiser_kernels(args, *denoisers):
    """xformers attention with --enable_xformers_memory_efficient_attention (else diffusers' default, PyTorch
    SDPA), and channels-last weights with --channels_last: a convolution given channels-last weights computes
    and returns channels-last, so the whole UNet runs in that layout. None entries (absent networks) skipped."""
    for denoiser in denoisers:
        if denoiser is None:
            continue
        if args.enable_xformers_memory_efficient_attention:
            denoiser.enable_xformers_memory_efficient_attention()
        if args.channels_last:
            denoiser.to(memory_format=torch.channels_last)


def free_unused_vae_halves(vae, *, encodes, decodes):
    """Drop the half of the VAE a run never calls: the encoder once latents are cached or precomputed, the decoder
    when nothing is validated. The 1x1 quant convs stay (a few dozen weights): a VAE with both halves gone still
    has a device, a dtype and a config to sample precomputed latents with."""
    if not encodes:
        vae.encoder = None
    if not decodes:
        vae.decoder = None


def from_pretrained_in_dtype(model_class, dtype, location, **kwargs):
    """`model_class.from_pretrained(location, torch_dtype=dtype, **kwargs)` without its memory transient.

    With a dtype, from_pretrained reads the whole checkpoint at its stored precision before it casts: SD 1.5's fp32
    UNet file adds 3.4 GB to the 1.7 GB of its bf16 weights, SDXL's 10 GB. Without one, diffusers and transformers
    only memory-map the file. Each tensor is then read from a mapping of its own that closes at once, and cast, so
    at most one stored-precision tensor is resident at a time, and every weight ends in memory of its own (trained
    weights are updated in place). Tensors the files do not hold as loaded (other formats, converted keys) are cast
    from the loaded model instead; weights from_pretrained left on the meta device (missing) stay there."""
    model = model_class.from_pretrained(location, **kwargs)
    tensor_files = safetensors_files_by_key(location, **kwargs)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        target = torch.float32 if keep_fp32.intersection(name.split(".")) else dtype
        stored = read_safetensor(tensor_files.get(name), name)
        loaded = tensor.detach()
        if (stored is None or stored.shape != loaded.shape
                or not torch.equal(stored.flatten()[:16], loaded.flatten()[:16].to(stored.dtype))):
            stored = loaded
        tensor.data = stored.to(target, copy=True)
    return model


def scheduler_from_pretrained(scheduler_class, location, subfolder="scheduler", revision=None, cache_dir=None,
                              **overrides):
    """`scheduler_class` on the noise schedule of the scheduler config at `location`, whichever class wrote it,
    with `overrides`. Only the keys `scheduler_class` knows are read: from_pretrained keeps the others in its
    config (an LCMScheduler made from a DPM-Solver teacher's config carries 16 of them), and a saved copy then
    warns about each at every load."""
    config = scheduler_class.load_config(location, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    known = inspect.signature(scheduler_class.__init__).parameters
    return scheduler_class.from_config({key: value for key, value in config.items() if key in known}, **overrides)


def safetensors_files_by_key(location, subfolder=None, variant=None, revision=None, cache_dir=None, **_):
    """{state-dict key: the .safetensors file holding it} for a model folder, or for a Hub id's files that
    from_pretrained has just put in the cache; {} where there are none (then the loaded model is cast)."""
    folder = os.path.join(location, subfolder or "")
    if not os.path.isdir(folder):
        try:
            snapshot = snapshot_download(location, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # not a cached Hub repository either: cast the loaded model
            return {}
        folder = os.path.join(snapshot, subfolder or "")
    if not os.path.isdir(folder):
        return {}
    # names like diffusion_pytorch_model[.fp16].safetensors or model[.fp16]-00001-of-00002.safetensors
    names = [name for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")
             and (f".{variant}." in name or f".{variant}-" in name if variant else name.count(".") == 1)]
    files = {}
    for name in names:
        path = os.path.join(folder, name)
        with safe_open(path, framework="pt") as checkpoint:
            files.update(dict.fromkeys(checkpoint.keys(), path))
    return files


def read_safetensor(path, key):
    if path is None:
        return None
    with safe_open(path, framework="pt") as checkpoint:  # closed at once: the pages it read leave this process
        return checkpoint.get_tensor(key)


def cast_floats(value, dtype):
    """`value` with every floating-point tensor in it (nested dicts too) cast to `dtype`; integers unchanged."""
    if isinstance(value, dict):
        return {key: cast_floats(item, dtype) for key, item in value.items()}
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    return value


def unet_call(unet, sample, timesteps, **conditioning):
    """diffusers' UNet2DConditionModel call: the default `call` of denoiser_forward. A METHOD whose denoiser is
    called otherwise (a DiT: timestep by keyword, learned sigma in extra output channels) passes its own function
    of the same signature that returns the prediction tensor."""
    return unet(sample, timesteps, **conditioning).sample


def denoiser_forward(denoiser, sample, timesteps, call=None, **conditioning):
    """The denoiser's prediction in fp32, through `call` (default unet_call), its floating inputs cast to the
    dtype of the denoiser's own weights.

    Explicit casts make the math the same with and without autocast: DeepSpeed and CPU runs in fp16/bf16 have
    no autocast, and a frozen fp16 network fed fp32 inputs (or an fp32 student fed fp16 text embeddings) fails.
    """
    dtype = next(denoiser.parameters()).dtype
    return (call or unet_call)(denoiser, sample.to(dtype), timesteps, **cast_floats(conditioning, dtype)).float()


@torch.no_grad()
def update_ema(target_params, source_params, decay):
    """theta- <- mu * theta- + (1 - mu) * theta, as one fused foreach op (torch has no public name for it; its
    optimisers use the same). Not diffusers' EMAModel: its decay is 0 at step 1, and the target needs a forward.

    Under FSDP both networks are sharded alike (`shard_like_prepared`): each rank lerps its own slice of every
    parameter, with no communication."""
    target_params, source_params = list(target_params), list(source_params)
    if any(isinstance(t, DTensor) != isinstance(p, DTensor) for t, p in zip(target_params, source_params)):
        raise RuntimeError("the EMA target and the student are not sharded alike (see shard_like_prepared)")
    target_params = [t.to_local() if isinstance(t, DTensor) else t for t in target_params]
    source_params = [p.to_local() if isinstance(p, DTensor) else p for p in source_params]
    torch._foreach_lerp_(target_params, [p.to(t.dtype) for t, p in zip(target_params, source_params)], 1.0 - decay)


@contextlib.contextmanager
def eval_mode(*models):
    """Models in eval mode for the block (no dropout, LoRA dropout included), then back as they were."""
    models = [m for m in models if m is not None]
    was_training = [m.training for m in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, was_training):
            model.train(mode)


# ----------------------------------------
# Checkpoints
# ----------------------------------------


def list_checkpoints(output_dir):
    """checkpoint-<step> directories in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def complete_checkpoints(output_dir):
    """The checkpoints whose writing finished (training_state.json is written last), oldest first."""
    return [name for name in list_checkpoints(output_dir)
            if os.path.isfile(os.path.join(output_dir, name, "training_state.json"))]


def rotate_checkpoints(output_dir, total_limit, newest_step):
    """Delete the oldest complete checkpoints so that at most `total_limit` remain. Called after a save, so
    a save that fails never leaves the run without the checkpoints it had (accelerate's
    ProjectConfiguration(total_limit) deletes before saving, and its saves are not atomic). Checkpoints after
    `newest_step`, the one just saved, are left alone: damaged ones that a resume skipped, which this run
    replaces when it gets there; counting them would delete the good checkpoints before them."""
    if total_limit is None:
        return
    checkpoints = [name for name in complete_checkpoints(output_dir) if int(name.split("-")[1]) <= newest_step]
    for name in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        logger.info(f"removing old checkpoint {name} (--checkpoints_total_limit {total_limit})")
        shutil.rmtree(os.path.join(output_dir, name))


class DamagedCheckpoint(Exception):
    """A checkpoint that a resume cannot read in full; the message names what is missing or broken."""


def find_resume_checkpoint(args, accelerator, record, checkpoint_files=(), count_keys=()):
    """(checkpoint dir, its training state) to resume from, or (None, None) to start fresh; before any model loads.

    Every file the resume will read is checked first: training_state.json and its fields, accelerate's own state
    in this regime, and `checkpoint_files`, what the method's checkpoint hooks wrote. An explicit
    --resume_from_checkpoint that lacks one is refused in one line; `latest` takes the newest checkpoint that has
    them all, warning in one line about each newer one it skips. A checkpoint of another run is refused either
    way (check_resume_compatible)."""
    if args.resume_from_checkpoint is None:
        return None, None
    explicit = args.resume_from_checkpoint != "latest"
    if explicit:
        path = args.resume_from_checkpoint
        candidates = [path if os.path.isdir(path) else os.path.join(args.output_dir, path)]
    else:
        candidates = [os.path.join(args.output_dir, name) for name in reversed(list_checkpoints(args.output_dir))]
    for path in candidates:
        try:
            state = read_training_state(path, count_keys)
            check_resume_compatible(state, record, path, args.allow_topology_change)
            processes = (state.get("topology") or {}).get("processes")  # every process saved its random state
            if not isinstance(processes, int) or processes < 1:
                processes = accelerator.num_processes
            check_checkpoint_files(path, accelerator, processes, checkpoint_files)
            return path, state
        except DamagedCheckpoint as damage:
            if explicit:
                raise SystemExit(f"error: cannot resume {path}: {damage}; resume an earlier checkpoint, or pass "
                                 "--resume_from_checkpoint latest to take the newest complete one") from None
            logger.warning(f"skipping {path}: {damage}")
    if candidates:
        logger.warning(f"no complete checkpoint in {args.output_dir}: starting a new run")
    else:
        logger.info(f"no checkpoint in {args.output_dir}: starting a new run")
    return None, None


def read_training_state(checkpoint_dir, count_keys=()):
    """training_state.json as a dict with a valid global_step (and `count_keys`, the data counters, where present);
    DamagedCheckpoint when it is missing (the save did not finish), not JSON (a truncated write) or malformed."""
    path = os.path.join(checkpoint_dir, "training_state.json")
    if not os.path.isfile(path):
        raise DamagedCheckpoint("incomplete (no training_state.json), it was not fully written")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"training_state.json is unreadable ({error_summary(error)}); truncated?") from None

    def is_count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(state, dict) or not is_count(state.get("global_step")):
        raise DamagedCheckpoint("training_state.json has no valid global_step")
    for key in count_keys:
        if key in state and not is_count(state[key]):
            raise DamagedCheckpoint(f"training_state.json: {key} is {state[key]!r}, not a count")
    for key in ("topology", "settings", "teacher"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise DamagedCheckpoint(f"training_state.json: {key} is not a mapping")
    return state


def checkpoint_file_problem(checkpoint_dir, name, what=None):
    """Why the checkpoint's `name` cannot be loaded, or None: missing, empty, or cut short (safetensors headers
    and torch.save's zip directory, which sits at the end of the file, are read; nothing else is). A `name`
    ending in '/' is a diffusers model folder: its config.json and every weights file its index names."""
    path = os.path.join(checkpoint_dir, name)
    label = f"{name} ({what})" if what else name
    if name.endswith("/"):
        if not os.path.isdir(path):
            return f"{label} is missing"
        problem = checkpoint_file_problem(checkpoint_dir, name + "config.json")
        index_path = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
        weights = ["diffusion_pytorch_model.safetensors"]
        if not problem and os.path.isfile(index_path):  # save_pretrained shards weights above 10 GB
            try:
                with open(index_path, encoding="utf-8") as f:
                    weights = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"{name}diffusion_pytorch_model.safetensors.index.json is unreadable; truncated?"
        for weights_name in weights:
            problem = problem or checkpoint_file_problem(checkpoint_dir, name + weights_name)
        return problem
    if not os.path.isfile(path):
        return f"{label} is missing"
    if os.path.getsize(path) == 0:
        return f"{label} is empty"
    try:
        if name.endswith(".safetensors"):
            with safe_open(path, framework="pt"):  # checks the header against the file's length
                pass
        elif name.endswith((".bin", ".pkl", ".pt")) and not zipfile.is_zipfile(path):  # torch.save writes zips
            return f"{label} is cut short or not a torch.save file"
        elif name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
    except Exception as error:  # safetensors and json raise their own types for a truncated file
        return f"{label} is unreadable ({error_summary(error)}); truncated?"
    return None


def accelerate_state_files(accelerator, processes):
    """{file: what it holds} that accelerator.load_state reads in this regime (DeepSpeed's and FSDP's own model
    and optimiser files are checked apart, in check_checkpoint_files)."""
    files = {f"random_states_{rank}.pkl": f"the random state of process {rank}" for rank in range(processes)}
    files["custom_checkpoint_0.pkl"] = "the learning-rate schedule"  # register_for_checkpointing(lr_scheduler)
    if not is_sharded(accelerator):
        files["optimizer.bin"] = "the optimiser state"
    if accelerator.scaler is not None:
        files["scaler.pt"] = "the fp16 gradient scaler"
    return files


def check_checkpoint_files(checkpoint_dir, accelerator, processes, checkpoint_files):
    """DamagedCheckpoint naming the first file a resume would read that is missing or broken: accelerate's state
    (of `processes` processes) and `checkpoint_files`, what the method's checkpoint hooks write."""
    problems = [checkpoint_file_problem(checkpoint_dir, name, what)
                for name, what in accelerate_state_files(accelerator, processes).items()]
    problems += [checkpoint_file_problem(checkpoint_dir, name) for name in checkpoint_files]
    names = os.listdir(checkpoint_dir)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model_dir = os.path.join(checkpoint_dir, "pytorch_model")
        if not os.path.isdir(model_dir) or not any(n.endswith("model_states.pt") for n in os.listdir(model_dir)):
            problems.append("pytorch_model/ (DeepSpeed's model and optimiser states) is missing")
    elif accelerator.distributed_type == DistributedType.FSDP:
        if not any(n.startswith("pytorch_model_fsdp") for n in names):
            problems.append("pytorch_model_fsdp* (FSDP's model state) is missing")
        if not any(n.startswith("optimizer") for n in names):
            problems.append("optimizer* (FSDP's optimiser state) is missing")
    problems = [problem for problem in problems if problem]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DamagedCheckpoint(f"damaged: {problems[0]}{more}")


class OutputDirLock:
    """An exclusive lock on an output dir, held until this process ends, so that a second run into the same
    directory is refused in one line: two runs writing one directory delete each other's checkpoints and mix
    their logs. The kernel drops a flock when its process dies, so a crashed or killed run never blocks the next.
    """

    FILE_NAME = ".output_dir.lock"
    held = {}  # real path of an output dir -> the open file whose flock this process holds

    @classmethod
    def acquire(cls, parser, output_dir):
        try:
            import fcntl
        except ImportError:  # Windows: runs there go without the output-dir lock
            return
        key = os.path.realpath(output_dir)
        if key in cls.held:  # parse_args again in the process that holds it
            return
        path = os.path.join(output_dir, cls.FILE_NAME)
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock_file = open(path, "a+")
        except OSError as error:
            parser.error(f"--output_dir {output_dir} is not writable: {error.strerror or error}")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "an unknown process"
            lock_file.close()
            parser.error(f"--output_dir {output_dir} is in use by another training run ({holder} holds {path}); "
                         "wait for it to end or choose another --output_dir")
        except OSError as error:  # a file system without locks (some NFS mounts): run, but unguarded
            lock_file.close()
            # the plain logger: this runs while the arguments are checked, before the Accelerator that accelerate's
            # logger needs exists
            logging.getLogger(__name__).warning(f"cannot lock --output_dir {output_dir} ({error.strerror or error}): "
                                                "nothing stops a second run from writing into it")
            return
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        lock_file.flush()
        cls.held[key] = lock_file

    @classmethod
    def release_all(cls):
        """Let the next run in: the end of a run (or of a run inside a test process)."""
        while cls.held:
            cls.held.popitem()[1].close()


def shard_list_digest(urls):
    """A short stand-in for a shard list in training_state.json (lists of thousands of urls stay out of it)."""
    return f"{len(urls)} shards, sha256 {hashlib.sha256(chr(10).join(urls).encode()).hexdigest()[:16]}"


def run_record(method, topology, settings=None):
    """What a checkpoint records about the run that wrote it, so that a resume can check it continues that run.

    `topology` is everything that decides which samples each step reads (processes, loader workers, batch,
    accumulation, seed, data); `settings` the flags that fix the shapes or the meaning of the trained weights
    (a LoRA rank, ...: the method's checkpoint_settings). Keys are the names users know, shown as they are in a
    refusal. train() adds the teacher the models were loaded from (its weights are known once they load)."""
    return {"script": SCRIPT_NAME, "method": method, "topology": topology, "settings": settings or {}}


def describe_setting(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def check_resume_compatible(state, record, checkpoint_dir, allow_topology_change=False):
    """Refuse, in one line and before any model loads, a checkpoint this run cannot continue: one written by
    another script or method (its files, state dicts and optimiser groups do not fit), or with another --optimizer
    (its state would not fit either), one whose weights have other shapes or meaning (`settings`: a load_state
    size mismatch, or silently another model), one of another teacher (when `record` has it, see
    check_resume_teacher), or one trained on another data topology (resuming would silently repeat and skip
    samples) unless --allow_topology_change.
    Checkpoints from before these were recorded are taken as they are."""
    theirs = (state.get("script"), state.get("method"))
    ours = (record["script"], record["method"])
    if theirs[0] is not None and theirs != ours:
        raise SystemExit(f"error: {checkpoint_dir} is a checkpoint of {theirs[0]} ({theirs[1]}), not of "
                         f"{ours[0]} ({ours[1]}): resume it with that script and method, or start a new run")
    theirs, ours = state.get("optimizer"), record.get("optimizer")
    if theirs is not None and ours is not None and theirs != ours:
        raise SystemExit(f"error: cannot resume {checkpoint_dir}: it was trained with --optimizer {theirs}, this run "
                         f"has --optimizer {ours} (the optimiser state does not carry over); resume with --optimizer "
                         f"{theirs}, or start a new run")
    recorded = state.get("settings") or {}
    changed = [f"{key} {describe_setting(recorded[key])} -> {describe_setting(value)}"
               for key, value in (record.get("settings") or {}).items() if key in recorded and recorded[key] != value]
    if changed:
        raise SystemExit(f"error: cannot resume {checkpoint_dir}: {'; '.join(changed)} would change the trained "
                         "weights' shapes or scale; restore the checkpoint's setting, or start a new run")
    if record.get("teacher"):
        check_resume_teacher(state, record["teacher"], checkpoint_dir)
    recorded = state.get("topology") or {}
    changed = [f"{key} {recorded[key]} -> {value}" for key, value in record["topology"].items()
               if key in recorded and recorded[key] != value]
    if not changed:
        return
    if not allow_topology_change:
        raise SystemExit(f"error: cannot resume {checkpoint_dir} exactly: {'; '.join(changed)}. Restore those "
                         "settings, or pass --allow_topology_change to resume with an approximate data position")
    logger.warning(f"--allow_topology_change: resuming {checkpoint_dir} with {'; '.join(changed)}; the data "
                   "position is approximate (some samples are seen twice, some not at all, in this epoch)")


def check_resume_teacher(state, teacher, checkpoint_dir):
    """Refuse, in one line, a checkpoint trained from another teacher (`teacher_record`): one of other shapes would
    stop in a size-mismatch traceback, one of the same shapes would resume silently and distil something else.
    The weights decide: the same model from another folder or Hub mirror resumes, with a warning. Called once the
    teacher has loaded (its fingerprint is cheap), before anything trains."""
    theirs = state.get("teacher")

    def fingerprint(record):  # checkpoints of 2026-12-07 and before name it "UNet weights"
        return record.get("denoiser weights") or record.get("UNet weights")

    if not isinstance(theirs, dict) or not fingerprint(theirs) or not fingerprint(teacher):
        return  # a checkpoint from before the teacher was recorded

    def name(record):
        revision = f" (revision {record['revision']})" if record.get("revision") else ""
        return f"{record.get('model')}{revision}"

    if fingerprint(theirs) != fingerprint(teacher):
        raise SystemExit(f"error: {checkpoint_dir} was trained from {teacher['flag']} {name(theirs)} (denoiser "
                         f"weights {fingerprint(theirs)}), but this run loads {name(teacher)} (denoiser weights "
                         f"{fingerprint(teacher)}): resume with that model, or start a new run")
    if (theirs.get("model"), theirs.get("revision")) != (teacher["model"], teacher["revision"]):
        logger.warning(f"resuming {checkpoint_dir}, trained from {name(theirs)}, with {name(teacher)}: the same "
                       "denoiser weights")


def is_sharded(accelerator):
    """DeepSpeed and FSDP save and load the prepared models themselves (accelerate hands the hooks no models)
    and may hold only a shard of their weights on each rank."""
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def shards_parameters(accelerator):
    """Under FSDP each rank holds only a slice of every parameter of the student (and of its EMA target), so a
    forward pass is a collective that every rank must run, validation included. (DeepSpeed ZeRO-2, the one
    stage that works, shards only gradients and optimiser state.)"""
    return accelerator.distributed_type == DistributedType.FSDP


def check_ema_sharding(accelerator):
    """Before any model loads: an EMA target follows the student's FSDP 2 sharding (`shard_like_prepared`); FSDP 1
    flattens each wrapped block's parameters into one buffer, which an EMA update cannot follow."""
    if shards_parameters(accelerator) and not accelerator.is_fsdp2:
        raise SystemExit("error: an EMA target under FSDP needs FSDP 2: set fsdp_version: 2 in the accelerate "
                         "config (as configs/fsdp.yaml does), or pass --fsdp_version 2 to accelerate launch")


def shard_like_prepared(accelerator, model):
    """Under FSDP, shard a copy of the student that the engine does not prepare (its EMA target) as
    `accelerator.prepare` shards the student: the same plugin applied to the same module tree cuts every
    parameter into the same slices on every rank. The EMA update then stays local, and each rank holds 1/N of
    the target. Its forward, like the student's, gathers each block's weights on the fly (every rank runs it),
    and saving gathers it (`save_target_folder`). Elsewhere: `model` as it is, whole on the ranks that keep it."""
    if not shards_parameters(accelerator):
        return model
    model = fsdp2_prepare_model(accelerator, model)
    # forward only: free the gathered weights after every forward, the root's too (accelerate keeps those for the
    # backward that follows a student's forward), so that the target stays sliced for the EMA update
    model.set_reshard_after_forward(True)
    return model


def save_target_folder(accelerator, model, path):
    """Write an EMA target (a network the engine does not prepare) as a loadable folder with its full weights.
    Under FSDP it is sharded like the student: every rank calls this and the shards are gathered; elsewhere the
    main process writes its own whole copy."""
    if shards_parameters(accelerator):
        save_model_folder(accelerator, model, path)
    elif accelerator.is_main_process:
        model.save_pretrained(path)


def load_whole_weights(model, state_dict):
    """Load a full state dict into a network, also into one that FSDP shards (every rank calls it then, and each
    keeps its own slice of every tensor)."""
    if any(isinstance(param, DTensor) for param in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state_dict)


def configure_deepspeed(accelerator, args):
    """DeepSpeed reads the micro-batch size from a prepared dataloader; ours yields whole batches and is not
    prepared, so give it the batch sizes (without this, accelerate.prepare raises under DeepSpeed). Its
    accumulation follows the flag, as the training loop does."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    # DeepSpeed clips inside its own step (accelerator.clip_grad_norm_ does nothing there), at its config's
    # gradient_clipping, which accelerate fills with 1.0 when unset: --max_grad_norm decides, 0 turns it off
    previous = config.get("gradient_clipping")
    if previous not in (None, "auto") and float(previous) != args.max_grad_norm:
        logger.warning(f"--max_grad_norm {args.max_grad_norm} replaces gradient_clipping {previous} of the DeepSpeed "
                       "config")
    config["gradient_clipping"] = args.max_grad_norm


def unwrap(accelerator, model):
    """The plain module inside a prepared one, without its DDP and torch.compile wrappers.

    accelerate's unwrap_model keeps the compile wrapper by default (`accelerate launch --dynamo_backend`): its
    state_dict keys carry an `_orig_mod.` prefix (which would end up in LoRA files), and calling it runs the
    compiled graph, which recompiles for every new grad mode, shape or adapter state (teacher passes, validation).
    The compiled wrapper is for the training forward only.

    Outside DeepSpeed the wrappers are peeled here: accelerate's unwrap_model imports DeepSpeed whenever it is
    installed, only to test for its engine, which costs seconds and prints DeepSpeed's accelerator line."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper (whole-model or regional)
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers += (FullyShardedDataParallel,)
    while isinstance(model, wrappers):
        model = model.module
    return model


def full_state_dict(accelerator, model):
    """The whole state dict of a prepared model, or None where the unwrapped model already holds all of it.

    A collective under DeepSpeed and FSDP: every rank must call it, since it gathers the shards."""
    if not is_sharded(accelerator):
        return None
    return {key: value.detach().cpu().contiguous() for key, value in accelerator.get_state_dict(model).items()}


def save_model_folder(accelerator, model, path):
    """Write a prepared diffusers model as a loadable folder holding its full, unsharded weights.
    Call it on every rank (the gather of `full_state_dict`); only the main process writes."""
    state_dict = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return
    unwrapped = unwrap(accelerator, model)
    if state_dict is None:
        unwrapped.save_pretrained(path)
        return
    os.makedirs(path, exist_ok=True)
    unwrapped.save_config(path)
    save_file(state_dict, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def save_checkpoint(accelerator, args, global_step, training_state):
    """Save everything needed to resume (called on every process: each saves its RNG state), then rotate.

    Atomic: written as checkpoint-N.tmp and renamed when complete, so a crash or a full disk mid-write never
    leaves a checkpoint-N that a resume would pick; training_state.json, written last, marks it complete.
    Old checkpoints are rotated out only after that (so the disk briefly holds limit + 1). A write that fails
    (full disk) removes the .tmp, to give the space back, and stops the run in one line (exit_if_write_fails)."""
    final_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    save_path = final_path + ".tmp"
    if accelerator.is_main_process:
        for name in os.listdir(args.output_dir):  # left by a run that died while saving
            if re.fullmatch(r"checkpoint-\d+\.tmp", name):
                shutil.rmtree(os.path.join(args.output_dir, name))
    accelerator.wait_for_everyone()
    try:
        with exit_if_write_fails(f"checkpoint {final_path}", args.output_dir):
            accelerator.save_state(save_path)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with open(os.path.join(save_path, "training_state.json"), "w") as f:
                    json.dump({"global_step": global_step, **training_state}, f, indent=2)
                if os.path.isdir(final_path):  # the same step saved by an earlier run
                    shutil.rmtree(final_path)
                os.replace(save_path, final_path)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(save_path, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        logger.info(f"saved checkpoint {final_path}")
        rotate_checkpoints(args.output_dir, args.checkpoints_total_limit, global_step)
    accelerator.wait_for_everyone()
    return final_path


# what the writers a save goes through say when the disk is full or a write fails: torch.save's zip writer
# ("file write failed", "unexpected pos"), safetensors ("No space left on device (os error 28)")
WRITE_FAILURE_MESSAGES = ("No space left on device", "Disk quota exceeded", "file write failed", "unexpected pos")
NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # a full disk, or a full quota


def write_failure(error):
    """What failed, in a few words, when `error` (or an error it was raised from) is a failed write: an OSError
    (ENOSPC, EDQUOT, EIO, a vanished folder, ...) or a library's error that reports one; None for anything else."""
    while error is not None:
        if isinstance(error, OSError):
            if error.errno in NO_SPACE_ERRNOS:
                return "no space left on the device"
            return error.strerror or error_summary(error)
        if any(message in str(error) for message in WRITE_FAILURE_MESSAGES):
            return error_summary(error)
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def exit_if_write_fails(what, output_dir):
    """Stop the run in one line when writing `what` fails (a full disk, a quota, an I/O error), naming it and the
    last complete checkpoint, which a failed write never touches, instead of chained tracebacks. Other errors
    pass unchanged."""
    try:
        yield
    except Exception as error:
        reason = write_failure(error)
        if reason is None:
            raise
        last = (complete_checkpoints(output_dir) or [None])[-1]
        kept = (f"the last complete checkpoint, {os.path.join(output_dir, last)}, is intact" if last
                else "no checkpoint was saved before it")
        raise SystemExit(f"error: {reason} while writing {what}; {kept}. Free some space, then continue with "
                         "--resume_from_checkpoint latest") from None


class StopOnSignal:
    """SIGTERM / SIGINT (spot preemption, a SLURM time limit, Ctrl-C) ask for a graceful stop: the training
    loop finishes the step in flight, saves a checkpoint and exits naming it. A second signal acts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, self.previous[signum])
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum)
        logging.getLogger(__name__).warning(f"{self.received.name}: finishing this step, then saving a checkpoint")

    @property
    def flag(self):
        """1.0 once a signal arrived; summed with the loss statistics so every rank learns of it."""
        return 0.0 if self.received is None else 1.0

    def exit_after(self, accelerator, step, checkpoint):
        name = self.received.name if self.received is not None else "a stop signal to another process"
        accelerator.print(f"stopped by {name} after step {step}; checkpoint saved: {checkpoint}. Continue with "
                          "--resume_from_checkpoint latest")
        accelerator.end_training()
        raise SystemExit(128 + int(self.received or signal.SIGTERM))


class NonFiniteGuard:
    """A step whose loss is NaN/inf is not applied; `limit` of them in a row stop the run."""

    def __init__(self, limit, output_dir):
        self.limit = limit
        self.output_dir = output_dir
        self.in_a_row = 0

    def apply(self, loss, step):
        """True when the step may update the weights; SystemExit when the limit is reached."""
        if math.isfinite(loss):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        last = (list_checkpoints(self.output_dir) or ["none"])[-1]
        if self.in_a_row >= self.limit:
            raise SystemExit(f"error: non-finite loss ({loss}) at step {step}, {self.in_a_row} step(s) in a row "
                             f"(--max_nonfinite_steps {self.limit}); those steps were not applied. "
                             f"Last checkpoint: {last}")
        logger.warning(f"non-finite loss ({loss}) at step {step}: update skipped ({self.in_a_row} in a row)")
        return False


# ----------------------------------------
# Trackers, images, hub
# ----------------------------------------


def save_validation_grid(accelerator, output_dir, rows, file_name, tracker_key, step):
    """Rows of equal-sized PIL images as one PNG in output_dir/validation/, logged to every tracker; its path."""
    if not accelerator.is_main_process:  # under FSDP every rank validates (see shards_parameters); one writes
        return None
    grid = make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(rows[0]))
    os.makedirs(os.path.join(output_dir, "validation"), exist_ok=True)
    path = os.path.join(output_dir, "validation", file_name)
    grid.save(path)
    log_grid_to_trackers(accelerator, tracker_key, grid, step)
    return path


def log_grid_to_trackers(accelerator, name, grid, step):
    """Log one image to every tracker (not only the first, as the reference scripts did)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(grid)}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [np.asarray(grid)]}, step=step)


def tracker_names(report_to):
    """--report_to value -> what Accelerator(log_with=...) takes. 'all' means the two trackers the flags are
    checked for: accelerate's own 'all' would also start any other tracker that happens to be installed
    (comet, mlflow, ...), unconfigured, after the models have loaded."""
    if report_to in ("", "none"):
        return None
    return ["tensorboard", "wandb"] if report_to == "all" else report_to.split(",")


def tracker_config(args):
    """Flags as tracker hyper-parameters (only scalar types trackers accept; never the hub token)."""
    config = {}
    for key, value in vars(args).items():
        if key == "hub_token":
            continue
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


def tracker_init_kwargs(args):
    """wandb writes its run next to tensorboard's, under --output_dir/--logging_dir, unless WANDB_DIR says where
    (by default it would write ./wandb in whatever directory the job was started from)."""
    if os.environ.get("WANDB_DIR"):
        return {}
    return {"wandb": {"dir": os.path.join(args.output_dir, args.logging_dir)}}


def report_peak_memory(accelerator, step):
    """The run's peak GPU memory (torch.cuda.max_memory_allocated, the largest over processes) in GiB: logged to
    the trackers as train/max_memory_allocated_gib and in one log line, to size the GPU, batch and flags by.
    None (and nothing logged) off CUDA."""
    if accelerator.device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    if accelerator.num_processes > 1:
        peak = accelerator.gather(torch.tensor([peak], device=accelerator.device)).max().item()
    accelerator.log({"train/max_memory_allocated_gib": peak}, step=step)
    logger.info(f"peak GPU memory: {peak:.2f} GiB allocated (torch.cuda.max_memory_allocated, largest process)")
    return peak


def push_output_to_hub(args, commit_message="End of training"):
    """Create (or reuse) the Hub repo and upload the output dir, without checkpoints and tracker logs."""
    repo_id = create_repo(repo_id=hub_repo_id(args), exist_ok=True, token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message=commit_message,
                  ignore_patterns=["checkpoint-*", "checkpoint-*/**", f"{args.logging_dir}/**", "*.tmp",
                                   OutputDirLock.FILE_NAME],
                  token=args.hub_token)
    return repo_id


# ----------------------------------------
# What the loop needs of the data
# ----------------------------------------


class DataError(RuntimeError):
    """The data source cannot feed training (nothing readable, or every sample filtered out)."""


def close_batches(loader_iterator):
    """Shut the DataLoader's workers down now. Left to garbage collection (an exception keeps the iterator
    alive), they would linger until interpreter exit."""
    # private: DataLoader has no public call that stops its workers (its __del__ calls this same method)
    shutdown = getattr(loader_iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def exit_on_data_error(error):
    """Stop the run with one line if `error` is a DataError, also one raised in a DataLoader worker (that arrives
    re-raised with the worker's whole traceback as its message, the original message on the last line);
    re-raise any other error unchanged."""
    text = str(error).strip()
    if not isinstance(error, DataError) and "DataError" not in text:
        raise error
    last_line = text.splitlines()[-1] if text else "data error"
    raise SystemExit(f"error: {last_line.split('DataError: ', 1)[-1]}") from None


def describe_data_counts(counts):
    """One phrase for the non-zero data counts, e.g. '3 unreadable, 1 stalled shard(s)'."""
    words = {"n_corrupt": "unreadable", "n_malformed": "with malformed metadata", "n_filtered": "filtered out",
             "n_stalled": "stalled shard(s) abandoned", "n_uncaptioned": "without a caption (trained unconditionally)",
             "n_not_utf8": "with a caption or json not in UTF-8 (read as Windows-1252)"}
    parts = [f"{counts.get(key, 0)} {word}" for key, word in words.items() if counts.get(key, 0) or key == "n_corrupt"]
    return ", ".join(parts)


def data_count_logs(counts):
    """The data counts as tracker values."""
    names = {"n_corrupt": "data/skipped_unreadable", "n_malformed": "data/skipped_malformed",
             "n_filtered": "data/filtered", "n_stalled": "data/stalled_shards", "n_uncaptioned": "data/uncaptioned",
             "n_not_utf8": "data/not_utf8"}
    return {name: counts.get(key, 0) for key, name in names.items()}


# ----------------------------------------
# The training loop
# ----------------------------------------


def make_optimizer(args, params, learning_rate, sharded=False):
    """The --optimizer over `params` (tensors or parameter groups), its hyper-parameters from the flags:

    - adamw: torch's AdamW; on CUDA the fused kernel (one launch per step, no step-sized temporaries);
    - adamw8bit: bitsandbytes' AdamW with 8-bit moments (about 75% less state memory);
    - prodigy: Prodigy (Mishchenko & Defazio, 2023, arXiv:2306.06101), Adam that estimates its own step size
      d; --learning_rate multiplies it. `sharded` (DeepSpeed, FSDP: each rank steps a slice of the weights) sums
      the estimate's terms over ranks, so every rank finds the same d;
    - adafactor: transformers' Adafactor (Shazeer & Stern, 2018) with the run's learning rate and schedule
      (relative_step off): a row and a column second moment per matrix instead of one per weight.

    Each keeps its whole state in `state_dict()` (Prodigy's d in its parameter groups), so a checkpoint resumes
    it exactly."""
    params = list(params)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), beta3=args.prodigy_beta3,
                       eps=args.adam_epsilon, weight_decay=args.adam_weight_decay,
                       decouple=args.prodigy_decouple is not False, d_coef=args.prodigy_d_coef or 1.0,
                       use_bias_correction=args.prodigy_use_bias_correction is not False,
                       safeguard_warmup=args.prodigy_safeguard_warmup is not False, fsdp_in_use=sharded)
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=learning_rate, beta1=args.adafactor_beta1,
                         decay_rate=-0.8 if args.adafactor_decay_rate is None else args.adafactor_decay_rate,
                         clip_threshold=args.adafactor_clip_threshold or 1.0, weight_decay=args.adam_weight_decay,
                         scale_parameter=bool(args.adafactor_scale_parameter), relative_step=False,
                         warmup_init=False)
    hyper = dict(lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                 eps=args.adam_epsilon)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **hyper)
    on_cuda = bool(params) and all(isinstance(p, torch.Tensor) and p.is_cuda for p in params)
    return torch.optim.AdamW(params, fused=True if on_cuda else None, **hyper)


@dataclass
class TrainingData:
    """Where a run starts: the batch stream (already positioned after what a resumed run trained on), the
    per-sample counters it carries (skipped, filtered, ...), and what a checkpoint records about the run."""

    batches: object  # an endless iterator of batch dicts
    loader_iterator: object  # closed at the end (DataLoader workers)
    counts: dict
    record: dict  # method and topology: a resume must match them (check_resume_compatible)
    resume_dir: object = None
    global_step: int = 0
    samples_per_epoch: int = 0  # sizes the run when --max_train_steps is not given
    resume_state: dict = None  # the resumed checkpoint's training_state.json


class TrainingMethod(Protocol):
    """What the engine trains through; each script's METHOD section implements it (a class with these methods).

    `modules` are the trained networks: the engine passes them and the optimiser to `accelerator.prepare` and
    hands the prepared (DDP / DeepSpeed-wrapped) ones back through `use_prepared` before the first step."""

    modules: list
    teacher: dict  # teacher_record() of the model it learns from: checkpoints record it, a resume must match it

    @staticmethod
    def checkpoint_files(args):
        """What `checkpoint_hooks` write into a checkpoint (file names; 'name/' for a diffusers model folder): a
        resume checks they are there and whole before any model loads."""

    @staticmethod
    def checkpoint_settings(args):
        """{flag: value} of the flags that fix the shapes or meaning of the trained weights (a LoRA rank, ...):
        recorded in checkpoints (run_record), a resume with other values is refused before any model loads."""

    def use_prepared(self, modules): ...

    def optimizer_params(self):
        """The parameters (or parameter groups) the optimiser steps."""

    def loss(self, batch):
        """(loss to back-propagate, {term name: detached value} logged as train/<name>) for one micro-batch."""

    def after_update(self, step):
        """After each optimiser step that was applied (1-based step): EMA updates."""

    def checkpoint_hooks(self, accelerator):
        """accelerate's (save, load) state pre-hooks for what the method keeps beyond accelerate's own state."""

    def validate(self, step):
        """Main process (every process under FSDP, where sampling is a collective): sample, save and log validation
        images; the path of the image for the model card (None on the other processes)."""

    def save_outputs(self):
        """Every process (under DeepSpeed/FSDP saving gathers shards): write the trained model files."""

    def model_card(self, repo_id, validation_image): ...

    def close(self):
        """Release what the method holds outside the models (hooks), also after an error."""


def training_table(args, source_rows, method_rows):
    """The model card's "Training" table: where the model came from (source_rows, e.g. teacher and data), the
    run's settings, the method's own (method_rows), then the precision. Rows are (name, value) pairs."""
    rows = [*source_rows, ("resolution", args.resolution), ("steps", args.max_train_steps),
            ("batch size per GPU x accumulation", f"{args.train_batch_size} x {args.gradient_accumulation_steps}"),
            ("learning rate", f"{args.learning_rate} ({args.lr_scheduler})"), *method_rows,
            ("mixed precision", "no (fp32)" if args.mixed_precision == "no" else args.mixed_precision)]
    return "| setting | value |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)


def start_run(args):
    """The Accelerator, logging, seeds and TF32: what every run sets up before it reads data or loads a model."""
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=tracker_names(args.report_to),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    logger.info(accelerator.state, main_process_only=False)
    args.mixed_precision = accelerator.mixed_precision  # the one in effect (the flag, else accelerate's config)
    model_flag = ("pretrained_teacher_model" if hasattr(args, "pretrained_teacher_model")
                  else "pretrained_model_name_or_path")  # DreamBooth's name for its base model
    warning = resolution_warning(getattr(args, model_flag), args.resolution, model_flag)
    if warning:
        logger.warning(warning)
    configure_deepspeed(accelerator, args)
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)  # seed + rank: processes must not draw the same noise
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def open_training_data(args, accelerator, record, make_dataloader, counts, samples_per_epoch, checkpoint_files=()):
    """The resume point and the batch stream, before any model loads: a data source that yields nothing, or a
    checkpoint of another run or missing a file (`checkpoint_files`: the method's, see find_resume_checkpoint),
    fails now rather than after minutes of loading."""
    record["optimizer"] = args.optimizer  # its state is in the checkpoint: a resume must use the same one
    resume_dir, state = find_resume_checkpoint(args, accelerator, record, checkpoint_files, counts)
    global_step = 0
    if resume_dir is not None:
        global_step = state["global_step"]
        counts = {key: state.get(key, 0) for key in counts}
    # a resumed stream skips the batches the checkpointed run already trained on
    loader = make_dataloader(args, accelerator, skip_batches=global_step * args.gradient_accumulation_steps)
    loader_iterator = iter(loader)
    try:
        batches = itertools.chain([next(loader_iterator)], loader_iterator)
    except (DataError, RuntimeError) as error:
        close_batches(loader_iterator)
        exit_on_data_error(error)
    return TrainingData(batches, loader_iterator, counts, record, resume_dir, global_step, samples_per_epoch, state)


def train(args, accelerator, method: TrainingMethod, data: TrainingData, title):
    """The training loop shared by every script: optimiser and schedule, accumulation, the non-finite guard,
    EMA via the method, logs, checkpoints, stop signals, validation, then the final save, model card and push."""
    teacher = getattr(method, "teacher", None)
    if teacher:  # known now that the models have loaded; nothing has trained yet
        data.record["teacher"] = teacher
        if data.resume_dir is not None:
            check_resume_teacher(data.resume_state, teacher, data.resume_dir)
    device = accelerator.device
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * total_batch_size if args.scale_lr else args.learning_rate
    optimizer = make_optimizer(args, method.optimizer_params(), learning_rate, sharded=is_sharded(accelerator))
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(data.samples_per_epoch / total_batch_size)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    *modules, optimizer = accelerator.prepare(*method.modules, optimizer)
    method.use_prepared(modules)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        logger.info(f"DeepSpeed clips gradients at norm {modules[0].gradient_clipping()} (--max_grad_norm; 0: off)")
    accelerator.register_for_checkpointing(lr_scheduler)
    save_hook, load_hook = method.checkpoint_hooks(accelerator)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    global_step, counts = data.global_step, data.counts
    if data.resume_dir is not None:
        accelerator.print(f"resuming from {data.resume_dir} at step {global_step}")
        accelerator.load_state(data.resume_dir)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args),
                                  init_kwargs=tracker_init_kwargs(args))

    logger.info(f"***** Running {title}: {args.max_train_steps} steps, {total_batch_size} samples per step "
                f"({args.train_batch_size} per process x {accelerator.num_processes} processes x "
                f"{args.gradient_accumulation_steps} accumulation) *****")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    trained_params = [p for group in optimizer.param_groups for p in group["params"]]
    step_started = time.perf_counter()
    stop = StopOnSignal().install()
    nonfinite = NonFiniteGuard(args.max_nonfinite_steps, args.output_dir)
    validates = accelerator.is_main_process or shards_parameters(accelerator)  # FSDP: sampling is a collective
    try:
        while global_step < args.max_train_steps:
            running, apply_update, step_counts = None, True, dict.fromkeys(counts, 0)
            for _ in range(args.gradient_accumulation_steps):
                batch = next(data.batches)
                step_counts = {key: value + batch[key] for key, value in step_counts.items()}
                with accelerator.accumulate(*method.modules):
                    loss, terms = method.loss(batch)
                    values = torch.stack([loss.detach().float(), *(t.float() for t in terms.values())])
                    running = values if running is None else running + values
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # one host sync per optimiser step: the loss terms averaged over ranks, the data counts
                        # summed over them (each rank reads its own shards), and whether any rank was asked to stop;
                        # a non-finite loss skips the update before it touches the weights
                        stats = accelerator.reduce(torch.cat([
                            running / args.gradient_accumulation_steps,
                            torch.tensor([*step_counts.values(), stop.flag], device=device)]), "sum")
                        stats[:len(values)] /= accelerator.num_processes
                        *reduced, stop_requested = stats.tolist()
                        means, added = reduced[:len(values)], reduced[len(values):]
                        counts = {key: value + round(n) for (key, value), n in zip(counts.items(), added)}
                        apply_update = nonfinite.apply(means[0], global_step + 1)
                        if apply_update and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trained_params, args.max_grad_norm)
                    if apply_update:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            global_step += 1
            if apply_update:
                method.after_update(global_step)

            now = time.perf_counter()
            samples_per_sec = total_batch_size / (now - step_started)
            step_started = now
            logs = {f"train/{name}": value for name, value in zip(["loss", *terms], means)}
            logs.update({"train/lr": lr_scheduler.get_last_lr()[0], "train/samples_per_sec": samples_per_sec,
                         **data_count_logs(counts)})
            progress.update(1)
            progress.set_postfix(loss=f"{means[0]:.4g}", lr=f"{logs['train/lr']:.3g}",
                                 samples_s=f"{samples_per_sec:.2f}", **({"skipped": counts["n_corrupt"]}
                                                                        if "n_corrupt" in counts else {}))
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0 or stop_requested:
                checkpoint = save_checkpoint(accelerator, args, global_step, {**counts, **data.record})
            if stop_requested:
                stop.exit_after(accelerator, global_step, checkpoint)
            if (validates and args.validation_steps and global_step % args.validation_steps == 0
                    and stop.received is None and global_step < args.max_train_steps):  # the end validates anyway
                with exit_if_write_fails(f"validation images to {args.output_dir}", args.output_dir):
                    method.validate(global_step)
                step_started = time.perf_counter()  # validation time is not training throughput
    except (DataError, RuntimeError) as error:
        exit_on_data_error(error)
    finally:
        stop.restore()
        close_batches(data.loader_iterator)
        progress.close()
        method.close()

    report_peak_memory(accelerator, global_step)
    accelerator.wait_for_everyone()
    with exit_if_write_fails(f"the trained model to {args.output_dir}", args.output_dir):
        method.save_outputs()
        if accelerator.is_main_process and any(counts.values()):
            logger.info(f"data: {describe_data_counts(counts)}")
        path = method.validate(global_step) if validates else None
        if accelerator.is_main_process:
            validation_image = os.path.relpath(path, args.output_dir) if path else None
            repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
            with open(os.path.join(args.output_dir, "README.md"), "w") as f:
                f.write(method.model_card(repo_id, validation_image))
    if accelerator.is_main_process and args.push_to_hub:
        try:
            push_output_to_hub(args)
        except Exception as error:  # a network failure at the very end: the trained model is saved all the same
            raise SystemExit(f"error: the upload to the Hub failed ({error_summary(error)}); the trained model is "
                             f"complete in {args.output_dir}: upload it with `hf upload {hub_repo_id(args)} "
                             f"{args.output_dir}`") from None
    accelerator.end_training()
    OutputDirLock.release_all()


# endregion ENGINE


# ==========================================================================================================
# region DATA copied from train_lcm_distill_sd_wds
# ==========================================================================================================


def add_stream_args(parser, *, resolution=512, shards_required=True):
    """The flags of the shard stream (and of the images it yields); returns the "data" group for more."""
    group = parser.add_argument_group("data")
    group.add_argument("--train_shards_path_or_url", type=str, required=shards_required, default=None,
                       help="WebDataset shards: a local path or brace pattern (data/{00000..00099}.tar), a URL, a "
                            "'pipe:' command, or several of those joined by '::'.")
    group.add_argument("--resolution", type=bounded(int, 8, None),
                       default=resolution, help="Training resolution (square), divisible by 8.")
    group.add_argument("--interpolation_type", type=str, default="bilinear",
                       choices=["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"],
                       help="Resampling filter used to resize the shorter side to --resolution.")
    group.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a random square.")
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    group.add_argument("--max_train_samples", type=bounded(int, 1, None), default=None,
                       help="Samples per epoch: each pass over the data is truncated to this many samples (an image "
                            "folder's default: all of its images).")
    group.add_argument("--min_image_size", type=bounded(int, 0, None), default=0,
                       help="Drop samples whose shorter side is below this (from the json, else the decoded image).")
    group.add_argument("--max_watermark_probability", type=bounded(float, 0, 1), default=None,
                       help="Drop samples whose json 'pwatermark' is above this (samples without it are kept).")
    group.add_argument("--min_aesthetic_score", type=bounded(float), default=None,
                       help="Drop samples whose json 'aesthetic' score is below this (samples without it are kept).")
    group.add_argument("--shuffle_buffer_size", type=bounded(int, 0, None), default=1000,
                       help="Samples held by each reader to shuffle within and across shards (0 disables).")
    group.add_argument("--dataloader_num_workers", type=bounded(int, 0, None), default=None,
                       help="Data loading processes per GPU (0 reads in the main process). Default: 4, fewer when "
                            "there are fewer shards per process (every reader needs shards of its own).")
    group.add_argument("--shard_read_timeout", type=bounded(float, 0, None, low_open=True), default=600.0,
                       help="Seconds a 'pipe:' or http(s) shard may send no data before it is abandoned (killed, "
                            "skipped and counted as data/stalled_shards).")
    group.add_argument("--vae_encode_batch_size", type=bounded(int, 1, None), default=32,
                       help="Images per VAE encoder call (lower it to save memory at high resolution).")
    return group


def expand_shard_urls(spec):
    """'a/{000..009}.tar::pipe:curl ...' -> list of shard urls (brace patterns expanded, '::' separates lists)."""
    urls = []
    for part in spec.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand(part))
    return urls


def is_remote_url(url):
    return url.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", url) is not None


def check_shard_args(parser, args):
    urls = expand_shard_urls(args.train_shards_path_or_url)
    if not urls:
        parser.error("--train_shards_path_or_url names no shard")
    missing = [u for u in urls if not is_remote_url(u) and not os.path.isfile(os.path.expanduser(u))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        parser.error(f"--train_shards_path_or_url: shard not found: {missing[0]}{more}")
    if args.max_train_steps is None and args.max_train_samples is None:
        parser.error(
            "a stream of shards has no known length: set --max_train_steps, or --max_train_samples "
            "(samples per epoch) with --num_train_epochs"
        )
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = default_loader_workers(len(urls))


def default_loader_workers(num_sources):
    """--dataloader_num_workers when the flag is not given: 4 readers per process, fewer when the data has fewer
    sources (shards, an image folder's images) per process, since every reader needs sources of its own.

    It depends on the data and the process count only (WORLD_SIZE, which launchers give every process), both
    part of the resume topology, not on this machine's cores: a checkpoint resumes on another machine with the
    same readers, where a core-count default would make that resume refuse."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, min(4, num_sources // processes))


class ImageTransform:
    """Resize to cover the target size, crop it (centre or random), maybe flip, scale to [-1, 1]. The target is
    a square of side `resolution`, or a (height, width) pair (an aspect-ratio bucket).

    Returns the CHW float tensor plus what SDXL's micro-conditioning needs: the original (height, width)
    and the (top, left) of the crop in the resized image.
    """

    FILTERS = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
        "lanczos": Image.Resampling.LANCZOS,
        "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING,
    }

    def __init__(self, resolution, interpolation="bilinear", center_crop=False, random_flip=False):
        self.resolution = resolution
        self.height, self.width = (resolution, resolution) if isinstance(resolution, int) else resolution
        self.interpolation = self.FILTERS[interpolation]
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image, rng):
        original_size = (image.height, image.width)
        scale = max(self.width / image.width, self.height / image.height)
        width = max(self.width, round(image.width * scale))
        height = max(self.height, round(image.height * scale))
        image = image.resize((width, height), resample=self.interpolation)
        if self.center_crop:
            top, left = (height - self.height) // 2, (width - self.width) // 2
        else:
            top, left = rng.randint(0, height - self.height), rng.randint(0, width - self.width)
        image = image.crop((left, top, left + self.width, top + self.height))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left)


@dataclass
class SampleFilter:
    """Metadata filters; LAION-style json keys. A sample without a key is kept (nothing to judge it by)."""

    min_image_size: int = 0
    max_watermark_probability: float = None
    min_aesthetic_score: float = None

    def reject_by_metadata(self, meta):
        """Reason string when the json alone rejects the sample (checked before the image is decoded).
        MalformedMetadata when a field a filter needs is not a number."""
        if self.min_image_size:
            width = metadata_number(meta, "original_width", "width")
            height = metadata_number(meta, "original_height", "height")
            if width is not None and height is not None and min(width, height) < self.min_image_size:
                return "too small"
        if self.max_watermark_probability is not None:
            pwatermark = metadata_number(meta, "pwatermark")
            if pwatermark is not None and pwatermark > self.max_watermark_probability:
                return "watermark"
        if self.min_aesthetic_score is not None:
            aesthetic = metadata_number(meta, "aesthetic", "aesthetic_score")
            if aesthetic is not None and aesthetic < self.min_aesthetic_score:
                return "aesthetic"
        return None


class MalformedMetadata(ValueError):
    """A sample's metadata holds something its reader cannot use (the sample is skipped and counted)."""


def metadata_number(meta, *keys):
    """The first of `keys` present in a sample's metadata, as a finite float, or None when none is present.

    Numeric strings count as numbers (CSV cells are strings) and an empty string as absent (an empty CSV
    cell); anything else that is not a finite number (other strings, null, lists, objects, booleans, NaN)
    raises MalformedMetadata, so the sample is skipped instead of stopping the run."""
    for key in keys:
        if key not in meta or meta[key] == "":
            continue
        value = meta[key]
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise MalformedMetadata(f"json {key!r} is not a number: {value!r}"[:200])
        return number
    return None


def original_size_from_metadata(meta):
    """(height, width) from a sample's json (LAION's original_width/original_height, else width/height), or None
    when absent or not positive. MalformedMetadata when present but not a number (or absurdly large)."""
    width = metadata_number(meta, "original_width", "width")
    height = metadata_number(meta, "original_height", "height")
    if width is None or height is None:
        return None
    if max(width, height) >= 2**31:  # would overflow the int64 micro-conditioning tensors downstream
        raise MalformedMetadata(f"json size {width:g} x {height:g} is not a real image size")
    size = (int(height), int(width))
    return size if min(size) > 0 else None


def caption_from_metadata(meta):
    """The caption of a sample without a .txt: json 'caption', else 'text'; '' when neither is present.
    MalformedMetadata when it is a list or an object (a number is taken as its text)."""
    for key in ("caption", "text"):
        value = meta.get(key)
        if value is None:
            continue
        if isinstance(value, (list, dict)):
            raise MalformedMetadata(f"json {key!r} is not text: {value!r}"[:200])
        return str(value).strip()
    return ""


def decode_text(raw):
    """(text, True) of UTF-8 bytes (a byte-order mark dropped) or of UTF-16 ones with their byte-order mark (Notepad's
    "Unicode"), else (the bytes read as Windows-1252, False).

    Captions and metadata saved on Windows are often cp1252 ("café" is b"caf\\xe9"): read as UTF-8 with
    replacement they would train as "caf\\ufffd" without a word. cp1252 maps all but five bytes (those become
    U+FFFD); the caller reports the fallback."""
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16"), True
        return raw.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), False


def several_dots_members(sample):
    """The members of a sample that a file name with several dots hid from its reader: webdataset splits the key
    at the FIRST dot, so IMG_0000.HEIC.jpg is member 'heic.jpg' of sample IMG_0000, not its 'jpg'."""
    read = (*IMAGE_KEYS, "txt", "json")
    return [member for member in sorted(sample) if not member.startswith("__") and member != PRECOMPUTED_RECORD
            and "." in member and member.rsplit(".", 1)[1] in read]


SEVERAL_DOTS_ADVICE = ("a file name with several dots (webdataset splits the key at the first dot); name members "
                       "<key>.<ext>, as tools/make_wds_shards.py does")


def missing_image_reason(sample):
    """(kind, why) a sample holds no image this reader takes, for its warning."""
    members = ", ".join(repr(member) for member in sorted(sample) if not member.startswith("__")) or "none"
    where = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
    if any(member.rsplit(".", 1)[1] in IMAGE_KEYS for member in several_dots_members(sample)):
        return "several dots", (f"{where} has members {members} and no {'/'.join(IMAGE_KEYS)}: "
                                f"{SEVERAL_DOTS_ADVICE}")
    return "no image", f"{where} has no {'/'.join(IMAGE_KEYS)} member (members: {members})"


def to_rgb(image):
    """8-bit RGB of any decoded image, EXIF orientation applied.

    `convert("RGB")` clips instead of scaling: a 16-bit PNG (modes I;16 / I) becomes nearly white, a float
    image nearly black. Those are scaled to 8 bits here (16-bit by 1/257, float from [0, 1] or, beyond, as
    16-bit). Transparent pixels are composited over white rather than showing whatever colour they hide."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image).astype(np.float64)
        if image.mode == "F" and array.size and np.nanmax(array) <= 1.0:
            array = array * 255.0
        elif image.mode != "F" or array.size and np.nanmax(array) > 255.0:
            array = array / 257.0
        array = np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBA", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def batches_already_read(total_batches, worker_id, num_workers):
    """How many of a rank's first `total_batches` batches came from this worker.

    A DataLoader over an endless IterableDataset takes batches from its workers in strict round robin, so
    batch b came from worker b % num_workers. This is what lets a resumed run skip exactly what was read.
    (A resumed DataLoader starts its round robin at worker 0 again: see `stream_worker`.)
    """
    if total_batches <= worker_id:
        return 0
    return (total_batches - worker_id + num_workers - 1) // num_workers


def stream_worker(loader_worker, num_workers, skip_batches):
    """The worker of the uninterrupted run whose part (shards, random draws, batches) DataLoader worker
    `loader_worker` plays in a run that resumes after `skip_batches` batches.

    Every DataLoader takes its first batch from worker 0, also a resumed one, whereas the uninterrupted run read
    batch `skip_batches` from worker skip_batches % num_workers. Without this shift, a resume after a number of
    batches that is not a multiple of the worker count reads the right batches in the wrong order (with 2
    workers, pairs swapped), so the steps after it train on other data than the uninterrupted run."""
    return (loader_worker + skip_batches) % num_workers


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of collated batches from WebDataset shards, split by rank and by DataLoader worker (not by
    webdataset's node/worker splitters: they give no exact resume and hang on an endless empty stream).

    * Deterministic: every random choice (shard order, shuffle buffer, crop, flip, empty prompt) comes from
      generators seeded by (seed, rank, worker), so a resumed run skips `skip_batches` and then sees exactly
      the batches an uninterrupted run would have seen.
    * Each (rank, worker) reader takes every S-th shard (S = readers), so readers never see the same sample.
      Fewer shards than readers is a clear error: reading every shard on every reader would multiply I/O.
    * Bad samples never stop training: unreadable images are skipped and counted, filtered ones counted;
      samples whose metadata holds what cannot be used (`n_malformed`) too; the counts (`new_data_counts`)
      ride along with each batch so the main process can log them. Samples without any caption are counted.
    * One making: every sample must be made like the reference, the first sample of known making in the shard
      list (raw images, or latents precomputed with the same settings); a mixed sample raises DataError.
    * It never hangs: a reader that finds no usable sample in its first `max_rejects_before_first` reads, or
      in a whole pass over its data, raises DataError; a shard that sends no byte for `shard_read_timeout`
      seconds is abandoned and counted (`n_stalled`).
    """

    MAX_REJECTS_BEFORE_FIRST = 500

    def __init__(self, urls, batch_size, transform, sample_filter=None, *, seed=0, rank=0, world_size=1,
                 proportion_empty_prompts=0.0, max_samples_per_pass=None, shuffle_buffer_size=1000, skip_batches=0,
                 max_rejects_before_first=MAX_REJECTS_BEFORE_FIRST, shard_read_timeout=600.0,
                 needs_original_size=False):
        super().__init__()
        self.urls = list(urls)
        self.batch_size = batch_size
        self.transform = transform
        self.sample_filter = sample_filter or SampleFilter()
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.proportion_empty_prompts = proportion_empty_prompts
        self.max_samples_per_pass = max_samples_per_pass
        self.shuffle_buffer_size = shuffle_buffer_size
        self.skip_batches = skip_batches
        self.max_rejects_before_first = max_rejects_before_first
        self.shard_read_timeout = shard_read_timeout
        self.needs_original_size = needs_original_size  # SDXL: the json's size feeds the micro-conditioning
        self.warned_uncaptioned = False
        self.warned = set()  # the kinds of skipped or recoded samples already reported (one warning line each)
        self.reference = None  # (precomputed_settings or None for raw images, where): see reference_making

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = stream_worker(loader_worker, num_workers, self.skip_batches)
        reader = self.rank * num_workers + worker
        num_readers = self.world_size * num_workers
        rng = random.Random(f"{self.seed}-{reader}-{num_readers}")
        self.reference_making()  # already found in the main process when read by DataLoader workers
        counts = new_data_counts()
        to_skip = batches_already_read(self.skip_batches, worker, num_workers)
        batch = []
        for sample in self._samples(reader, num_readers, rng, counts):
            batch.append(sample)
            if len(batch) < self.batch_size:
                continue
            if to_skip > 0:  # replaying what a resumed run already trained on; its counts were logged then
                to_skip -= 1
            else:
                yield collate_samples(batch, counts)
            # zeroed in place, not replaced: the readers below keep adding to this very dict
            counts.update(dict.fromkeys(counts, 0))
            batch = []

    def reference_making(self):
        """(precomputed_settings, or None for raw images; where) of the first sample of the shard list, in its
        order, whose making is known (see `making_reference`): what every sample this stream delivers must match.

        Found once, in the main process before the DataLoader workers start (`stream_dataloader`), so every
        reader, a copy of this stream, compares with the same sample whatever the worker count; the start-up check
        (`check_precomputed_data`) reads the same one. Refuses --random_flip on latents without mirror images."""
        if self.reference is None:
            with contextlib.closing(self._raw_samples(self.urls, new_data_counts())) as samples:
                record, where = making_reference(samples, self.max_rejects_before_first)
            settings = precomputed_settings(record) if record is not None else None
            if settings is not None and self.transform is not None and self.transform.random_flip \
                    and settings["views"] < 2:
                raise DataError(f"--random_flip needs mirror images, but sample {where} holds latents precomputed "
                                "without them: precompute them with --random_flip (tools/precompute_latents.py) "
                                "or train without --random_flip")
            self.reference = (settings, where)
        return self.reference

    def _samples(self, reader, num_readers, rng, counts):
        per_pass = None
        if self.max_samples_per_pass is not None:
            per_pass = max(1, math.ceil(self.max_samples_per_pass / num_readers))
        delivered = 0
        rejects_in_a_row = 0
        for pass_index in itertools.count():
            shards = list(self.urls)
            random.Random(f"{self.seed}-pass-{pass_index}").shuffle(shards)  # same order on every reader
            if len(shards) < num_readers:
                workers_that_fit = len(shards) // self.world_size
                fix = (f"pass --dataloader_num_workers {workers_that_fit}, or write more, smaller shards"
                       if workers_that_fit else f"write at least {self.world_size} shards")
                raise DataError(
                    f"{len(shards)} shard(s) for {num_readers} readers ({self.world_size} process(es) x "
                    f"{num_readers // self.world_size} loader worker(s)): every reader needs shards of its own; "
                    f"{fix} (tools/make_wds_shards.py --samples_per_shard)"
                )
            shards = shards[reader::num_readers]
            produced = 0
            for sample in self._shuffled(self._raw_samples(shards, counts), rng):
                decoded = self._decode(sample, rng, counts)
                if decoded is None:
                    rejects_in_a_row += 1
                    if delivered == 0 and rejects_in_a_row >= self.max_rejects_before_first:
                        raise DataError(
                            f"no usable sample in the first {rejects_in_a_row} read from {len(shards)} shard(s) "
                            f"({describe_data_counts(counts)}): check the "
                            "shards and the filters (--min_image_size, --max_watermark_probability, "
                            "--min_aesthetic_score)"
                        )
                    continue
                rejects_in_a_row = 0
                delivered += 1
                produced += 1
                yield decoded
                if per_pass is not None and produced >= per_pass:
                    break
            if produced == 0:
                raise DataError(
                    f"a whole pass over {len(shards)} shard(s) gave no usable sample "
                    f"({describe_data_counts(counts)}): {', '.join(shards[:3])}"
                )

    def _raw_samples(self, shards, counts):
        return read_shards(shards, counts, self.shard_read_timeout)

    def _shuffled(self, samples, rng):
        if self.shuffle_buffer_size <= 1:
            yield from samples
            return
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer_size:
                index = rng.randrange(len(buffer))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _warn_once(self, kind, message):
        """One warning line for the first sample of each kind of problem: the counts tell how many."""
        if kind not in self.warned:
            self.warned.add(kind)
            logging.getLogger(__name__).warning(message)

    def _read(self, sample, counts):
        """(caption, the json's original size or None, source) of a sample, source being the decoded RGB image or,
        for precomputed latents, their arrays and record (`read_precomputed`); None when the sample is skipped
        (counted). Draws nothing from the rng: a skipped sample must not shift the random choices of the next."""
        where = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
        not_utf8 = []  # its text members read as cp1252, as the CSV metadata readers do
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])  # bytes: UTF-8, -16 or -32
            except UnicodeDecodeError:
                text, _ = decode_text(sample["json"])
                not_utf8.append("json")
                with contextlib.suppress(ValueError):
                    meta = json.loads(text)
            except ValueError:
                meta = {}  # unparsable metadata: the sample is kept, judged by its image alone
        caption = None
        if "txt" in sample:
            caption, utf8 = decode_text(sample["txt"])
            caption = caption.strip()
            if not utf8:
                not_utf8.append("txt")
        try:
            if not isinstance(meta, dict):
                raise MalformedMetadata(f"json is a {type(meta).__name__}, not an object")
            rejected = self.sample_filter.reject_by_metadata(meta) is not None
            # SDXL's micro-conditioning wants the size before any resizing: LAION-style shards store it in the json
            meta_size = original_size_from_metadata(meta) if self.needs_original_size else None
            if caption is None:
                caption = caption_from_metadata(meta)
        except MalformedMetadata:
            counts["n_malformed"] += 1
            return None
        if rejected:
            counts["n_filtered"] += 1
            return None
        if is_precomputed(sample):
            source = read_precomputed(sample)
            image_size = source["record"]["image_size"] if source is not None else None
        else:
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            source = None
            if image_key is None:
                kind, why = missing_image_reason(sample)
                self._warn_once(kind, f"skipping {why}; counted as data/skipped_unreadable")
            else:
                try:
                    source = to_rgb(Image.open(io.BytesIO(sample[image_key])))
                except Exception as error:  # PIL raises many types for truncated or non-image bytes
                    self._warn_once("undecodable", f"skipping {where}: its {image_key} is not a readable image "
                                                   f"({error}); counted as data/skipped_unreadable"[:300])
            image_size = source.size if source is not None else None
        if source is None:
            counts["n_corrupt"] += 1
            return None
        if self.sample_filter.min_image_size and min(image_size) < self.sample_filter.min_image_size:
            counts["n_filtered"] += 1
            return None
        hidden = several_dots_members(sample)
        if hidden:  # e.g. photo.jpg.txt beside photo.jpg: trained without its caption (counted as uncaptioned)
            self._warn_once("several dots in a sample used", f"{where}: its {', '.join(map(repr, hidden))} "
                                                             f"{'is' if len(hidden) == 1 else 'are'} not read as its "
                                                             f"{'/'.join(m.rsplit('.', 1)[1] for m in hidden)}: "
                                                             f"{SEVERAL_DOTS_ADVICE}")
        if not_utf8:  # counted among the samples used, as the uncaptioned ones are
            counts["n_not_utf8"] += 1
            self._warn_once("not utf-8", f"the {' and '.join(not_utf8)} of {where} "
                                         f"{'is' if len(not_utf8) == 1 else 'are'} not UTF-8: read as Windows-1252 "
                                         "(cp1252); counted as data/not_utf8")
        return caption, meta_size, source

    def _decode(self, sample, rng, counts):
        read = self._read(sample, counts)
        if read is None:
            return None
        caption, meta_size, source = read
        precomputed = isinstance(source, dict)
        self._check_same_making(sample, precomputed_settings(source["record"]) if precomputed else None)
        if not caption:
            counts["n_uncaptioned"] += 1
            if not self.warned_uncaptioned:
                self.warned_uncaptioned = True
                logging.getLogger(__name__).warning(
                    f"samples without a caption (no .txt, no json 'caption' or 'text'), e.g. {sample.get('__key__')} "
                    f"in {sample.get('__url__')}: they train unconditionally; counted as data/uncaptioned")
        dropped = self.proportion_empty_prompts > 0 and rng.random() < self.proportion_empty_prompts
        if dropped:
            caption = ""
        if precomputed:
            # the crop was fixed when the latents were made; the flip takes the raw path's draw, so a run with the
            # same seed flips the same samples
            view = 1 if self.transform.random_flip and rng.random() < 0.5 else 0
            return {"latent_mean": source["latent_mean"][view], "latent_std": source["latent_std"][view],
                    **{key: source[key] for key in PRECOMPUTED_TEXT_ARRAYS if key in source},
                    "caption": caption, "caption_dropped": dropped,
                    "original_size": meta_size or tuple(source["record"]["original_size"]),
                    "crop_top_left": tuple(source["record"]["crop_top_left"])}
        pixels, original_size, crop_top_left = self.transform(source, rng)
        original_size = meta_size or original_size
        return {"pixel_values": pixels, "caption": caption, "original_size": original_size,
                "crop_top_left": crop_top_left}

    def _check_same_making(self, sample, settings):
        """DataError when a sample was made otherwise than the reference sample (`reference_making`): raw images
        among precomputed latents, or latents of another VAE, size, crop, ...: one run cannot mix them."""
        where = sample_location(sample)
        first, first_where = self.reference_making()
        if first_where is None:
            # nothing of known making when the reference was sought, something now (a source that reads otherwise
            # each time, such as a flaky 'pipe:' command): the best reference left is this reader's first sample
            self.reference = (settings, where)
            return
        if settings == first:
            return
        if first is None or settings is None:
            kinds = ["raw images" if s is None else "precomputed latents" for s in (settings, first)]
            difference = f"holds {kinds[0]}, but the first readable sample ({first_where}) holds {kinds[1]}"
        else:
            keys = [key for key in settings if settings[key] != first.get(key)]
            difference = (f"was precomputed with {', '.join(f'{k} {settings[k]}' for k in keys)}, but the first "
                          f"readable sample ({first_where}) with {', '.join(f'{k} {first.get(k)}' for k in keys)}")
        raise DataError(f"mixed shards: sample {where} {difference}; precompute all shards with the same settings")


def new_data_counts():
    """Per-reason counts of what the data stream skipped or flagged (summed over batches, kept in checkpoints)."""
    return {"n_corrupt": 0, "n_malformed": 0, "n_filtered": 0, "n_stalled": 0, "n_uncaptioned": 0, "n_not_utf8": 0}


def sample_location(sample):
    return f"{sample.get('__key__')} in {sample.get('__url__')}"


def read_shards(urls, counts, timeout):
    """The raw samples (dicts of member bytes) of shards, in order. Unreadable shard data is skipped and counted
    (n_corrupt), a shard that stalls for `timeout` seconds is abandoned and counted (n_stalled); a shard is
    closed when read, or when the reading stops early (close() of the returned generator)."""
    stalled = set()

    def count_and_continue(exn):
        if isinstance(exn, ShardStalled):  # raised again by every later read of that shard: count it once
            if exn.url not in stalled:
                stalled.add(exn.url)
                counts["n_stalled"] += 1
                logging.getLogger(__name__).warning(f"skipping the rest of a stalled shard: {exn.message}")
            return True
        counts["n_corrupt"] += 1
        message = exn.message if isinstance(exn, UnreadableShard) else f"unreadable shard data: {exn!r}"
        logging.getLogger(__name__).warning(f"skipping {message}; counted as data/skipped_unreadable"[:400])
        return True

    def files():
        for url in urls:
            try:
                stream = open_shard(url, timeout)
            except Exception as exn:  # a missing file, a command that cannot start
                count_and_continue(exn)
                continue
            # closed also when the reader stops early: a 'pipe:' command is killed now, not at garbage collection
            with contextlib.closing(stream):
                yield from tar_members(url, stream, count_and_continue)

    return group_by_keys(files(), handler=count_and_continue)


class ShardStalled(OSError):
    """A shard's source sent no byte for the read timeout (a dead connection, a hung command)."""

    def __init__(self, url, timeout):
        self.message = f"no data for {timeout:g} s from {url} (--shard_read_timeout)"
        super().__init__(self.message)
        self.url = url  # webdataset appends context to args; the handler reads these attributes instead


class WatchedCommand(io.RawIOBase):
    """The stdout of a shell command (a 'pipe:' shard, or curl for an http(s) one), read under a deadline: a read
    that receives nothing for `timeout` seconds kills the command and raises ShardStalled, as does every later
    read. A command that exits non-zero raises OSError at its end of data."""

    def __init__(self, command, url, timeout):
        super().__init__()
        self.url, self.timeout = url, timeout
        # its own session, so that killing it also kills what the shell started (curl, sleep, ...)
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=0,
                                        start_new_session=True)
        self.stalled = False

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.stalled:
            raise ShardStalled(self.url, self.timeout)
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        if not ready:
            self.stalled = True
            self._kill()
            raise ShardStalled(self.url, self.timeout)
        data = os.read(self.process.stdout.fileno(), len(buffer))
        if not data:
            status = self.process.wait()
            if status != 0:
                raise OSError(f"{self.url}: the command exited with status {status}")
        buffer[:len(data)] = data
        return len(data)

    def _kill(self):
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self):
        if not self.closed:
            self._kill()
            self.process.stdout.close()
        super().close()


class UnreadableShard(OSError):
    """The rest of a shard cannot be read: it is cut short, has a garbled header, or is not a tar at all."""

    def __init__(self, message):
        self.message = message
        super().__init__(message)


class EndCheckingTarInfo(tarfile.TarInfo):
    """Notes, on the tar being read, whether the header that ended it was the tar's end-of-archive block. Reading
    a stream, tarfile takes a header cut short, missing or garbled for the end of the archive without a word, and
    the samples after it would be lost silently."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.end_block_read = True
            raise
        except tarfile.HeaderError as error:
            tar.bad_end = str(error)  # "empty header", "truncated header", "bad checksum", ...
            raise


def tar_members(url, stream, handler):
    """The files of one tar shard as webdataset's tar_file_expander yields them ({"fname", "data", "__url__"}, then
    {} to end the shard), but a shard that breaks off (cut inside a member or its header, a garbled header, no
    end-of-archive block) is reported to `handler` once, as an UnreadableShard, and the files of the sample being
    read when it broke are dropped: that sample may lack its caption or json."""
    held, held_key = [], None  # the files of the sample being read: passed on when the next sample starts
    last, reading = None, None  # the last member read whole, the one being read
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=EndCheckingTarInfo)
        for info in tar:
            # webdataset's rules: regular files only, none of its __meta__ files
            if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                continue
            key = base_plus_ext(info.name)[0]
            if key != held_key:
                yield from held
                held, held_key = [], key
            reading = info.name
            held.append({"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url})
            last, reading = info.name, None
            tar.members = []  # a stream-mode TarFile keeps every TarInfo otherwise
    except ShardStalled as error:
        handler(error)
    except Exception as error:
        if last is None and reading is None:
            handler(UnreadableShard(f"{url}: not a readable tar ({error})"))
        else:
            where = f"inside member {reading}" if reading is not None else f"after member {last}"
            handler(UnreadableShard(f"the rest of {url}: it breaks off {where} ({error}); sample {held_key} "
                                    "dropped"))
    else:
        if getattr(tar, "end_block_read", False):
            yield from held
        else:
            why = {"empty header": "it ends without the tar end-of-archive block (cut short?)",
                   "truncated header": "it is cut short inside a member header"}.get(getattr(tar, "bad_end", None))
            why = why or f"a garbled member header ({getattr(tar, 'bad_end', 'unknown')})"
            handler(UnreadableShard(f"the rest of {url}: {why} after member {last}; sample {held_key} dropped"))
    yield {}


def open_shard(url, timeout):
    """A readable binary stream of one shard: 'pipe:' commands and http(s) urls run under the read watchdog
    (http through curl with its own stall limits), local paths are opened, other schemes go to webdataset."""
    if url.startswith("pipe:"):
        return io.BufferedReader(WatchedCommand(url[len("pipe:"):], url, timeout), buffer_size=1 << 20)
    if url.startswith(("http://", "https://")):
        # curl drops a connection slowed to a trickle (under 1 KB/s for twice the timeout), which the watchdog,
        # waiting for silence, would not; --fail keeps an HTTP error page from being read as a tar
        command = (f"curl --fail --silent --show-error --location --retry 3 --connect-timeout 30 --speed-limit 1024 "
                   f"--speed-time {2 * max(1, math.ceil(timeout))} {shlex.quote(url)}")
        return io.BufferedReader(WatchedCommand(command, url, timeout), buffer_size=1 << 20)
    if url.startswith("file:"):
        url = url[len("file:"):]
    if not is_remote_url(url):
        return open(os.path.expanduser(url), "rb")
    return gopen(url)


def defer_stop_signals(worker_id, grace_seconds=30):
    """DataLoader workers outlive a stop signal sent to the whole process group (SLURM, Ctrl-C, torchrun), so
    the training process can finish its step and checkpoint: SIGINT is ignored, SIGTERM ends the worker only
    after `grace_seconds` (the trainer shuts its workers down itself well before that)."""
    def exit_after_grace(signum, frame):
        timer = threading.Timer(grace_seconds, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_after_grace)


def collate_samples(samples, counts):
    """One batch: the images' pixel values, or their precomputed latent distributions (and caption embeddings)."""
    batch = {
        "captions": [s["caption"] for s in samples],
        "original_sizes": torch.tensor([s["original_size"] for s in samples]),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples]),
        **counts,
    }
    for key in ("pixel_values", "latent_mean", "latent_std", *PRECOMPUTED_TEXT_ARRAYS):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    if "caption_dropped" in samples[0]:
        batch["captions_dropped"] = torch.tensor([s["caption_dropped"] for s in samples])
    return batch


def stream_topology(args, num_processes):
    """What decides which samples each step of a shard stream reads (see ShardStream): a resumed run must
    match it, or the skip count lands elsewhere in the data. Keys as users know them (see run_record)."""
    data_dir = getattr(args, "train_data_dir", None)  # train_bk_sdm_kd.py's other data source
    if data_dir is not None:
        data = {"--train_data_dir": os.path.realpath(data_dir)}
    else:
        data = {"--train_shards_path_or_url": shard_list_digest(expand_shard_urls(args.train_shards_path_or_url))}
    return {"processes": num_processes, "--dataloader_num_workers": args.dataloader_num_workers,
            "--train_batch_size": args.train_batch_size,
            "--gradient_accumulation_steps": args.gradient_accumulation_steps, "--seed": args.seed, **data,
            "--max_train_samples": args.max_train_samples, "--shuffle_buffer_size": args.shuffle_buffer_size}


def stream_options(args, accelerator, skip_batches):
    """The ShardStream settings every sample source shares: batches, transform, filters, seed, split, resume."""
    return dict(
        batch_size=args.train_batch_size,
        transform=ImageTransform(args.resolution, args.interpolation_type, args.center_crop, args.random_flip),
        sample_filter=SampleFilter(args.min_image_size, args.max_watermark_probability, args.min_aesthetic_score),
        seed=args.seed if args.seed is not None else 0,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        proportion_empty_prompts=getattr(args, "proportion_empty_prompts", 0.0),
        shuffle_buffer_size=args.shuffle_buffer_size,
        skip_batches=skip_batches,
        shard_read_timeout=args.shard_read_timeout,
    )


def make_train_dataloader(args, accelerator, skip_batches=0, needs_original_size=False):
    stream = ShardStream(expand_shard_urls(args.train_shards_path_or_url),
                         **stream_options(args, accelerator, skip_batches),
                         max_samples_per_pass=args.max_train_samples, needs_original_size=needs_original_size)
    return stream_dataloader(stream, args, accelerator)


def stream_dataloader(stream, args, accelerator):
    """A DataLoader over a stream that yields whole batches, read by --dataloader_num_workers workers."""
    try:
        stream.reference_making()  # here, before the workers start: each gets a copy of the same reference
    except DataError as error:
        exit_on_data_error(error)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches, so batch boundaries are deterministic
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # do not draw from the global RNG (resume equality)
        worker_init_fn=defer_stop_signals,
    )


# ----------------------------------------
# Precomputed latents (tools/precompute_latents.py): shards that hold each image's VAE posterior instead
# ----------------------------------------


PRECOMPUTED_RECORD = "latents.json"  # the member that marks a precomputed sample and records how it was made
PRECOMPUTED_FORMAT_VERSION = 1
# the text arrays a precomputed sample may hold, in the order of a text encoding's tuple: the embeddings, SDXL's
# pooled ones, and the attention mask of an encoder whose padding the denoiser must not attend to (T5: PixArt)
PRECOMPUTED_TEXT_ARRAYS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


def weights_fingerprint(named_parameters, values_per_tensor=4096):
    """A short hash of weights: every parameter's name and shape and the signs of its first values. Signs, not
    values: an fp32, bf16 or fp16 copy of the same weights keeps every sign, whereas rounded values differ
    (fp32 -> fp16 -> bf16 rounds about one value in 16 differently from fp32 -> bf16); other weights differ in
    thousands of signs."""
    digest = hashlib.sha256()
    for name, parameter in named_parameters:
        signs = torch.signbit(parameter.detach().flatten()[:values_per_tensor]).cpu().numpy()
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(np.packbits(signs).tobytes())
    return digest.hexdigest()[:16]


def vae_fingerprint(vae):
    """The fingerprint of what makes a VAE's latents: its encoder and quant_conv (a decoder fine-tune, such as
    sd-vae-ft-mse, keeps the latents)."""
    return weights_fingerprint((name, p) for name, p in vae.named_parameters()
                               if name.startswith(("encoder.", "quant_conv.")))


def is_precomputed(sample):
    """Whether a sample holds precomputed latents, readable or not: their record or their arrays."""
    return PRECOMPUTED_RECORD in sample or "latent_mean.npy" in sample or "latent_std.npy" in sample


def making_reference(samples, limit):
    """(record, where) of the first of `samples` whose making is known: the record of readable precomputed
    latents, or None for a raw image (readable or not: raw either way). A precomputed sample whose record or arrays
    cannot be read tells nothing of its settings and is passed over (the stream skips and counts it). (None, None)
    when the samples end first (then there is nothing to train on either); DataError after `limit` samples."""
    for index, sample in enumerate(samples, 1):
        if is_precomputed(sample):
            source = read_precomputed(sample)
            if source is not None:
                return source["record"], sample_location(sample)
        elif any(key in sample for key in IMAGE_KEYS):
            return None, sample_location(sample)
        if index >= limit:
            raise DataError(f"none of the first {limit} samples of the shards (from {sample.get('__url__')} on) holds "
                            f"an image ({', '.join('.' + k for k in IMAGE_KEYS)}) or readable precomputed latents: "
                            "check the shards")
    return None, None


def read_precomputed(sample):
    """The arrays (torch tensors) and the record of a precomputed sample, or None when they are unreadable."""
    try:
        record = json.loads(sample[PRECOMPUTED_RECORD])
        arrays = {name: torch.from_numpy(np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False))
                  for name in ("latent_mean", "latent_std", *PRECOMPUTED_TEXT_ARRAYS) if f"{name}.npy" in sample}
        views = record["views"]
        if arrays["latent_mean"].shape != arrays["latent_std"].shape or arrays["latent_mean"].shape[0] != views:
            return None
        for key in ("image_size", "original_size", "crop_top_left"):
            record[key] = [int(v) for v in record[key]]
        precomputed_settings(record)  # has every field that the checks of its making read
    except Exception:  # a truncated array, a record without its fields: a bad sample like an unreadable image
        return None
    return {"record": record, **arrays}


def precomputed_settings(record):
    """What the samples of one run's precomputed shards must share (names, seeds and per-sample fields aside)."""
    text_encoders = record.get("text_encoders")
    return {"format": record.get("format_version"), "VAE weights": record["vae"]["fingerprint"],
            "resolution": record["resolution"], "crop": "center" if record["center_crop"] else "random",
            "interpolation": record["interpolation"], "views": record["views"],
            "text encoder weights": [e["fingerprint"] for e in text_encoders] if text_encoders else None}


def check_precomputed_data(args, vae, text_encoders):
    """Start-up check (models loaded, nothing trained yet): when the shards hold precomputed latents (judged by
    the first sample whose making is known, the stream's reference: an unreadable first sample changes nothing),
    refuse in one line what would train on other data than this run describes: latents of another VAE,
    resolution, crop mode or interpolation, no mirror images for --random_flip, or caption embeddings of other
    text encoders. Every other sample must match that one (ShardStream refuses mixed shards).
    True when the shards hold precomputed latents."""
    if not getattr(args, "train_shards_path_or_url", None):
        return False  # an image folder: raw images only
    urls = expand_shard_urls(args.train_shards_path_or_url)
    try:
        with contextlib.closing(read_shards(urls, new_data_counts(), args.shard_read_timeout)) as samples:
            record, where = making_reference(samples, ShardStream.MAX_REJECTS_BEFORE_FIRST)
    except DataError as error:
        exit_on_data_error(error)
    if record is None:
        return False
    if record.get("format_version") != PRECOMPUTED_FORMAT_VERSION:
        raise SystemExit(f"error: sample {where} holds precomputed latents of format {record.get('format_version')}; "
                         f"this script reads format {PRECOMPUTED_FORMAT_VERSION}: precompute them again")
    theirs, ours = [], []

    def compare(their_value, our_value, what):
        if their_value != our_value:
            theirs.append(what(their_value))
            ours.append(what(our_value))

    compare(record["vae"]["fingerprint"], vae_fingerprint(vae), lambda fingerprint: f"VAE weights {fingerprint}")
    compare(record["resolution"], args.resolution, lambda resolution: f"--resolution {resolution}")
    compare(record["center_crop"], args.center_crop, lambda center: "--center_crop" if center else "random crops")
    compare(record["interpolation"], args.interpolation_type, lambda name: f"--interpolation_type {name}")
    if args.random_flip and record["views"] < 2:
        theirs.append("no mirror images")
        ours.append("--random_flip")
    if record.get("text_encoders"):
        compare([e["fingerprint"] for e in record["text_encoders"]], [weights_fingerprint(e.named_parameters())
                                                                     for e in text_encoders],
                lambda fingerprints: f"text encoder weights {'/'.join(fingerprints)}")
    if theirs:
        raise SystemExit(f"error: sample {where} holds latents precomputed with {', '.join(theirs)}, but this run has "
                         f"{', '.join(ours)}: precompute them again with this run's settings "
                         "(tools/precompute_latents.py)")
    return True


def latents_from_batch(vae, batch, encode_batch_size):
    """The batch's latents in the diffusion latent space: precomputed posteriors sampled as
    `DiagonalGaussianDistribution.sample()` samples them (same chunks, dtype and device, so a run with the same
    seed draws the same noise as one that encodes), else the images encoded now.

    Contiguous either way: the VAE's output can be channels-last, and the loss's randn_like would then lay the
    same random numbers out in another order, so the two sources would get different diffusion noise."""
    if "latent_mean" not in batch:
        return encode_latents(vae, batch["pixel_values"], encode_batch_size).contiguous()
    mean = batch["latent_mean"].to(device=vae.device, dtype=vae.dtype)
    std = batch["latent_std"].to(device=vae.device, dtype=vae.dtype)
    latents = [m + s * torch.randn(m.shape, device=vae.device, dtype=vae.dtype)
               for m, s in zip(mean.split(encode_batch_size), std.split(encode_batch_size))]
    return (torch.cat(latents).float() * vae.config.scaling_factor).contiguous()


def text_embeddings_from_batch(batch, encode, device):
    """The captions' embeddings: `encode(captions)` (a tensor, or a tuple: SDXL's embeddings and pooled embeddings,
    or embeddings and their attention mask), or the precomputed ones when the shards hold them (the tuple in
    PRECOMPUTED_TEXT_ARRAYS order, a mask as float 0/1), with those of captions dropped to ""
    (--proportion_empty_prompts) encoded now."""
    if "prompt_embeds" not in batch:
        return encode(batch["captions"])
    embeds = [batch[key].to(device=device, dtype=torch.float32) for key in PRECOMPUTED_TEXT_ARRAYS if key in batch]
    dropped = batch["captions_dropped"].to(device)
    if dropped.any():
        empty = encode([""])
        for precomputed, now in zip(embeds, empty if isinstance(empty, tuple) else (empty,)):
            precomputed[dropped] = now.to(precomputed.device, precomputed.dtype)
    return tuple(embeds) if len(embeds) > 1 else embeds[0]


# endregion DATA


def main(args):
    accelerator = start_run(args)
    resolve_ema_decay(args, accelerator)  # LoRA mode: the EMA adapter target, where it can live
    record = run_record("lcd-sdxl-lora" if args.use_lora else "lcd-sdxl-full",
                        stream_topology(args, accelerator.num_processes),
                        LatentConsistencyDistillationXL.checkpoint_settings(args))
    # SDXL reads each sample's original size from its json: the time_ids micro-conditioning
    make_dataloader = functools.partial(make_train_dataloader, needs_original_size=True)
    data = open_training_data(args, accelerator, record, make_dataloader, new_data_counts(),
                              samples_per_epoch=args.max_train_samples or 0,
                              checkpoint_files=LatentConsistencyDistillationXL.checkpoint_files(args))
    method = LatentConsistencyDistillationXL(args, accelerator)
    precomputed = check_precomputed_data(args, method.vae, method.text_encoders)
    free_unused_vae_halves(method.vae, encodes=not precomputed, decodes=args.validation_prompts != [])
    train(args, accelerator, method, data, title=method.title)


if __name__ == "__main__":
    main(parse_args())
