"""--use_8bit_adam with the real bitsandbytes AdamW8bit (0.50.2 steps CPU parameters): the full LCD script and
DreamBooth LoRA train with it, its uint8 state goes into the checkpoint, comes back equal on resume, and the
resumed run ends bit-identical to the uninterrupted one. Runs are in process (see conftest), so the test can
hold on to the optimiser the script built."""

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_in_process
from make_toy_dataset import make_toy_dataset

bnb = pytest.importorskip("bitsandbytes")

import train_dreambooth_lora as db  # noqa: E402
import train_lcm_distill_sd_wds as lcd  # noqa: E402

pytestmark = pytest.mark.slow


def spy_on_optimizer(module, monkeypatch):
    """Record every optimiser the script builds, and a copy of its state right after each load_state_dict."""
    record = {"optimizers": [], "loaded_state": []}
    real_make_optimizer = module.make_optimizer

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        real_load = optimizer.load_state_dict

        def load_state_dict(state_dict):
            real_load(state_dict)
            record["loaded_state"].append(copy.deepcopy(list(optimizer.state.values())))

        optimizer.load_state_dict = load_state_dict
        record["optimizers"].append(optimizer)
        return optimizer

    monkeypatch.setattr(module, "make_optimizer", make_optimizer)
    return record


def uint8_states(states):
    """The 8-bit moment buffers (bitsandbytes keys state1/state2) among the per-parameter states."""
    return [s for s in states if isinstance(s.get("state1"), torch.Tensor) and s["state1"].dtype == torch.uint8]


def checkpoint_optimizer_state(checkpoint):
    """Per-parameter optimiser states accelerate wrote into a checkpoint folder, in parameter order. bitsandbytes'
    state_dict nests its quantisation buffers under one key (to hide them from FSDP): flattened back here."""
    saved = torch.load(Path(checkpoint) / "optimizer.bin", weights_only=True)["state"]
    states = []
    for index in sorted(saved):
        state = dict(saved[index])
        state.update(state.pop("__bnb_optimizer_quant_state__", {}))
        states.append(state)
    return states


def assert_same_state(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_make_optimizer_builds_the_real_adamw8bit_with_the_flags():
    args = SimpleNamespace(optimizer="adamw8bit", use_8bit_adam=True, adam_beta1=0.9, adam_beta2=0.99, adam_weight_decay=0.01,
                           adam_epsilon=1e-8)
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))
    optimizer = lcd.make_optimizer(args, [big, small], 3e-5)
    assert type(optimizer) is bnb.optim.AdamW8bit
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-5, (0.9, 0.99), 0.01, 1e-08)
    before = big.detach().clone()
    (big.square().sum() + small.sum()).backward()
    optimizer.step()
    assert not torch.equal(big, before)
    # bitsandbytes keeps 8-bit moments only for tensors of >= 4096 elements
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32
    args.optimizer, args.use_8bit_adam = "adamw", False
    assert type(lcd.make_optimizer(args, [torch.nn.Parameter(torch.ones(2))], 3e-5)) is torch.optim.AdamW


def run_and_resume(script, module, flags, output_dir, tmp_path, monkeypatch, resume_step, weights):
    """Train to the end with checkpoints, then resume a copy of checkpoint-`resume_step` to the end; return the
    optimiser records of both runs and (uninterrupted, resumed) final weights."""
    uninterrupted = spy_on_optimizer(module, monkeypatch)
    run_in_process(script, flags)
    [optimizer] = uninterrupted["optimizers"]
    assert type(optimizer) is bnb.optim.AdamW8bit
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / f"checkpoint-{resume_step}", resumed_dir / f"checkpoint-{resume_step}")
    monkeypatch.undo()  # the resumed run's spy wraps the script's own make_optimizer, not the first spy
    resumed = spy_on_optimizer(module, monkeypatch)
    resumed_flags = [str(resumed_dir) if str(f) == str(output_dir) else str(f) for f in flags]
    result = run_in_process(script, resumed_flags + ["--resume_from_checkpoint", "latest"])
    assert f"checkpoint-{resume_step}" in result.stdout
    return uninterrupted, resumed, resumed_dir, weights(output_dir), weights(resumed_dir)


