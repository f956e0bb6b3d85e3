"""Checkpoints in every regime and resumes that cannot silently go wrong (issue 12):

* DeepSpeed ZeRO-2 saves and resumes the student and the EMA target (accelerate hands the hooks no models
  there); the hooks of every script at that boundary.
* A resume on another data topology (processes, loader workers, batch size, ...) or from another script's
  checkpoint is refused in one line before any model loads; --allow_topology_change accepts the first.
* Two runs into one --output_dir: the second is refused in one line and changes nothing."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import train_bk_sdm_kd as bk
import train_dreambooth_lora as db
import train_lcm_distill_lora_sd_wds as lcm_lora
import train_lcm_distill_sd_wds as lcd
import train_lcm_distill_sdxl_wds as lcm_xl
from conftest import REPO, launch_env, rejection_line, run_in_process

ALL_SCRIPTS = (lcd, lcm_lora, lcm_xl, bk, db)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from make_random_pipeline import build_pipeline

    return build_pipeline("tiny-sdxl", str(tmp_path_factory.mktemp("xl") / "tiny-sdxl"), seed=0)


def lcd_flags(assets, output_dir, *extra):
    return [
        "--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
        "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
        "--shuffle_buffer_size", "4", "--dataloader_num_workers", "0", "--validation_steps", "0",
        "--validation_prompts", "--report_to", "tensorboard", "--checkpointing_steps", "1", *extra,
    ]


def weights(folder):
    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(expected, got, what):
    assert expected.keys() == got.keys(), what
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{what}: {key} differs"


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed / FSDP
# ----------------------------------------------------------------------------------------------------------


def launch_deepspeed(flags):
    """ZeRO-2 through `accelerate launch --use_deepspeed`, one process. Why one: on a machine without GPUs,
    accelerate 1.15 either drops DeepSpeed for plain MULTI_CPU DDP (with ACCELERATE_USE_CPU, state.py skips
    DeepSpeed when `cpu`) or starts DeepSpeed's 2-rank gloo group while telling each process it is process 0
    of 1 (state.py: no backend -> num_processes = 1), which DeepSpeed's batch-size assertion rejects.
    bf16: DeepSpeed casts the student to bf16 and runs without autocast, the regime the dtype-explicit network
    calls exist for (before them, fp32 inputs met bf16 weights and the first step crashed). Through
    tests/deepspeed_on_cpu.py: without the shared-memory all-reduce op that DeepSpeed would compile for minutes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
               "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               "--gradient_clipping", "1.0", "--offload_optimizer_device", "none", "--offload_param_device", "none",
               "--zero3_init_flag", "false", str(REPO / "tests" / "deepspeed_on_cpu.py"), str(REPO / lcd.__name__) + ".py",
               *map(str, flags)]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "DistributedType.DEEPSPEED" in output and "Mixed precision type: bf16" in output
    return output


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero2_checkpoint_resumes_student_and_ema_target(assets, tmp_path):
    """Under DeepSpeed accelerate calls the load hook with no models: the old hook's models.pop() raised
    IndexError on resume (and, before that, prepare() raised for want of a micro-batch size)."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    output = launch_deepspeed(lcd_flags(assets, run, "--max_train_steps", "2", "--max_grad_norm", "0.5"))
    # the flag reached DeepSpeed's own clipping (the launcher's --gradient_clipping 1.0 used to win, silently)
    assert "--max_grad_norm 0.5 replaces gradient_clipping 1.0 of the DeepSpeed config" in output
    assert "DeepSpeed clips gradients at norm 0.5 (--max_grad_norm; 0: off)" in output
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / "pytorch_model").is_dir()  # DeepSpeed's own files: it saved the student itself
    # the hook still writes a loadable, full unet/: the same weights as the final save of the same step
    assert_same_weights(weights(run / "unet"), weights(checkpoint / "unet"), "checkpoint unet/")
    UNet2DConditionModel.from_pretrained(checkpoint / "unet")

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoint-1", resumed / "checkpoint-1")
    output = launch_deepspeed(lcd_flags(assets, resumed, "--max_train_steps", "2", "--max_grad_norm", "0.5",
                                        "--resume_from_checkpoint", "latest"))
    assert "resuming from" in output and "checkpoint-1" in output
    for name in ("unet", "unet_target"):  # the EMA target came back from checkpoint-1/unet_target
        assert_same_weights(weights(run / name), weights(resumed / name), name)


class ShardedAccelerator:
    """What the checkpoint hooks see of accelerate under DeepSpeed/FSDP, on the main rank: a distributed type
    that shards, and get_state_dict as the gather (here of an unsharded model)."""

    distributed_type = DistributedType.FSDP
    is_main_process = True

    def unwrap_model(self, model, keep_fp32_wrapper=True, keep_torch_compile=True):  # accelerate's signature
        return model

    def get_state_dict(self, model):
        return model.state_dict()


@pytest.mark.parametrize("module, hooks_args, ema_folder", [
    (lcd, ("unet_target",), "unet_target"), (lcm_xl, (False,), "unet_target"), (bk, ("unet_ema",), "unet_ema")])
def test_hooks_at_the_sharded_boundary_restore_the_ema(module, hooks_args, ema_folder, assets, tmp_path):
    """Call the hooks as accelerate does under DeepSpeed/FSDP: save with the prepared model and no weights,
    load with no models at all. The EMA network must come back from the checkpoint; unet/ must hold the
    gathered weights as a loadable folder."""
    student = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    ema = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.5)
    save_hook, _ = module.checkpoint_hooks(ShardedAccelerator(), ema, *hooks_args)
    save_hook([student], [], str(tmp_path))
    assert_same_weights(student.state_dict(), UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict(),
                        "unet/")

    fresh = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    _, load_hook = module.checkpoint_hooks(ShardedAccelerator(), fresh, *hooks_args)
    models = []
    load_hook(models, str(tmp_path))  # the old hooks: IndexError (pop from empty list)
    assert models == []
    assert_same_weights(ema.state_dict(), fresh.state_dict(), ema_folder)


def test_lora_hooks_at_the_sharded_boundary(assets, tmp_path):
    """LCM-LoRA: the adapter file comes from the gathered state dict; loading with no models is a no-op (the
    engine restored the adapter) instead of IndexError."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    save_hook, load_hook = lcm_lora.checkpoint_hooks(ShardedAccelerator())
    save_hook([unet], [], str(tmp_path))
    saved = load_file(str(tmp_path / lcm_lora.LORA_WEIGHT_NAME))
    expected = get_peft_model_state_dict(unet)
    assert {k.removeprefix("unet.") for k in saved} == set(expected)
    for key, value in saved.items():
        assert torch.equal(value, expected[key.removeprefix("unet.")])
    load_hook([], str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# Resume on another topology, or from another script
# ----------------------------------------------------------------------------------------------------------


def exit_line(result):
    """The SystemExit message of an in-process run (the last line it printed)."""
    assert result.returncode != 0, result.stdout[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def lcd_checkpoint(assets, tmp_path_factory):
    """One step of LCD, checkpointed: what a resume is compared against."""
    output_dir = tmp_path_factory.mktemp("topology") / "run"
    run_in_process("train_lcm_distill_sd_wds.py", lcd_flags(assets, output_dir, "--max_train_steps", "1"))
    return output_dir


def copy_run(source, destination):
    shutil.copytree(source / "checkpoint-1", destination / "checkpoint-1")
    return destination


@pytest.mark.slow
def test_changed_topology_is_refused_then_accepted_with_the_flag(lcd_checkpoint, assets, tmp_path):
    state = json.loads((lcd_checkpoint / "checkpoint-1" / "training_state.json").read_text())
    assert state["script"] == "train_lcm_distill_sd_wds.py" and state["method"] == "lcd-full"
    assert state["topology"]["processes"] == 1 and state["topology"]["--train_batch_size"] == 2
    assert state["topology"]["--train_shards_path_or_url"].startswith("2 shards, sha256 ")

    run = copy_run(lcd_checkpoint, tmp_path / "run")
    flags = lcd_flags(assets, run, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    flags[flags.index("--train_batch_size") + 1] = "1"
    flags[flags.index("--dataloader_num_workers") + 1] = "1"
    result = run_in_process("train_lcm_distill_sd_wds.py", flags, check=False)
    line = exit_line(result)
    assert line.startswith(f"error: cannot resume {run / 'checkpoint-1'} exactly: ")
    assert "--dataloader_num_workers 0 -> 1" in line and "--train_batch_size 2 -> 1" in line
    assert "--allow_topology_change" in line
    assert "resuming from" not in result.stdout  # refused before the models load
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]

    result = run_in_process("train_lcm_distill_sd_wds.py", flags + ["--allow_topology_change"])
    assert "resuming from" in result.stdout and "data position is approximate" in result.stdout
    state = json.loads((run / "checkpoint-2" / "training_state.json").read_text())
    assert state["global_step"] == 2 and state["topology"]["--train_batch_size"] == 1


@pytest.mark.slow
def test_checkpoint_of_another_script_is_refused_before_models_load(lcd_checkpoint, assets, tmp_path):
    """The old scripts got as far as load_state and died in a traceback (missing adapter file)."""
    run = copy_run(lcd_checkpoint, tmp_path / "run")
    flags = ["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
             "--output_dir", run, "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
             "--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--report_to", "tensorboard",
             "--dataloader_num_workers", "0"]
    result = run_in_process("train_lcm_distill_lora_sd_wds.py", flags, check=False)
    assert exit_line(result) == (
        f"error: {run / 'checkpoint-1'} is a checkpoint of train_lcm_distill_sd_wds.py (lcd-full), not of "
        "train_lcm_distill_lora_sd_wds.py (lcm-lora): resume it with that script and method, or start a new run")
    assert "resuming from" not in result.stdout


def test_resume_compatibility_rules():
    record = lcd.run_record("lcd-full", {"processes": 2, "--train_batch_size": 4})
    lcd.check_resume_compatible({"global_step": 3}, record, "ckpt")  # written before these were recorded
    lcd.check_resume_compatible({**record, "global_step": 3}, record, "ckpt")
    with pytest.raises(SystemExit, match=r"^error: cannot resume ckpt exactly: processes 4 -> 2\. "):
        lcd.check_resume_compatible({**record, "topology": {"processes": 4, "--train_batch_size": 4}}, record, "ckpt")
    sdxl = lcm_xl.run_record("lcd-sdxl-lora", {})
    with pytest.raises(SystemExit, match=r"ckpt is a checkpoint of train_lcm_distill_sdxl_wds\.py \(lcd-sdxl-lora\)"):
        lcd.check_resume_compatible(sdxl, record, "ckpt", allow_topology_change=True)
    full_sdxl = lcm_xl.run_record("lcd-sdxl-full", {})
    with pytest.raises(SystemExit, match=r"\(lcd-sdxl-lora\), not of train_lcm_distill_sdxl_wds\.py \(lcd-sdxl-full\)"):
        lcm_xl.check_resume_compatible(sdxl, full_sdxl, "ckpt")


@pytest.mark.slow
def test_dreambooth_changed_topology_is_refused_then_accepted(assets, tmp_path):
    from make_toy_dataset import make_toy_dataset

    instances = tmp_path / "instances"
    make_toy_dataset(str(instances), num_images=3, seed=3, captions="txt")
    run = tmp_path / "run"
    flags = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_data_dir", instances,
             "--instance_prompt", "a photo of sks circle", "--output_dir", run, "--resolution", "64",
             "--train_batch_size", "2", "--seed", "0", "--rank", "4", "--checkpointing_steps", "1",
             "--report_to", "none"]
    run_in_process("train_dreambooth_lora.py", flags + ["--max_train_steps", "1"])
    state = json.loads((run / "checkpoint-1" / "training_state.json").read_text())
    assert state["method"] == "dreambooth-lora" and state["topology"]["instance images"] == 3
    assert state["settings"]["--rank"] == 4 and state["teacher"]["flag"] == "--pretrained_model_name_or_path"

    # another --rank: refused before the models load (it used to stop after them, or not at all for --lora_alpha)
    other_rank = flags + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    other_rank[other_rank.index("--rank") + 1] = "8"
    result = run_in_process("train_dreambooth_lora.py", other_rank, check=False)
    assert exit_line(result) == (f"error: cannot resume {run / 'checkpoint-1'}: --rank 4 -> 8; --lora_alpha 4.0 -> "
                                 "8.0 would change the trained weights' shapes or scale; restore the checkpoint's "
                                 "setting, or start a new run")
    assert "resuming from" not in result.stdout

    flags[flags.index("--train_batch_size") + 1] = "1"
    resume = flags + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    result = run_in_process("train_dreambooth_lora.py", resume, check=False)
    line = exit_line(result)
    assert line.startswith(f"error: cannot resume {run / 'checkpoint-1'} exactly: --train_batch_size 2 -> 1. ")
    assert "--allow_topology_change" in line and "resuming from" not in result.stdout
    result = run_in_process("train_dreambooth_lora.py", resume + ["--allow_topology_change"])
    assert "resuming from" in result.stdout and "position is approximate" in result.stdout
    assert json.loads((run / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2


# ----------------------------------------------------------------------------------------------------------
# One run per output dir
# ----------------------------------------------------------------------------------------------------------


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))


HOLDER = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on test"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("module", ALL_SCRIPTS, ids=lambda m: m.__name__)
def test_second_run_into_a_locked_output_dir_is_refused(module, assets, tiny_sdxl, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "training_state.json").write_text('{"global_step": 1}')
    (out / module.OutputDirLock.FILE_NAME).write_text("")
    if module is db:
        flags = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_data_dir", assets["images"],
                 "--instance_prompt", "sks", "--output_dir", out]
    elif module is bk:
        flags = ["--pretrained_teacher_model", assets["tiny-sd"], "--train_data_dir", assets["images"],
                 "--output_dir", out, "--max_train_steps", "1"]
    else:
        teacher = tiny_sdxl if module is lcm_xl else assets["tiny-sd"]
        flags = ["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", assets["shards"],
                 "--output_dir", out, "--max_train_steps", "1", "--resolution", "64"]
    flags += ["--overwrite_output_dir"]  # would delete checkpoint-1: it must not, while another run holds the dir
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / module.OutputDirLock.FILE_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        message = rejection_line(module, flags, capsys)
        assert message.endswith(f"--output_dir {out} is in use by another training run (pid {holder.pid} on test "
                                f"holds {out / module.OutputDirLock.FILE_NAME}); wait for it to end or choose "
                                "another --output_dir")
        assert snapshot(out) == before
        monkeypatch.setenv("RANK", "1")  # another rank of the lock holder's own launch is not refused
        module.parse_args([str(f) for f in flags if f != "--overwrite_output_dir"] + ["--resume_from_checkpoint",
                                                                                     "latest"])
        monkeypatch.delenv("RANK")
    finally:
        holder.kill()  # as a crash would: the kernel drops its lock
        holder.wait()
    try:
        module.parse_args([str(f) for f in flags])  # the dir is free again
        assert not (out / "checkpoint-1").exists()
        assert os.path.realpath(out) in module.OutputDirLock.held
    finally:
        module.OutputDirLock.release_all()


