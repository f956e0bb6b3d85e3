"""train_lcm_distill_sdxl_wds.py on a tiny random SDXL pipeline: micro-conditioning and text-conditioning units,
the full mode end to end through `accelerate launch`, the LoRA mode (and its resume) in process (see conftest),
and the saved results loaded into `StableDiffusionXLPipeline` with `LCMScheduler`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_lcm_distill_sdxl_wds as lcm_xl
from conftest import run_in_process, run_script
from make_random_pipeline import build_pipeline

SCRIPT = "train_lcm_distill_sdxl_wds.py"
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_pipeline("tiny-sdxl", str(tmp_path_factory.mktemp("xl") / "tiny-sdxl"), seed=0)


def xl_flags(teacher, shards, output_dir):
    return [
        "--pretrained_teacher_model", teacher,
        "--train_shards_path_or_url", shards,
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--train_batch_size", "2",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--shuffle_buffer_size", "4",
        "--dataloader_num_workers", "1",
        "--validation_prompts", PROMPT,
        "--validation_steps", "0",
        "--report_to", "none",
    ]


def xl_pipeline(teacher, unet_dir=None):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    extra = {"unet": UNet2DConditionModel.from_pretrained(unet_dir)} if unet_dir else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher, **extra)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, guidance_scale):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=guidance_scale, height=64, width=64,
                generator=generator, output_type="np").images[0]


# ---- units ------------------------------------------------------------------------------------------------


def test_time_ids_are_height_first_and_crop_is_the_applied_crop():
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))  # h 200, w 300
    transform = lcm_xl.ImageTransform(64, interpolation="nearest")
    import random

    pixels, original_size, (top, left) = transform(source, random.Random(3))
    assert original_size == (200, 300)
    resized = source.resize((96, 64), resample=Image.Resampling.NEAREST)  # shorter side 200 -> 64
    assert top == 0 and 0 <= left <= 96 - 64
    expected = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), expected, atol=1e-6)

    time_ids = lcm_xl.compute_time_ids(torch.tensor([original_size]), torch.tensor([(top, left)]), 64)
    assert time_ids.tolist() == [[200.0, 300.0, top, left, 64.0, 64.0]]
    fixed = lcm_xl.compute_time_ids(torch.tensor([original_size]), torch.tensor([(top, left)]), 64, True)
    assert fixed.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]


def test_original_size_comes_from_the_json_when_present():
    assert lcm_xl.original_size_from_metadata({"original_width": 300, "original_height": 200}) == (200, 300)
    assert lcm_xl.original_size_from_metadata({"width": "640", "height": "480"}) == (480, 640)
    assert lcm_xl.original_size_from_metadata({"width": 640}) is None
    assert lcm_xl.original_size_from_metadata({}) is None


def test_text_conditioning_and_uncond_shapes_follow_the_model(tiny_sdxl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")]
    prompt_embeds, pooled = lcm_xl.encode_prompts_sdxl(encoders, tokenizers, ["a", "b c"])
    width = encoders[0].config.hidden_size + encoders[1].config.hidden_size
    assert prompt_embeds.shape == (2, 77, width) and pooled.shape == (2, encoders[1].config.projection_dim)
    cond = lcm_xl.unet_conditioning(prompt_embeds, pooled, torch.zeros(2, 6))
    uncond = lcm_xl.unconditional_conditioning(cond)
    assert uncond["encoder_hidden_states"].shape == prompt_embeds.shape
    assert uncond["added_cond_kwargs"]["text_embeds"].shape == pooled.shape
    assert not uncond["encoder_hidden_states"].any() and not uncond["added_cond_kwargs"]["text_embeds"].any()


# ---- full mode, end to end through accelerate launch --------------------------------------------------------


def test_full_mode_end_to_end(tiny_sdxl, assets, tmp_path):
    out = tmp_path / "full"
    flags = xl_flags(tiny_sdxl, assets["shards"], out) + [
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
        "--learning_rate", "1e-4",
    ]
    result = run_script(SCRIPT, flags)
    assert "full UNet" in result.stdout and "loss=" in result.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "unet_target" / "config.json").is_file()
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] == 256 and config["addition_embed_type"] == "text_time"
    teacher = load_file(Path(tiny_sdxl) / "unet" / "diffusion_pytorch_model.safetensors")
    online = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(online[k], teacher[k]) for k in teacher), "the student did not move"
    grid = Image.open(out / "validation" / "unet_target_step_000002.png")
    assert grid.size == (4 * 64, 64)
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and 'subfolder="unet_target"' in card and "[3.0, 15.0]" in card
    image = generate(xl_pipeline(tiny_sdxl, out / "unet_target"), guidance_scale=8.0)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


# ---- LoRA mode, in process -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_xl_run(tiny_sdxl, assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("xl_lora") / "run"
    flags = xl_flags(tiny_sdxl, assets["shards"], out) + [
        "--use_lora", "--lora_rank", "4", "--lora_alpha", "2", "--save_precision", "fp32",
        "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
        "--learning_rate", "1e-3",
    ]
    result = run_in_process(SCRIPT, flags)
    return {"output_dir": out, "flags": flags, "log": result.stdout}


def test_lora_mode_outputs_and_loading(lora_xl_run, tiny_sdxl):
    out = lora_xl_run["output_dir"]
    assert "LoRA" in lora_xl_run["log"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / "unet").exists()
    assert not list((out / "checkpoint-3").rglob("diffusion_pytorch_model*"))
    assert "load_lora_weights" in (out / "README.md").read_text()
    # the default consistency target: an EMA of the adapter, kept in checkpoints and saved as an adapter folder
    assert "EMA of the adapter, decay 0.95" in (out / "README.md").read_text()
    assert (out / "checkpoint-3" / lcm_xl.EMA_ADAPTER_NAME).is_file()
    ema_pipe = xl_pipeline(tiny_sdxl)
    ema_pipe.load_lora_weights(str(out / "ema_target"))
    pipe = xl_pipeline(tiny_sdxl)
    pipe.load_lora_weights(str(out))
    image = generate(pipe, guidance_scale=1.0)
    grid = np.asarray(Image.open(out / "validation" / "lora_step_000003.png")).astype(np.int16)
    assert np.abs(np.round(image * 255).astype(np.int16) - grid[:, 128:192]).max() <= 1, \
        "the loaded LoRA does not reproduce the in-training student"
    kohya_pipe = xl_pipeline(tiny_sdxl)
    kohya_pipe.load_lora_weights(str(out), weight_name=lcm_xl.KOHYA_WEIGHT_NAME)
    np.testing.assert_allclose(generate(kohya_pipe, guidance_scale=1.0), image, atol=1e-4)  # float rounding
    kohya = load_file(out / lcm_xl.KOHYA_WEIGHT_NAME)
    assert {t.item() for k, t in kohya.items() if k.endswith(".alpha")} == {2.0}


def test_lora_mode_resume_equals_uninterrupted_run(lora_xl_run, tmp_path):
    original = lora_xl_run["output_dir"]
    resumed = tmp_path / "resumed"
    shutil.copytree(original / "checkpoint-2", resumed / "checkpoint-2")
    flags = [str(resumed) if str(f) == str(original) else str(f) for f in lora_xl_run["flags"]]
    result = run_in_process(SCRIPT, flags + ["--resume_from_checkpoint", "latest"])
    assert "resuming from" in result.stdout
    for name in (lcm_xl.LORA_WEIGHT_NAME, f"ema_target/{lcm_xl.LORA_WEIGHT_NAME}"):
        expected, got = load_file(original / name), load_file(resumed / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"{name} differs after resume"


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ema_decay", "none"], "--ema_decay none applies only with --use_lora"),
        (["--lora_rank", "8"], "--lora_rank applies only with --use_lora"),
        (["--use_lora", "--lora_target_modules", "qkv"], "unknown module kind 'qkv'"),
        (["--use_lora", "--lora_rank", "0"], "--lora_rank: must be >= 1"),
        (["--w_min", "20"], "--w_min (20.0) must not exceed --w_max (15.0)"),
    ],
)
def test_bad_flags_are_one_line(capsys, tiny_sdxl, assets, tmp_path, extra, message):
    with pytest.raises(SystemExit) as excinfo:
        lcm_xl.parse_args(xl_flags(tiny_sdxl, assets["shards"], tmp_path / "o") + ["--max_train_steps", "1"] + extra)
    assert excinfo.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_defaults_per_mode(tiny_sdxl, assets, tmp_path):
    base = xl_flags(tiny_sdxl, assets["shards"], tmp_path / "o") + ["--max_train_steps", "1"]
    full = lcm_xl.parse_args(base)
    assert (full.learning_rate, full.ema_decay, full.w_min, full.validation_guidance_scale) == (1e-6, 0.95, 3.0, 8.0)
    assert full.resolution == 64 and lcm_xl.parse_args(base[:6] + base[8:]).resolution == 1024
    lora = lcm_xl.parse_args(base + ["--use_lora"])
    lora_defaults = (lora.learning_rate, lora.lora_rank, lora.lora_alpha, lora.validation_guidance_scale)
    assert lora_defaults == (1e-4, 64, 64.0, 1.0)
    assert lora.lora_target_modules == list(lcm_xl.LORA_TARGET_KINDS) and lora.save_precision == "fp16"
    assert lora.ema_decay is None  # resolved when the run knows its distributed setup: the tests of the LoRA script
    assert lcm_xl.parse_args(base + ["--use_lora", "--ema_decay", "0.9"]).ema_decay == 0.9


def test_size_filter_rejecting_everything_is_one_clear_error(tiny_sdxl, assets, tmp_path):
    flags = xl_flags(tiny_sdxl, assets["shards"], tmp_path / "o") + ["--max_train_steps", "1",
                                                                     "--min_image_size", "100000"]
    result = run_in_process(SCRIPT, flags, check=False)
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stdout, last
    assert not (tmp_path / "o" / "unet").exists()


def test_pcm_lora_mode_saves_and_validates_with_its_phase_sampler(tiny_sdxl, assets, tmp_path):
    """--num_phases in the SDXL script (LoRA mode: the teacher is the UNet with its adapters off): the TCD
    scheduler is saved, the validation grid shows the step counts on phase edges (1, 2), the card says how to
    sample, and the adapter samples deterministically with it."""
    from diffusers import StableDiffusionXLPipeline, TCDScheduler

    out = tmp_path / "pcm"
    flags = xl_flags(tiny_sdxl, assets["shards"], out) + [
        "--use_lora", "--lora_rank", "4", "--max_train_steps", "2", "--learning_rate", "1e-3",
        "--num_ddim_timesteps", "10", "--num_phases", "2"]
    run_in_process(SCRIPT, flags)
    scheduler = TCDScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.original_inference_steps == 10
    assert Image.open(out / "validation" / "lora_step_000002.png").size == (2 * 64, 64)
    card = (out / "README.md").read_text()
    assert "PCM-LoRA" in card and "TCDScheduler" in card and "eta=0.0" in card and "PCM, 2 phases" in card
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(out)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    size = 64 // pipe.vae_scale_factor
    latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    images = [pipe(PROMPT, latents=latents, num_inference_steps=2, eta=0.0, guidance_scale=1.0, height=64, width=64,
                   generator=torch.Generator().manual_seed(seed), output_type="np").images[0] for seed in (0, 1)]
    assert np.isfinite(images[0]).all() and np.array_equal(images[0], images[1])  # deterministic: no re-noising
