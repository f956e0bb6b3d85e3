#!/usr/bin/env python
"""Write a random-weight Stable Diffusion pipeline directory, fully offline.

Our dev and CI machines have no model hub and no internet, yet every training script needs a
"pretrained" pipeline to start from. This tool writes one with random weights in the exact
``save_pretrained`` layout that ``StableDiffusionPipeline.from_pretrained(dir)`` /
``StableDiffusionXLPipeline.from_pretrained(dir)`` load::

    DIR/model_index.json
    DIR/unet/  DIR/vae/  DIR/text_encoder/  DIR/tokenizer/  DIR/scheduler/
    DIR/text_encoder_2/  DIR/tokenizer_2/          (SDXL presets only)

Presets (see ``PRESETS``):

* ``tiny-sd``, ``tiny-sd2``, ``tiny-sdxl``: the real block structure of SD 1.x / SD 2.x / SDXL
  with tiny widths, for tests (build in seconds, generate a 64x64 image).
* ``small-sd``: a mid-size SD 1.x-structured pipeline (~50M-parameter UNet) for CPU benchmarks.
* ``sd15``, ``sd21``, ``sdxl``: the real shapes (random weights) for offline smoke tests and
  benchmarks; ``count_parameters`` counts them on the meta device without allocating memory.

The tokenizer is built offline (see ``make_offline_clip_tokenizer``): a byte-level CLIP BPE
vocabulary without merges, so every character is one token. Text encoders get the tokenizer's
bos/eos/pad ids; the real-size presets keep CLIP's 49408-row embedding (the ids beyond the
offline vocabulary are simply never used).

Weights are a pure function of ``(preset, seed)``: the global torch RNG is seeded once and the
components are built in a fixed order, so the same seed gives identical files and another seed
gives "a second model of the same architecture with different weights".

Usage::

    python tools/make_random_pipeline.py --preset tiny-sd --output_dir /tmp/tiny-sd [--seed 0]
        [--dtype float32|float16|bfloat16] [--overwrite]
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# --------------------------------------------------------------------------------------------
# Offline CLIP tokenizer
# --------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode():
    """Return the byte-level BPE table (GPT-2 / CLIP): each of the 256 byte values -> one printable char.

    Printable Latin-1 bytes map to themselves; the remaining bytes (controls, space, ...) are
    shifted to code points 256+ so that every byte has a visible, whitespace-free stand-in.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return dict(sorted(table.items()))