# ----------------------------------------------------------------------------------------------------------
# Damaged checkpoints, another teacher, other adapter shapes, a full disk (issue 21): one line, before
# anything trains, and the last complete checkpoint kept
# ----------------------------------------------------------------------------------------------------------


class PlainAccelerator:
    """What find_resume_checkpoint reads of an Accelerator: one process, no DeepSpeed/FSDP, no fp16 scaler."""

    distributed_type = DistributedType.NO
    num_processes = 1
    scaler = None


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGES = {  # what a crash, a full disk or a careless cleanup leaves, by the file a resume then lacks
    "optimizer.bin": lambda ckpt: (ckpt / "optimizer.bin").unlink(),
    "unet_target/": lambda ckpt: shutil.rmtree(ckpt / "unet_target"),
    "training_state.json": lambda ckpt: cut_in_half(ckpt / "training_state.json"),
    "random_states_0.pkl": lambda ckpt: (ckpt / "random_states_0.pkl").unlink(),
    "custom_checkpoint_0.pkl": lambda ckpt: cut_in_half(ckpt / "custom_checkpoint_0.pkl"),
    "unet/diffusion_pytorch_model.safetensors": lambda ckpt: cut_in_half(
        ckpt / "unet" / "diffusion_pytorch_model.safetensors"),
}


