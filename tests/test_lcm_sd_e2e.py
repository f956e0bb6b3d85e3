"""train_lcm_distill_sd_wds.py end to end, as a user runs it: `accelerate launch` on a tiny random pipeline
and local shards, then the saved UNet loaded into the real diffusers pipeline.

The main run goes through `accelerate launch`; its resume runs in process (see conftest), and is compared
bit for bit with the launched run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_in_process, run_script

SCRIPT = "train_lcm_distill_sd_wds.py"
pytestmark = pytest.mark.slow


def common_flags(teacher, shards, output_dir):
    return [
        "--pretrained_teacher_model", teacher,
        "--train_shards_path_or_url", shards,
        "--output_dir", output_dir,
        "--resolution", "64",
        "--train_batch_size", "2",
        "--learning_rate", "1e-4",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--shuffle_buffer_size", "4",
        "--validation_prompts", "a red circle",
    ]


def unet_weights(path):
    return load_file(str(Path(path) / "diffusion_pytorch_model.safetensors"))


def lcm_image(teacher, unet_dir, steps=4, guidance_scale=8.0):
    """Generate with the saved student exactly as the README tells users to."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    pipe = StableDiffusionPipeline.from_pretrained(teacher, unet=unet, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance_scale, height=64, width=64,
                generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def main_run(assets, tmp_path_factory):
    """4 optimiser steps with accumulation, 2 loader workers, a corrupt shard, checkpoints every step (limit 2)."""
    output_dir = tmp_path_factory.mktemp("lcm_sd") / "run"
    shards = f"{assets['shards']}::{assets['corrupt_shard']}"
    flags = common_flags(assets["tiny-sd"], shards, output_dir) + [
        "--gradient_accumulation_steps", "2",
        "--dataloader_num_workers", "2",
        "--max_train_steps", "4",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
        "--validation_steps", "0",
        "--proportion_empty_prompts", "0.5",
        "--report_to", "tensorboard",
    ]
    result = run_script(SCRIPT, flags)
    return {"output_dir": output_dir, "flags": flags, "log": result.stdout}


def test_outputs_rotation_card_and_logs(main_run, assets):
    out = main_run["output_dir"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    for checkpoint in ("checkpoint-3", "checkpoint-4"):
        state = json.loads((out / checkpoint / "training_state.json").read_text())
        assert state["global_step"] == int(checkpoint.split("-")[1])
        assert (out / checkpoint / "unet" / "config.json").is_file()
        assert (out / checkpoint / "unet_target" / "config.json").is_file()
    # the corrupt image was skipped and counted, and training went on
    assert state["n_corrupt"] >= 1
    # validation grids: 1 prompt x (1, 2, 4, 8) steps, for both networks
    for name in ("unet", "unet_target"):
        grid = Image.open(out / "validation" / f"{name}_step_000004.png")
        assert grid.size == (4 * 64, 64)
    card = (out / "README.md").read_text()
    assert "base_model: " + str(assets["tiny-sd"]) in card
    assert "LCMScheduler" in card and "validation/unet_target_step_000004.png" in card
    assert "| mixed precision | no (fp32) |" in card  # the precision in effect, though the flag was not given
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    assert "loss=" in main_run["log"] and "samples_s=" in main_run["log"]
    # no notices of libraries the run does not use: transformers' torchvision fallback, DeepSpeed's accelerator line
    assert "torchvision" not in main_run["log"] and "ds_accelerator" not in main_run["log"]
    assert "Setting accelerator to CPU" not in main_run["log"]


def test_student_starts_at_teacher_and_learns(main_run, assets):
    teacher = unet_weights(Path(assets["tiny-sd"]) / "unet")
    online = unet_weights(main_run["output_dir"] / "unet")
    target = unet_weights(main_run["output_dir"] / "unet_target")
    assert set(online) == set(teacher) | {"time_embedding.cond_proj.weight"}
    moved = [k for k in teacher if not torch.equal(online[k], teacher[k])]
    assert moved, "no student weight changed in 4 steps"
    # EMA target lies between teacher and online student (mu = 0.95 over 4 steps)
    key = moved[0]
    assert not torch.equal(target[key], online[key]) and not torch.equal(target[key], teacher[key])
    config = json.loads((main_run["output_dir"] / "unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] == 256


def test_saved_unet_generates_with_lcm_scheduler(main_run, assets):
    for name in ("unet", "unet_target"):
        images = lcm_image(assets["tiny-sd"], str(main_run["output_dir"] / name))
        assert images.shape == (1, 64, 64, 3)
        assert np.isfinite(images).all() and images.std() > 0


def test_resume_from_latest_equals_uninterrupted_run(main_run, tmp_path):
    """Resume from checkpoint-3 of the same run: the final online and EMA weights must be bit-identical."""
    resumed = tmp_path / "resumed"
    original = main_run["output_dir"]
    dropped = {"checkpoint-4", "unet", "unet_target", "validation", "logs", "README.md"}  # the run "died" after step 3
    shutil.copytree(original, resumed,
                    ignore=lambda d, names: [n for n in names if Path(d) == original and n in dropped])
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (resumed / "checkpoint-3" / "unet_target" / "config.json").is_file()
    flags = [str(resumed) if str(f) == str(original) else str(f) for f in main_run["flags"]]
    assert str(resumed) in flags
    flags += ["--resume_from_checkpoint", "latest"]
    result = run_in_process(SCRIPT, flags)
    assert "resuming from" in result.stdout and "checkpoint-3" in result.stdout
    for name in ("unet", "unet_target"):
        expected = unet_weights(main_run["output_dir"] / name)
        got = unet_weights(resumed / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key} differs after resume"