def offline_clip_vocab():
    """Vocabulary of the offline tokenizer: 256 byte chars, their ``</w>`` forms, then bos and eos.

    With no merges, CLIP's BPE splits a word into characters and marks the last one with ``</w>``,
    so these 512 entries cover every possible input and nothing ever maps to the unknown token.
    """
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def make_offline_clip_tokenizer(save_dir, pad_token=EOS_TOKEN, model_max_length=77):
    """Build a CLIP tokenizer without any download and save it to ``save_dir``.

    ``vocab.json`` and ``merges.txt`` (only the ``#version: 0.2`` header) are written by hand, so
    any transformers version (slow or fast CLIP tokenizer) can load the folder; ``save_pretrained``
    then adds ``tokenizer_config.json`` (which carries ``model_max_length=77``, lost otherwise)
    and ``tokenizer.json``.

    ``pad_token``: SD 1.x pads with ``<|endoftext|>``, SD 2.x and SDXL's second tokenizer with
    ``"!"``; both are in the vocabulary. Returns the tokenizer as loaded back from ``save_dir``.
    """
    os.makedirs(save_dir, exist_ok=True)
    vocab = offline_clip_vocab()
    with open(os.path.join(save_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(save_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    # Build from the files just written (not from the dict) so that what we save is exactly what
    # a later from_pretrained sees.
    tokenizer = CLIPTokenizer.from_pretrained(
        save_dir,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(save_dir)
    return CLIPTokenizer.from_pretrained(save_dir)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

# The SD 1.x/2.x/XL training schedule (scaled_linear 0.00085 -> 0.012 over 1000 steps). Keys the
# DDPM class does not use (set_alpha_to_one) are kept anyway: the saved config then reads like
# the real one, and DDIMScheduler.from_pretrained(dir, subfolder="scheduler") picks them up.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}


def _sd_unet(block_out_channels, cross_attention_dim, attention_head_dim, sample_size, **extra):
    """UNet2DConditionModel kwargs with the SD 1.x/2.x block structure.

    Down: 3x CrossAttnDownBlock2D + DownBlock2D, mid: UNetMidBlock2DCrossAttn, up: UpBlock2D +
    3x CrossAttnUpBlock2D, 2 layers per block. Note diffusers' legacy naming: for these models
    ``attention_head_dim`` is really the number of heads (SD 1.x: 8 heads at every level).
    """
    config = {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": SD1_DOWN,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": SD1_UP,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 2,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }
    config.update(extra)
    return config


def _sdxl_unet(block_out_channels, transformer_layers, attention_head_dim, cross_attention_dim,
               addition_time_embed_dim, pooled_dim, sample_size, **extra):
    """UNet2DConditionModel kwargs with the SDXL structure (3 levels, text_time conditioning).

    The "text_time" added embedding sees the pooled text embedding (text_encoder_2's projection)
    concatenated with the sinusoidal embedding of the 6 micro-conditioning numbers, hence
    projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + pooled_dim.
    """
    config = {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": SDXL_DOWN,
        "up_block_types": SDXL_UP,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 2,
        "transformer_layers_per_block": tuple(transformer_layers),
        "attention_head_dim": tuple(attention_head_dim),
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": 6 * addition_time_embed_dim + pooled_dim,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    config.update(extra)
    return config


def _vae(block_out_channels, layers_per_block, norm_num_groups, sample_size, **extra):
    """AutoencoderKL kwargs; 4 levels (3 downsamplings) give SD's VAE scale factor of 8."""
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * len(block_out_channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(block_out_channels),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": 4,
        "norm_num_groups": norm_num_groups,
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }
    config.update(extra)
    return config


def _clip_text(hidden_size, num_layers, num_heads, intermediate_size, hidden_act,
               vocab_size=None, projection_dim=None):
    """CLIPTextConfig kwargs. ``vocab_size=None`` means "exactly the offline tokenizer's size";
    bos/eos/pad ids are always filled in from the tokenizer at build time."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": hidden_act,
        "max_position_embeddings": 77,
        "projection_dim": projection_dim if projection_dim is not None else hidden_size,
        "layer_norm_eps": 1e-5,
    }


# Each preset: the pipeline class, kwargs for every component, and the tokenizer pad tokens.
# Keys are plain data, so callers can read them (e.g. count parameters, derive student configs).
PRESETS = {
    "tiny-sd": {
        "description": "SD 1.x block structure, tiny widths, 64x64 images (tests)",
        "pipeline": "StableDiffusionPipeline",
        "unet": _sd_unet((32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=2, sample_size=8),
        "vae": _vae((8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
        "text_encoder": _clip_text(32, 2, 4, 64, "quick_gelu"),
        "tokenizer": {"pad_token": EOS_TOKEN},
        "scheduler": {"class": "DDPMScheduler", "config": dict(SD_SCHEDULE)},
    },
    "tiny-sd2": {
        "description": "SD 2.x structure (v-prediction, linear projections), tiny widths (tests)",
        "pipeline": "StableDiffusionPipeline",
        "unet": _sd_unet(
            (32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4), sample_size=8,
            use_linear_projection=True, upcast_attention=True,
        ),
        "vae": _vae((8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
        "text_encoder": _clip_text(32, 2, 4, 64, "gelu"),
        "tokenizer": {"pad_token": "!"},
        "scheduler": {"class": "DDPMScheduler", "config": dict(SD_SCHEDULE, prediction_type="v_prediction")},
    },
    "tiny-sdxl": {
        "description": "SDXL structure (two text encoders, text_time conditioning), tiny widths (tests)",
        "pipeline": "StableDiffusionXLPipeline",
        "unet": _sdxl_unet(
            (32, 64, 64), transformer_layers=(1, 1, 2), attention_head_dim=(2, 4, 4),
            cross_attention_dim=32 + 32, addition_time_embed_dim=8, pooled_dim=32, sample_size=8,
        ),
        "vae": _vae((8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                    scaling_factor=0.13025, force_upcast=True),
        "text_encoder": _clip_text(32, 2, 4, 64, "quick_gelu"),
        "text_encoder_2": _clip_text(32, 2, 4, 64, "gelu", projection_dim=32),
        "tokenizer": {"pad_token": EOS_TOKEN},
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": {"class": "EulerDiscreteScheduler", "config": dict(SD_SCHEDULE, interpolation_type="linear")},
    },
    "small-sd": {
        "description": "SD 1.x structure, ~50M-parameter UNet, 256x256 default (CPU benchmarks)",
        "pipeline": "StableDiffusionPipeline",
        "unet": _sd_unet((64, 128, 256, 256), cross_attention_dim=256, attention_head_dim=8, sample_size=32),
        "vae": _vae((32, 64, 128, 128), layers_per_block=2, norm_num_groups=32, sample_size=256),
        "text_encoder": _clip_text(256, 4, 4, 1024, "quick_gelu"),
        "tokenizer": {"pad_token": EOS_TOKEN},
        "scheduler": {"class": "DDPMScheduler", "config": dict(SD_SCHEDULE)},
    },
    "sd15": {
        "description": "real SD 1.5 shapes (UNet 859.5M, CLIP ViT-L/14 text encoder), random weights",
        "pipeline": "StableDiffusionPipeline",
        "unet": _sd_unet((320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, sample_size=64),
        "vae": _vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
        "text_encoder": _clip_text(768, 12, 12, 3072, "quick_gelu", vocab_size=49408, projection_dim=768),
        "tokenizer": {"pad_token": EOS_TOKEN},
        "scheduler": {"class": "DDPMScheduler", "config": dict(SD_SCHEDULE)},
    },
    "sd21": {
        "description": "real SD 2.1 (768, v-prediction) shapes, OpenCLIP-H text encoder, random weights",
        "pipeline": "StableDiffusionPipeline",
        "unet": _sd_unet(
            (320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), sample_size=96,
            use_linear_projection=True, upcast_attention=True,
        ),
        "vae": _vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=768),
        "text_encoder": _clip_text(1024, 23, 16, 4096, "gelu", vocab_size=49408, projection_dim=512),
        "tokenizer": {"pad_token": "!"},
        "scheduler": {"class": "DDPMScheduler", "config": dict(SD_SCHEDULE, prediction_type="v_prediction")},
    },
    "sdxl": {
        "description": "real SDXL base shapes (UNet 2.57B, CLIP-L + OpenCLIP-bigG), random weights",
        "pipeline": "StableDiffusionXLPipeline",
        "unet": _sdxl_unet(
            (320, 640, 1280), transformer_layers=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=768 + 1280, addition_time_embed_dim=256, pooled_dim=1280, sample_size=128,
        ),
        "vae": _vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.13025, force_upcast=True),
        "text_encoder": _clip_text(768, 12, 12, 3072, "quick_gelu", vocab_size=49408, projection_dim=768),
        "text_encoder_2": _clip_text(1280, 32, 20, 5120, "gelu", vocab_size=49408, projection_dim=1280),
        "tokenizer": {"pad_token": EOS_TOKEN},
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": {"class": "EulerDiscreteScheduler", "config": dict(SD_SCHEDULE, interpolation_type="linear")},
    },
}

PIPELINE_CLASSES = {"StableDiffusionPipeline": StableDiffusionPipeline,
                    "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
SCHEDULER_CLASSES = {"DDPMScheduler": DDPMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_preset(preset):
    """The preset's description dict (a deep copy, safe to modify); ValueError for unknown names."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


# --------------------------------------------------------------------------------------------
# Component construction
# --------------------------------------------------------------------------------------------


def text_encoder_config(kwargs, tokenizer):
    """CLIPTextConfig from preset kwargs, with vocab size and special ids taken from ``tokenizer``.

    The ids matter: CLIPTextModel pools the hidden state at the first ``eos_token_id`` position,
    so it must be the id the tokenizer actually emits.
    """
    kwargs = dict(kwargs)
    if kwargs["vocab_size"] is None:
        kwargs["vocab_size"] = len(tokenizer)
    elif kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"text encoder vocab_size {kwargs['vocab_size']} < tokenizer size {len(tokenizer)}")
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _component_factories(spec, tokenizers):
    """(name, zero-argument constructor) for every model, in the fixed order that defines the seed."""

    def text_encoder(name, cls):
        tokenizer = tokenizers[name.replace("text_encoder", "tokenizer")]
        return lambda: cls(text_encoder_config(spec[name], tokenizer))

    factories = [
        ("unet", lambda: UNet2DConditionModel(**spec["unet"])),
        ("vae", lambda: AutoencoderKL(**spec["vae"])),
        ("text_encoder", text_encoder("text_encoder", CLIPTextModel)),
    ]
    if "text_encoder_2" in spec:
        # SDXL: the second encoder also gives the pooled, projected embedding that the UNet's
        # text_time conditioning needs, hence the WithProjection class.
        factories.append(("text_encoder_2", text_encoder("text_encoder_2", CLIPTextModelWithProjection)))
    return factories


def make_scheduler(spec):
    """The preset's noise scheduler (config-only, no weights)."""
    cls = SCHEDULER_CLASSES[spec["scheduler"]["class"]]
    # from_config (not cls(**config)) so keys this class does not take are stored, not rejected.
    return cls.from_config(spec["scheduler"]["config"])


def count_parameters(preset, component="unet"):
    """Number of parameters of one component of a preset, built on the meta device.

    The meta device allocates no storage and runs no real initialisation, so even SDXL's 2.6B
    UNet is counted in about a second on a small machine.
    """
    spec = get_preset(preset)
    if component not in ("unet", "vae", "text_encoder", "text_encoder_2") or component not in spec:
        raise ValueError(f"preset {preset!r} has no model component {component!r}")
    # The text encoders' vocab size comes from the tokenizer: build it (a few small files) in a
    # throwaway folder rather than duplicate its logic.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {name: make_offline_clip_tokenizer(os.path.join(tmp, name), **spec[name])
                      for name in ("tokenizer", "tokenizer_2") if name in spec}
    factories = dict(_component_factories(spec, tokenizers))
    with torch.device("meta"):
        model = factories[component]()
    return sum(p.numel() for p in model.parameters())


def build_pipeline(preset: str, output_dir: str, seed: int = 0, dtype: str = "float32",
                   overwrite: bool = False) -> str:
    """Write the random-weight pipeline ``preset`` to ``output_dir`` and return ``output_dir``.

    Components are built one at a time, saved, then moved to the meta device to free their
    memory, so the peak is one model (matters for the real-size presets: SDXL's fp32 UNet alone
    is 10 GB). ``model_index.json`` is written last by the pipeline class itself, from those
    (now weightless) modules, so it is exactly what ``save_pretrained`` would have written.

    Refuses a non-empty ``output_dir`` unless ``overwrite`` (files are then overwritten in place;
    nothing is deleted).
    """
    spec = get_preset(preset)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"output_dir {output_dir!r} is not empty (pass overwrite=True / --overwrite)")
    os.makedirs(output_dir, exist_ok=True)

    components = {}
    for name in ("tokenizer", "tokenizer_2"):
        if name in spec:
            components[name] = make_offline_clip_tokenizer(os.path.join(output_dir, name), **spec[name])

    # One seed, then a fixed construction order: weights depend on (preset, seed) only. fork_rng
    # leaves the caller's global RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, factory in _component_factories(spec, components):
            model = factory().eval()
            if DTYPES[dtype] != torch.float32:  # a no-op cast to fp32 only triggers a diffusers warning
                model = model.to(DTYPES[dtype])
            model.save_pretrained(os.path.join(output_dir, name))
            components[name] = model.to("meta")

    components["scheduler"] = make_scheduler(spec)
    components["scheduler"].save_pretrained(os.path.join(output_dir, "scheduler"))

    pipeline_cls = PIPELINE_CLASSES[spec["pipeline"]]
    if pipeline_cls is StableDiffusionPipeline:
        # No safety checker / feature extractor: nothing to download, and the flag tells
        # from_pretrained not to expect them.
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    else:
        extra = {"add_watermarker": False}
    pipeline = pipeline_cls(**components, **extra)
    pipeline.save_config(output_dir)  # model_index.json
    return output_dir


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Write a random-weight diffusers pipeline directory (offline).",
        epilog="presets: " + "; ".join(f"{name}: {p['description']}" for name, p in PRESETS.items()),
    )
    parser.add_argument("--preset", required=True, choices=list(PRESETS), help="architecture to build")
    parser.add_argument("--output_dir", required=True, help="directory to write (save_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> identical weights (default 0)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output_dir")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        parser.error(f"--output_dir {args.output_dir} is not empty; pass --overwrite to write into it anyway")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} exists and is not a directory")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    build_pipeline(args.preset, args.output_dir, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.preset} (seed {args.seed}, {args.dtype}) to {args.output_dir} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