@pytest.mark.parametrize("damaged", DAMAGES)
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(damaged, lcd_checkpoint, tmp_path, caplog):
    """Before: tracebacks after the models loaded (one naming unet/ for a missing unet_target/), or, without
    random_states_0.pkl, a silently inexact resume. Now the file is named before any model loads; `latest`
    takes the newest complete checkpoint instead."""
    run = copy_run(lcd_checkpoint, tmp_path / "run")
    state = json.loads((run / "checkpoint-1" / "training_state.json").read_text())
    record = {key: state[key] for key in ("script", "method", "topology", "settings")}
    files = lcd.LatentConsistencyDistillation.checkpoint_files(None)
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-2")
    (run / "checkpoint-2" / "training_state.json").write_text(json.dumps({**state, "global_step": 2}))
    DAMAGES[damaged](run / "checkpoint-2")

    def find(resume):
        args = SimpleNamespace(resume_from_checkpoint=resume, output_dir=str(run), allow_topology_change=False)
        return lcd.find_resume_checkpoint(args, PlainAccelerator(), record, files, lcd.new_data_counts())

    PartialState()  # accelerate's logger needs one (run_in_process resets it)
    with pytest.raises(SystemExit) as refusal:
        find(str(run / "checkpoint-2"))
    assert str(refusal.value).startswith(f"error: cannot resume {run / 'checkpoint-2'}: ")
    assert damaged in str(refusal.value) and "\n" not in str(refusal.value)
    with caplog.at_level(logging.WARNING):
        path, resumed_state = find("latest")
    assert path == str(run / "checkpoint-1") and resumed_state["global_step"] == 1
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and str(run / "checkpoint-2") in skipped[0] and damaged in skipped[0]