def check_8bit_run(uninterrupted, resumed, output_dir, resumed_dir, resume_step, final_step, expected, got):
    [optimizer] = uninterrupted["optimizers"]
    live = list(optimizer.state.values())
    assert uint8_states(live), "no parameter got 8-bit optimiser state"
    # the checkpoint holds the 8-bit state, and the resumed run loaded exactly that
    saved = checkpoint_optimizer_state(output_dir / f"checkpoint-{resume_step}")
    assert uint8_states(saved)
    assert all(s["step"] == resume_step for s in saved)
    loaded = resumed["loaded_state"][-1]  # accelerate's prepare() also reloads the (then empty) state
    assert_same_state(saved, loaded)
    assert uint8_states(loaded)
    # the resumed run continues exactly: same final weights and the same optimiser state in the last checkpoint
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    assert_same_state(checkpoint_optimizer_state(output_dir / f"checkpoint-{final_step}"),
                      checkpoint_optimizer_state(resumed_dir / f"checkpoint-{final_step}"))


def test_full_lcd_trains_and_resumes_with_real_8bit_adam(assets, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    flags = [
        "--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
        "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--seed", "0", "--shuffle_buffer_size", "4", "--validation_prompts",
        "--report_to", "none", "--use_8bit_adam", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--dataloader_num_workers", "1",
    ]

    def weights(run_dir):
        return {name: load_file(str(run_dir / name / "diffusion_pytorch_model.safetensors"))
                for name in ("unet", "unet_target")}

    uninterrupted, resumed, resumed_dir, expected, got = run_and_resume(
        "train_lcm_distill_sd_wds.py", lcd, flags, output_dir, tmp_path, monkeypatch, 1, weights)
    # the full UNet: its convolutions and attention matrices are large enough for 8-bit state
    teacher = load_file(str(Path(assets["tiny-sd"]) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(expected["unet"][k], teacher[k]) for k in teacher)
    flat = lambda w: {f"{n}.{k}": t for n, d in w.items() for k, t in d.items()}  # noqa: E731
    check_8bit_run(uninterrupted, resumed, output_dir, resumed_dir, 1, 2, flat(expected), flat(got))


def test_dreambooth_lora_trains_and_resumes_with_real_8bit_adam(assets, tmp_path, monkeypatch):
    """LoRA matrices are small: bitsandbytes gives 8-bit state only to those of >= 4096 elements. At rank 64
    the tiny UNet's 64-wide attention layers have such matrices (rank x 64); at SD 1.5 widths rank 4 is
    already enough for the 1280-wide blocks, while the 320- and 640-wide blocks keep 32-bit state."""
    instance_dir = tmp_path / "instance"
    make_toy_dataset(str(instance_dir), num_images=4, seed=3, captions="txt")
    output_dir = tmp_path / "run"
    flags = [
        "--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_data_dir", instance_dir,
        "--instance_prompt", "a photo of sks circle", "--output_dir", output_dir, "--resolution", "64",
        "--train_batch_size", "2", "--seed", "0", "--rank", "64", "--learning_rate", "1e-3",
        "--save_precision", "fp32", "--report_to", "none", "--use_8bit_adam",
        "--max_train_steps", "2", "--checkpointing_steps", "1",
    ]

    def weights(run_dir):
        return load_file(str(run_dir / db.LORA_WEIGHT_NAME))

    uninterrupted, resumed, resumed_dir, expected, got = run_and_resume(
        "train_dreambooth_lora.py", db, flags, output_dir, tmp_path, monkeypatch, 1, weights)
    [optimizer] = uninterrupted["optimizers"]
    small = [s for s in optimizer.state.values() if s["state1"].dtype == torch.float32]
    assert small, "rank x 32 (cross-attention) matrices are under the threshold: 32-bit state"
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in expected.items())  # B starts at zero
    check_8bit_run(uninterrupted, resumed, output_dir, resumed_dir, 1, 2, expected, got)
