"""Every script in both mixed-precision regimes users train in, and the defects each regime exposed.

`--mixed_precision fp16` on a CPU gives no autocast and no grad scaler (accelerate sets native_amp=False): the
regime DeepSpeed runs in for fp16 and bf16, where a frozen fp16 network fed fp32 inputs used to crash.
`bf16` on a CPU runs under autocast, the CUDA regime. Each run trains 2 steps and validates; what it saved must
load into the real diffusers pipeline and generate a finite, non-blank image. Runs are in process (see conftest)
so that a test can watch the networks' inputs through the scripts' own functions."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, build_pipeline, make_toy_dataset, run_in_process

pytestmark = pytest.mark.slow
PROMPT = "a red circle"
NUM_DDIM_TIMESTEPS, TIMESTEP_SCALING = 20, 5.0  # not LCMScheduler's defaults (50, 10): the saved config must carry them
KINDS = ["lcd", "lcm_lora", "sdxl", "sdxl_lora", "bk", "dreambooth", "dreambooth_sdxl"]
SCRIPTS = {"lcd": "train_lcm_distill_sd_wds.py", "lcm_lora": "train_lcm_distill_lora_sd_wds.py",
           "sdxl": "train_lcm_distill_sdxl_wds.py", "sdxl_lora": "train_lcm_distill_sdxl_wds.py",
           "bk": "train_bk_sdm_kd.py", "dreambooth": "train_dreambooth_lora.py",
           "dreambooth_sdxl": "train_dreambooth_lora.py"}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_pipeline("tiny-sdxl", str(tmp_path_factory.mktemp("xl") / "tiny-sdxl"), seed=0)


@pytest.fixture(scope="module")
def tiny_sdxl_no_zeros(tiny_sdxl, tmp_path_factory):
    """The same SDXL-architecture teacher, but its pipeline encodes "" as the unconditional prompt."""
    copy = tmp_path_factory.mktemp("xl_nozeros") / "tiny-sdxl"
    shutil.copytree(tiny_sdxl, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (copy / "model_index.json").write_text(json.dumps(index))
    return str(copy)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    make_toy_dataset(str(folder), num_images=4, seed=3, captions="txt")
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


def flags_for(kind, teacher, assets, instance_dir, output_dir):
    common = ["--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
              "--max_train_steps", "2", "--report_to", "none"]
    streamed = ["--train_shards_path_or_url", assets["shards"], "--shuffle_buffer_size", "4",
                "--validation_prompts", PROMPT, "--dataloader_num_workers", "1"]
    lcm = ["--num_ddim_timesteps", str(NUM_DDIM_TIMESTEPS), "--timestep_scaling_factor", str(TIMESTEP_SCALING)]
    flags = {
        "lcd": ["--pretrained_teacher_model", teacher, "--learning_rate", "1e-4", *lcm],
        "lcm_lora": ["--pretrained_teacher_model", teacher, "--lora_rank", "4", "--lora_dropout", "0.25", *lcm],
        "sdxl": ["--pretrained_teacher_model", teacher, "--validation_steps", "0", *lcm],
        "sdxl_lora": ["--pretrained_teacher_model", teacher, "--validation_steps", "0", "--use_lora", "--lora_rank",
                      "4", "--lora_dropout", "0.25", *lcm],
        "bk": ["--pretrained_teacher_model", teacher, "--num_validation_inference_steps", "2"],
        "dreambooth": ["--pretrained_model_name_or_path", teacher, "--instance_data_dir", str(instance_dir),
                       "--instance_prompt", "a photo of sks circle", "--rank", "4", "--train_text_encoder",
                       "--validation_prompt", PROMPT, "--num_validation_images", "1"],
    }[kind.removesuffix("_sdxl")]
    return common + (streamed if not kind.startswith("dreambooth") else []) + flags


class NetworkWatch:
    """Wraps a script's `denoiser_forward` (and, for LCD, its teacher step) to record what the networks saw:
    the teacher's weight dtype, and whether a no-grad pass of the trained network is deterministic (LoRA dropout
    must be off in the consistency target)."""

    def __init__(self, module, monkeypatch):
        self.no_grad_passes, self.random_no_grad_passes, self.teacher_dtypes, self.unconds = 0, 0, set(), []
        original = module.denoiser_forward

        def watched_denoiser_forward(unet, sample, timesteps, call=None, **conditioning):
            output = original(unet, sample, timesteps, call, **conditioning)
            if not torch.is_grad_enabled():
                self.no_grad_passes += 1
                if not torch.equal(output, original(unet, sample, timesteps, call, **conditioning)):
                    self.random_no_grad_passes += 1
            return output

        monkeypatch.setattr(module, "denoiser_forward", watched_denoiser_forward)
        if hasattr(module, "teacher_guided_ddim_step"):
            original_step = module.teacher_guided_ddim_step

            def watched_step(teacher_unet, noisy_latents, timesteps, index, w, cond, uncond, *args, **kwargs):
                self.teacher_dtypes.add(next(teacher_unet.parameters()).dtype)
                self.unconds.append(uncond)
                return original_step(teacher_unet, noisy_latents, timesteps, index, w, cond, uncond, *args, **kwargs)

            monkeypatch.setattr(module, "teacher_guided_ddim_step", watched_step)


def vae_decode_watch(monkeypatch):
    """Records the dtype of every VAE decode's output (validation must decode in the VAE's own fp32)."""
    from diffusers import AutoencoderKL

    dtypes = []
    original = AutoencoderKL.decode

    def decode(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        dtypes.append((output[0] if isinstance(output, tuple) else output.sample).dtype)
        return output

    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    return dtypes


def generate_from_outputs(kind, teacher, out):
    """Load what the run saved the way its README says, and generate one 64 px image (fp32, CPU)."""
    from diffusers import (DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    steps, guidance = 2, 1.0
    if kind == "bk":
        pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    elif kind in ("lcd", "sdxl"):
        unet = UNet2DConditionModel.from_pretrained(out / "unet_target")
        pipe = DiffusionPipeline.from_pretrained(teacher, unet=unet)
        guidance = 8.0
    else:
        pipe = DiffusionPipeline.from_pretrained(teacher)
        pipe.load_lora_weights(str(out))
    if kind != "bk" and not kind.startswith("dreambooth"):
        pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StableDiffusionXLPipeline) == ("sdxl" in kind)
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    return image


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_trains_saves_and_generates_in_precision(kind, precision, assets, tiny_sdxl, tiny_sdxl_no_zeros,
                                                 instance_dir, tmp_path, monkeypatch):
    module = pytest.importorskip(Path(SCRIPTS[kind]).stem)
    # the bf16 SDXL runs use a teacher whose pipeline does not zero the empty prompt
    teacher = tiny_sdxl if "sdxl" in kind else assets["tiny-sd"]
    if "sdxl" in kind and precision == "bf16":
        teacher = tiny_sdxl_no_zeros
    watch = NetworkWatch(module, monkeypatch)
    decoded_dtypes = vae_decode_watch(monkeypatch)
    out = tmp_path / "out"
    run_in_process(SCRIPTS[kind],
                   flags_for(kind, teacher, assets, instance_dir, out) + ["--mixed_precision", precision])

    # what was saved: finite, and validation grids that are not blank
    saved = [p for p in out.rglob("*.safetensors") if "checkpoint-" not in str(p)]
    assert saved
    for path in saved:
        assert all(torch.isfinite(t.float()).all() for t in load_file(path).values()), path
    grids = list((out / "validation").glob("*.png"))
    assert grids and all(np.asarray(Image.open(g)).std() > 1.0 for g in grids), grids
    image = generate_from_outputs(kind, teacher, out)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01

    if "sdxl" in kind:  # the fp32 SDXL VAE decodes in fp32, not in the autocast dtype (it overflows in fp16)
        assert decoded_dtypes and set(decoded_dtypes) == {torch.float32}, decoded_dtypes
    if kind in ("lcd", "lcm_lora", "sdxl", "sdxl_lora", "bk"):  # teacher and LCM target passes are deterministic:
        assert watch.no_grad_passes > 0 and watch.random_no_grad_passes == 0  # LoRA dropout is off in the target
    if kind in ("lcd", "sdxl"):  # the frozen teacher is stored in the mixed-precision dtype by default
        assert watch.teacher_dtypes == {torch.float16 if precision == "fp16" else torch.bfloat16}
    if kind.startswith("sdxl"):  # zeros for SDXL base; the encoded "" where the teacher pipeline says so
        zero = [float(u["encoder_hidden_states"].abs().max()) == 0.0 for u in watch.unconds]
        assert set(zero) == {precision == "fp16"}
    if kind in ("lcd", "lcm_lora", "sdxl", "sdxl_lora"):  # the LCMScheduler the student was trained for
        config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert config["_class_name"] == "LCMScheduler"
        assert (config["original_inference_steps"], config["timestep_scaling"]) == (NUM_DDIM_TIMESTEPS,
                                                                                    TIMESTEP_SCALING)
        assert 'LCMScheduler.from_pretrained(' in (out / "README.md").read_text()


def test_lcm_generate_uses_the_saved_scheduler(assets, instance_dir, tmp_path, capsys):
    """tools/lcm_generate.py finds OUTPUT/scheduler next to OUTPUT/unet_target."""
    sys.path.insert(0, str(REPO / "tools"))
    import lcm_generate
    from diffusers import LCMScheduler

    out = tmp_path / "out"
    run_in_process(SCRIPTS["lcd"], flags_for("lcd", assets["tiny-sd"], assets, instance_dir, out) +
                   ["--max_train_steps", "1"])
    calls = []
    original = LCMScheduler.from_pretrained
    LCMScheduler.from_pretrained = classmethod(lambda cls, path, **kw: calls.append(str(path)) or original(path, **kw))
    try:
        lcm_generate.main(["--teacher", assets["tiny-sd"], "--unet", str(out / "unet_target"), "--steps", "2",
                           "--resolution", "64", "--output", str(tmp_path / "x.png"), "--device", "cpu"])
    finally:
        LCMScheduler.from_pretrained = original
    assert calls == [str(out / "scheduler")]
    assert Image.open(tmp_path / "x.png").size == (64, 64)