@pytest.mark.slow
def test_damaged_checkpoint_and_other_teacher_refused_in_process(lcd_checkpoint, assets, tmp_path):
    """Through main(): an explicit checkpoint without optimizer.bin stops before the models load; a teacher
    of the same shapes but other weights (which used to resume silently) stops once it has loaded, before
    anything trains."""
    run = copy_run(lcd_checkpoint, tmp_path / "run")
    state = json.loads((run / "checkpoint-1" / "training_state.json").read_text())
    assert state["teacher"]["model"] == assets["tiny-sd"] and len(state["teacher"]["denoiser weights"]) == 16
    (run / "checkpoint-1" / "optimizer.bin").rename(tmp_path / "optimizer.bin")
    flags = lcd_flags(assets, run, "--max_train_steps", "2", "--resume_from_checkpoint", run / "checkpoint-1")
    result = run_in_process("train_lcm_distill_sd_wds.py", flags, check=False)
    assert exit_line(result).startswith(f"error: cannot resume {run / 'checkpoint-1'}: damaged: optimizer.bin ")
    assert "resuming from" not in result.stdout and "Traceback" not in result.stdout

    (tmp_path / "optimizer.bin").rename(run / "checkpoint-1" / "optimizer.bin")
    other = tmp_path / "other-teacher"
    shutil.copytree(assets["tiny-sd"], other)
    unet_file = other / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({key: -value for key, value in load_file(str(unet_file)).items()}, str(unet_file),
              metadata={"format": "pt"})
    flags[flags.index("--pretrained_teacher_model") + 1] = str(other)
    result = run_in_process("train_lcm_distill_sd_wds.py", flags, check=False)
    line = exit_line(result)
    assert line.startswith(f"error: {run / 'checkpoint-1'} was trained from --pretrained_teacher_model "
                           f"{assets['tiny-sd']} (denoiser weights {state['teacher']['denoiser weights']}), but "
                           f"this run loads {other} (denoiser weights ")
    assert "resuming from" not in result.stdout
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]


