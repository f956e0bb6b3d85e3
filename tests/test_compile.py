"""torch.compile through accelerate, with every script: `accelerate launch --dynamo_backend inductor` makes
accelerate.prepare wrap the trained model(s) in torch.compile. Each run trains 3 steps with a checkpoint and a
validation at step 2, resumes from it, validates, and its saved files must load in diffusers with plain (not
`_orig_mod.`) keys.

Inductor generates and compiles C++ for minutes per script on a 2-core CI machine, so these runs use dynamo's
"eager" backend (ACCELERATE_DYNAMO_BACKEND, which the launcher's flag sets): the same OptimizedModule wrapper,
graph capture, guards and recompilations as inductor, without the code generation. The inductor runs are in
benchmarks/benchmark_compile.py (benchmarks/RESULTS.md). `error_on_recompile` makes any recompilation a failure:
only the trained forward goes through the compiled wrapper (teacher passes, targets and validation use the plain
module), so each run compiles it once."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import run_in_process

pytestmark = pytest.mark.slow

# name: (script, teacher, extra flags): full LCD, BK-SDM's student (its KD feature hooks are traced into the graph)
# and a LoRA (DreamBooth: UNet and text-encoder adapters). Left out for CI time (about a minute each): the SDXL
# script (its LCD region, checkpoint hooks and unwrapping are checked copies of the SD script's; the compiled call
# only adds the SDXL kwargs) and the LCM-LoRA scripts (their compiled forward is the same peft-wrapped UNet call as
# DreamBooth's; teacher and target passes use the plain module, not the compiled wrapper).
RUNS = {
    "lcd_sd": ("train_lcm_distill_sd_wds.py", "tiny-sd", ["--gradient_checkpointing"]),
    "bk_sdm_tiny": ("train_bk_sdm_kd.py", "tiny-sd", ["--unet_config_name", "bk_tiny", "--use_ema"]),
    "dreambooth_lora": ("train_dreambooth_lora.py", "tiny-sd", ["--train_text_encoder", "--rank", "4"]),
}


def run_flags(name, assets, tmp_path):
    script, teacher, extra = RUNS[name]
    teacher = assets[teacher]
    common = ["--output_dir", tmp_path / "out", "--resolution", 64, "--train_batch_size", 1, "--seed", 0,
              "--checkpointing_steps", 2, "--validation_steps", 2, "--report_to", "none"]
    if script == "train_dreambooth_lora.py":
        instance = tmp_path / "instance"
        instance.mkdir()
        for png in sorted(Path(assets["images"]).glob("*.png"))[:2]:
            shutil.copy(png, instance / png.name)
        return script, common + extra + [
            "--pretrained_model_name_or_path", teacher, "--instance_data_dir", instance,
            "--instance_prompt", "a photo of sks circle", "--validation_prompt", "a photo of sks circle",
            "--num_validation_images", 1]
    return script, common + extra + [
        "--pretrained_teacher_model", teacher, "--train_shards_path_or_url", assets["shards"],
        "--shuffle_buffer_size", 4, "--dataloader_num_workers", 0, "--validation_prompts", "a red circle"]


def compiled_run(script, flags):
    """One in-process run with the trained model compiled by accelerate; returns (output, graphs compiled)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no graph cached by an earlier run: each run compiles its own, once
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation fails the run
        result = run_in_process(script, flags)
    return result.stdout, counters["stats"]["unique_graphs"]


def assert_plain_keys(output_dir):
    """Every weight file written (outputs and checkpoints) has the module's own keys, no compile-wrapper prefix."""
    files = list(Path(output_dir).rglob("*.safetensors"))
    assert files
    for path in files:
        with safe_open(str(path), "pt") as f:
            wrapped = [key for key in f.keys() if "_orig_mod" in key]
        assert not wrapped, f"{path}: {wrapped[:2]}"


def assert_lora_loads(pipeline_class, base, output_dir, components=("unet",)):
    """diffusers' load_lora_weights puts every LoRA tensor of the file into the named components."""
    pipe = pipeline_class.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    with safe_open(str(Path(output_dir) / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    pipe.load_lora_weights(str(output_dir))
    for component in components:
        in_file = [key for key in keys if key.startswith(f"{component}.") and key.endswith("lora_A.weight")]
        loaded = [name for name, _ in getattr(pipe, component).named_parameters() if re.search(r"lora_A\.", name)]
        assert in_file and len(loaded) == len(in_file), (component, len(loaded), len(in_file))


@pytest.mark.parametrize("name", list(RUNS))
def test_compiled_run_checkpoint_resume_and_outputs(name, assets, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")
    script, flags = run_flags(name, assets, tmp_path)
    out = tmp_path / "out"
    # a step after the checkpoint and validation at step 2: what they do to the models must not recompile
    log, graphs = compiled_run(script, flags + ["--max_train_steps", 3])
    assert graphs >= 1, "accelerate did not compile the trained model"  # dreambooth: UNet and text encoder
    assert (out / "checkpoint-2").is_dir()
    log, graphs = compiled_run(script, flags + ["--max_train_steps", 4, "--resume_from_checkpoint", "latest"])
    assert "resuming from" in log and "at step 2" in log and graphs >= 1
    assert_plain_keys(out)
    assert list((out / "validation").glob("*.png"))  # validation through the unwrapped module, no recompile

    teacher = assets["tiny-sd"]
    if name == "lcd_sd":
        for folder in ("unet", "unet_target", "checkpoint-2/unet"):
            UNet2DConditionModel.from_pretrained(out / folder)
    elif name == "bk_sdm_tiny":
        pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
        teacher_blocks = UNet2DConditionModel.load_config(teacher, subfolder="unet")["down_block_types"]
        assert len(pipe.unet.config.down_block_types) == len(teacher_blocks) - 1  # the bk_tiny student
        UNet2DConditionModel.from_pretrained(out / "unet_ema")
    else:  # dreambooth_lora
        assert_lora_loads(StableDiffusionPipeline, teacher, out, ("unet", "text_encoder"))
