"""tools/lcm_generate.py (issue 21): a LoRA output given as --unet, a training output's root, --steps 0 or more
steps than the student's DDIM grid are one line each before any model loads; --lora loads an LCM-LoRA output."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_lcm_distill_lora_sd_wds as lcm_lora
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import lcm_generate  # noqa: E402


def generate_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        lcm_generate.parse_args([str(a) for a in argv])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def lcm_lora_output(assets, tmp_path_factory):
    """An LCM-LoRA output folder as the LoRA script writes it (adapter with non-zero up weights, so it shows)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    output = tmp_path_factory.mktemp("lcm-lora") / "out"
    output.mkdir()
    lcm_lora.save_lora_files(unet, str(output))
    return output


def test_lcm_generate_argument_checks(assets, lcm_lora_output, tmp_path, capsys):
    teacher = assets["tiny-sd"]
    line = generate_error(["--teacher", teacher, "--unet", lcm_lora_output], capsys)
    assert line.endswith(f"--unet: {lcm_lora_output} is a LoRA (pytorch_lora_weights.safetensors), not a UNet "
                         f"folder: pass it as --lora {lcm_lora_output}")
    run = tmp_path / "run"
    (run / "unet_target").mkdir(parents=True)
    (run / "unet_target" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    assert generate_error(["--teacher", teacher, "--unet", run], capsys).endswith(
        f"--unet: {run} has no UNet config.json; pass --unet {run / 'unet_target'}")
    assert generate_error(["--teacher", teacher, "--lora", Path(teacher) / "unet"], capsys).endswith(
        f"--lora: {Path(teacher) / 'unet'} holds a UNet2DConditionModel folder: pass a full student as --unet "
        f"{Path(teacher) / 'unet'}")
    assert generate_error(["--teacher", teacher, "--unet", Path(teacher) / "unet", "--steps", "0"],
                          capsys).endswith("argument --steps: must be >= 1, got 0")
    (run / "scheduler").mkdir()
    (run / "scheduler" / "scheduler_config.json").write_text('{"original_inference_steps": 50}')
    assert generate_error(["--teacher", teacher, "--unet", run / "unet_target", "--steps", "200"], capsys).endswith(
        "--steps 200 exceeds the 50-point DDIM grid the student was distilled on (original_inference_steps of its "
        "scheduler); use 1-50 (LCMs are made for 1-8)")
    assert generate_error(["--teacher", teacher], capsys).endswith(
        "give exactly one of --unet (a full LCD student) and --lora (an LCM-LoRA)")


def test_lcm_generate_loads_an_lcm_lora(assets, lcm_lora_output, tmp_path, capsys):
    """Before: --unet OUTPUT of a LoRA run failed in from_pretrained (no config.json); now --lora loads it onto the
    teacher (and samples with guidance 1, as LCM-LoRAs do)."""
    common = ["--teacher", assets["tiny-sd"], "--steps", "1", "--resolution", "64", "--device", "cpu"]
    lcm_generate.main(common + ["--lora", str(lcm_lora_output), "--output", str(tmp_path / "lora.png")])
    assert "wrote" in capsys.readouterr().out
    lcm_generate.main(common + ["--unet", os.path.join(assets["tiny-sd"], "unet"), "--guidance_scale", "1.0",
                                "--output", str(tmp_path / "base.png")])
    lora, base = (np.asarray(Image.open(tmp_path / name)) for name in ("lora.png", "base.png"))
    assert lora.shape == (64, 64, 3) and not np.array_equal(lora, base)  # the adapter changed the image


def test_lcm_generate_samples_a_pcm_student_with_its_tcd_scheduler(assets, tmp_path, capsys):
    """A PCM training saves a TCDScheduler; before, lcm_generate loaded it as an LCMScheduler and sampled a
    deterministic student with LCM's re-noising without a word. Now the saved class is used, with eta 0: the image
    equals the diffusers pipeline's own TCD sampling of the same UNet and noise."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    teacher = assets["tiny-sd"]
    run = tmp_path / "pcm"
    run.mkdir()
    (run / "unet_target").symlink_to(Path(teacher) / "unet", target_is_directory=True)
    tcd = TCDScheduler.from_pretrained(teacher, subfolder="scheduler", original_inference_steps=8)
    tcd.save_pretrained(run / "scheduler")
    lcm_generate.main(["--teacher", teacher, "--unet", str(run / "unet_target"), "--steps", "2", "--resolution", "64",
                       "--device", "cpu", "--seed", "3", "--output", str(tmp_path / "pcm.png")])
    assert "2 TCD (eta 0, deterministic) steps" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = TCDScheduler.from_pretrained(run / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=2, guidance_scale=4.0, height=64, width=64, eta=0.0,
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pcm.png")), np.asarray(expected))