def test_teacher_and_adapter_settings_rules(caplog):
    PartialState()  # accelerate's logger needs one (run_in_process resets it)
    teacher = {"flag": "--pretrained_teacher_model", "model": "org/sd", "revision": None, "denoiser weights": "ab"}
    lcd.check_resume_teacher({"global_step": 1}, teacher, "ckpt")  # written before the teacher was recorded
    with caplog.at_level(logging.WARNING):  # the same weights from another folder resume, with a warning
        lcd.check_resume_teacher({"teacher": {**teacher, "model": "/mirror/sd"}}, teacher, "ckpt")
    assert "trained from /mirror/sd, with org/sd: the same denoiser weights" in caplog.text
    with pytest.raises(SystemExit, match=r"^error: ckpt was trained from --pretrained_teacher_model org/sd "
                                         r"\(revision v2\) \(denoiser weights cd\), but this run loads org/sd "
                                         r"\(denoiser"):
        lcd.check_resume_teacher({"teacher": {**teacher, "revision": "v2", "denoiser weights": "cd"}}, teacher, "ckpt")
    # checkpoints written before the rename record the same fingerprint as "UNet weights"
    old_style = {key: value for key, value in teacher.items() if key != "denoiser weights"}
    lcd.check_resume_teacher({"teacher": {**old_style, "UNet weights": "ab"}}, teacher, "ckpt")
    with pytest.raises(SystemExit, match=r"\(denoiser weights cd\), but this run loads org/sd \(denoiser weights ab"):
        lcd.check_resume_teacher({"teacher": {**old_style, "UNet weights": "cd"}}, teacher, "ckpt")

    def lora_args(rank, alpha=None):
        return SimpleNamespace(lora_rank=rank, lora_alpha=float(alpha or rank), lora_target_modules=["to_q", "to_v"],
                               ema_decay=0.95)

    settings = lcm_lora.LatentConsistencyLoraDistillation.checkpoint_settings
    saved = lcm_lora.run_record("lcm-lora", {}, settings(lora_args(4)))
    lcm_lora.check_resume_compatible(json.loads(json.dumps(saved)), saved, "ckpt")  # a JSON round trip is equal
    with pytest.raises(SystemExit, match=r"^error: cannot resume ckpt: --lora_rank 4 -> 8; --lora_alpha 4\.0 -> 8\.0 "
                                         r"would change the trained weights' shapes or scale"):
        lcm_lora.check_resume_compatible(saved, lcm_lora.run_record("lcm-lora", {}, settings(lora_args(8))), "ckpt",
                                         allow_topology_change=True)


@pytest.mark.slow
def test_full_disk_at_the_final_save_is_one_line_and_keeps_the_checkpoint(lcd_checkpoint, assets, tmp_path,
                                                                           monkeypatch):
    """Before: chained tracebacks. (A full disk inside a checkpoint save: test_scale_out_and_faults.) The run
    resumes at its last step, so it goes straight to the final save."""
    run = copy_run(lcd_checkpoint, tmp_path / "run")

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "unet"))

    monkeypatch.setattr(lcd.LatentConsistencyDistillation, "save_outputs", full_disk)
    flags = lcd_flags(assets, run, "--max_train_steps", "1", "--resume_from_checkpoint", "latest")
    result = run_in_process("train_lcm_distill_sd_wds.py", flags, check=False)
    assert exit_line(result) == (
        f"error: no space left on the device while writing the trained model to {run}; the last complete "
        f"checkpoint, {run / 'checkpoint-1'}, is intact. Free some space, then continue with "
        "--resume_from_checkpoint latest")
    assert "Traceback" not in result.stdout and not (run / "README.md").exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]


def test_write_failures_are_recognised_from_each_writer():
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    torch_error.__context__ = RuntimeError("basic_ios::clear: iostream error")
    safetensors_error = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
    assert lcd.write_failure(OSError(errno.ENOSPC, "No space left on device")) == "no space left on the device"
    assert lcd.write_failure(OSError(errno.EDQUOT, "Disk quota exceeded")) == "no space left on the device"
    assert lcd.write_failure(torch_error).endswith("unexpected pos 704 vs 598")
    assert lcd.write_failure(safetensors_error).startswith("Error while serializing")
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert lcd.write_failure(wrapped) == "Input/output error"
    assert lcd.write_failure(ValueError("a bug")) is None  # its traceback is kept
