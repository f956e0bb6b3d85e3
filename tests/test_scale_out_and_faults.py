"""Scale-out and fault tolerance, for every script: 2-process DDP runs (gloo on CPU), ranks reading disjoint
data, and what the user sees when a run is preempted, a step goes non-finite, a checkpoint was left half
written, or the output directory cannot take the run. Faults are injected on the full LCD script and on the
LCM-LoRA script (the shared code is the same in all five, kept identical by the copy checker)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_bk_sdm_kd as bk
import train_dreambooth_lora as db
import train_lcm_distill_lora_sd_wds as lcm_lora
import train_lcm_distill_sd_wds as lcd
from conftest import REPO, launch_env, rejection_line, run_in_process, run_script

LCD = "train_lcm_distill_sd_wds.py"
LORA = "train_lcm_distill_lora_sd_wds.py"


def lcd_flags(assets, output_dir, teacher="tiny-sd"):
    return [
        "--pretrained_teacher_model", assets[teacher], "--train_shards_path_or_url", assets["shards"],
        "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-4",
        "--lr_warmup_steps", "0", "--seed", "0", "--shuffle_buffer_size", "4", "--dataloader_num_workers", "0",
        "--validation_prompts", "--report_to", "none",
    ]


def lora_flags(assets, output_dir):
    return lcd_flags(assets, output_dir) + ["--lora_rank", "4"]


# ----------------------------------------------------------------------------------------------------------
# Ranks read disjoint data
# ----------------------------------------------------------------------------------------------------------


def stream_keys(stream, num_batches):
    keys = []
    for batch, _ in zip(iter(stream), range(num_batches)):
        keys += batch["captions"]
    return keys


def test_shard_readers_are_disjoint_and_cover_the_data(assets):
    """2 processes x 1 worker over 2 shards: each rank reads its own shard, together all 12 samples."""
    transform = lcd.ImageTransform(64)
    per_rank = [
        stream_keys(lcd.ShardStream(assets["shard_paths"], batch_size=2, transform=transform, seed=0, rank=rank,
                                    world_size=2, shuffle_buffer_size=0, max_samples_per_pass=12), 3)
        for rank in (0, 1)
    ]
    # the toy captions are unique per image, so a caption seen on both ranks would be a sample read twice
    captions = [json.loads(line)["text"] for line in Path(assets["images"], "metadata.jsonl").read_text().splitlines()]
    assert len(set(captions)) == 12
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    assert sorted(per_rank[0] + per_rank[1]) == sorted(captions)


def test_image_folder_readers_are_disjoint(assets):
    entries = bk.read_image_folder(assets["images"], "file_name", "text")
    transform = bk.ImageTransform(64)
    seen = []
    for rank in (0, 1):
        stream = bk.ImageFolderStream(entries, batch_size=2, transform=transform, seed=0, rank=rank, world_size=2,
                                      shuffle_buffer_size=0, max_samples_per_pass=12)
        seen.append(stream_keys(stream, 3))
    assert sorted(seen[0] + seen[1]) == sorted(caption for _, caption, _ in entries)  # unique captions


def test_fewer_shards_than_readers_is_one_clear_error(assets, tmp_path):
    flags = lcd_flags(assets, tmp_path / "out") + ["--max_train_steps", "1", "--dataloader_num_workers", "3"]
    result = run_in_process(LCD, flags, check=False)
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: 2 shard(s) for 3 readers (1 process(es) x 3 loader worker(s))"), last
    assert "pass --dataloader_num_workers 2" in last, last  # the count that fits, not just "lower it"


# ----------------------------------------------------------------------------------------------------------
# 2-process runs of every script (BK-SDM's is in test_bk_sdm.py)
# ----------------------------------------------------------------------------------------------------------


def assert_two_processes(log):
    assert "Num processes: 2" in log and "MULTI_CPU" in log, log[-3000:]


@pytest.mark.slow
def test_sdxl_two_processes(assets, tmp_path):
    """The SDXL script in LoRA mode: also the LCM-LoRA code path (the LCD region's adapter switching) under DDP."""
    from make_random_pipeline import build_pipeline

    teacher = build_pipeline("tiny-sdxl", str(tmp_path / "tiny-sdxl"), seed=0)
    out = tmp_path / "xl2"
    flags = ["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", assets["shards"], "--output_dir", out,
             "--resolution", "64", "--train_batch_size", "1",
             "--max_train_steps", "2", "--seed", "0", "--shuffle_buffer_size", "4", "--dataloader_num_workers", "0",
             "--validation_prompts", "--report_to", "none", "--use_lora", "--lora_rank", "4"]
    log = run_script("train_lcm_distill_sdxl_wds.py", flags, num_processes=2).stdout
    assert_two_processes(log)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_dreambooth_two_processes_share_class_generation(assets, tmp_path):
    instance_dir = tmp_path / "instance"
    instance_dir.mkdir()
    for png in sorted(Path(assets["images"]).glob("*.png"))[:3]:
        shutil.copy(png, instance_dir / png.name)
    flags = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_data_dir", instance_dir,
             "--instance_prompt", "a photo of sks circle", "--with_prior_preservation", "--class_data_dir",
             tmp_path / "class", "--class_prompt", "a photo of a circle", "--num_class_images", "3",
             "--sample_batch_size", "1", "--output_dir", tmp_path / "db2", "--resolution", "64", "--train_batch_size",
             "1", "--max_train_steps", "2", "--seed", "0", "--report_to", "none"]
    log = run_script("train_dreambooth_lora.py", flags, num_processes=2).stdout
    assert_two_processes(log)
    names = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert [n.split("-")[0] for n in names] == ["00000", "00001", "00002"]  # rank 0: 0, 2; rank 1: 1
    assert (tmp_path / "db2" / db.LORA_WEIGHT_NAME).is_file()


# ----------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_a_launched_run_checkpoints_and_resume_continues(assets, tmp_path):
    """As a SLURM time limit or Ctrl-C does it: SIGTERM to the whole process group (launcher, trainer and its
    DataLoader worker) mid-run. The worker ignores it; the trainer finishes the step and checkpoints."""
    import psutil

    out = tmp_path / "preempted"
    flags = lcd_flags(assets, out) + ["--max_train_steps", "1000", "--checkpointing_steps", "1000",
                                      "--dataloader_num_workers", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / LCD), *map(str, flags)]
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + 600
            while not re.search(r"\b[1-9]\d*/1000\b", log_path.read_text()):
                assert launcher.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            processes = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
            assert len(processes) == 3  # launcher, trainer, one DataLoader worker
            os.killpg(launcher.pid, signal.SIGTERM)
            gone, alive = psutil.wait_procs(processes, timeout=300)
            assert not alive, alive
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "DataLoader worker" not in text and "Traceback" not in text.split("stopped by SIGTERM")[0], text[-3000:]
    match = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved: (\S+)\. Continue with "
                      r"--resume_from_checkpoint latest", text)
    assert match, text[-3000:]
    step, checkpoint = int(match.group(1)), Path(match.group(2))
    assert checkpoint == out / f"checkpoint-{step}"
    assert json.loads((checkpoint / "training_state.json").read_text())["global_step"] == step
    assert not (out / "unet").exists()  # stopped, not finished
    flags[flags.index("--max_train_steps") + 1] = str(step + 1)
    result = run_in_process(LCD, flags + ["--resume_from_checkpoint", "latest"])
    assert f"resuming from {checkpoint}" in result.stdout
    assert (out / "unet_target" / "config.json").is_file()


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_exits(assets, tmp_path, monkeypatch):
    """Ctrl-C during step 2 of the LoRA script: step 2 completes, checkpoint-2 is written, exit code 130."""
    calls = {"n": 0}
    original = lcm_lora.lcd_loss

    def loss_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(lcm_lora, "lcd_loss", loss_then_ctrl_c)
    out = tmp_path / "interrupted"
    flags = lora_flags(assets, out) + ["--max_train_steps", "5", "--checkpointing_steps", "100"]
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    result = run_in_process(LORA, flags, check=False)
    assert result.returncode == 128 + signal.SIGINT
    assert f"stopped by SIGINT after step 2; checkpoint saved: {out / 'checkpoint-2'}" in result.stdout
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    monkeypatch.setattr(lcm_lora, "lcd_loss", original)
    resumed = run_in_process(LORA, flags + ["--resume_from_checkpoint", "latest"])
    assert "at step 2" in resumed.stdout and (out / lcm_lora.LORA_WEIGHT_NAME).is_file()


# ----------------------------------------------------------------------------------------------------------
# Non-finite loss
# ----------------------------------------------------------------------------------------------------------


def nan_on(module, name, steps, monkeypatch):
    original = getattr(module, name)
    calls = {"n": 0}

    def maybe_nan(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] in steps else loss

    monkeypatch.setattr(module, name, maybe_nan)


@pytest.mark.slow
def test_one_nan_step_is_skipped_and_training_goes_on(assets, tmp_path, monkeypatch):
    """Full LCD: step 2 has a NaN loss. Its update is skipped (weights and EMA target as after step 1), the run
    completes."""
    out = tmp_path / "nan-once"
    nan_on(lcd, "lcd_loss", {2}, monkeypatch)
    flags = lcd_flags(assets, out) + ["--max_train_steps", "3", "--checkpointing_steps", "1"]
    result = run_in_process(LCD, flags)
    assert "non-finite loss (nan) at step 2: update skipped (1 in a row)" in result.stdout
    for name in ("unet", "unet_target"):
        after_1 = load_file(str(out / "checkpoint-1" / name / "diffusion_pytorch_model.safetensors"))
        after_2 = load_file(str(out / "checkpoint-2" / name / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(after_1[k], after_2[k]) for k in after_1), f"{name} changed in the skipped step"
    assert (out / "unet_target" / "config.json").is_file()


@pytest.mark.slow
def test_nan_steps_in_a_row_stop_the_run_with_the_last_checkpoint_intact(assets, tmp_path, monkeypatch):
    out = tmp_path / "nan-always"
    nan_on(lcm_lora, "lcd_loss", {2, 3, 4, 5}, monkeypatch)
    flags = lora_flags(assets, out) + ["--max_train_steps", "5", "--checkpointing_steps", "1",
                                       "--max_nonfinite_steps", "2", "--checkpoints_total_limit", "3"]
    result = run_in_process(LORA, flags, check=False)
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss (nan) at step 3, 2 step(s) in a row (--max_nonfinite_steps 2)")
    assert "Last checkpoint: checkpoint-2" in last
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    good, skipped = (load_file(str(out / c / lcm_lora.LORA_WEIGHT_NAME)) for c in ("checkpoint-1", "checkpoint-2"))
    assert all(torch.equal(good[k], skipped[k]) and torch.isfinite(good[k]).all() for k in good)
    assert not (out / lcm_lora.LORA_WEIGHT_NAME).exists()


# ----------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script, flags_for", [(LCD, lcd_flags), (LORA, lora_flags)])
def test_half_written_checkpoint_is_skipped_with_a_warning(assets, tmp_path, script, flags_for):
    out = tmp_path / "run"
    flags = flags_for(assets, out) + ["--max_train_steps", "2", "--checkpointing_steps", "1"]
    run_in_process(script, flags)
    # the run "died" while writing checkpoint-3: a complete-looking folder without its training_state.json,
    # and a leftover temporary folder of the atomic writer
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "training_state.json").unlink()
    (out / "checkpoint-4.tmp").mkdir()
    flags[flags.index("--max_train_steps") + 1] = "3"
    result = run_in_process(script, flags + ["--resume_from_checkpoint", "latest"])
    assert f"skipping {out / 'checkpoint-3'}: incomplete (no training_state.json)" in result.stdout
    assert f"resuming from {out / 'checkpoint-2'}" in result.stdout
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["global_step"] == 3
    assert not (out / "checkpoint-4.tmp").exists()


def test_a_full_disk_while_saving_leaves_no_checkpoint_to_resume(assets, tmp_path):
    """The writer saves into checkpoint-N.tmp and renames at the end: a failure inside save_state leaves the
    earlier checkpoints as they were, removes the .tmp folder (its space is needed) and stops the run in one line
    naming the checkpoint it could not write and the one that is intact (before: chained tracebacks)."""
    from accelerate import Accelerator

    args = lcd.parse_args([str(a) for a in lcd_flags(assets, tmp_path / "out") + ["--max_train_steps", "1"]])
    accelerator = Accelerator(cpu=True)

    def full_disk(path):
        os.makedirs(path, exist_ok=True)
        (Path(path) / "optimizer.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    previous = tmp_path / "out" / "checkpoint-3"
    previous.mkdir()
    (previous / "training_state.json").write_text('{"global_step": 3}')
    args.checkpoints_total_limit = 1  # rotation runs after a successful save, never before
    accelerator.save_state = full_disk
    with pytest.raises(SystemExit) as stop:
        lcd.save_checkpoint(accelerator, args, 7, {})
    assert str(stop.value) == (
        f"error: no space left on the device while writing checkpoint {tmp_path / 'out' / 'checkpoint-7'}; the last "
        f"complete checkpoint, {previous}, is intact. Free some space, then continue with --resume_from_checkpoint "
        "latest")
    left = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != lcd.OutputDirLock.FILE_NAME)
    assert left == ["checkpoint-3"]


# ----------------------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, flags_for", [(lcd, lcd_flags), (lcm_lora, lora_flags)])
def test_finished_run_is_not_overwritten_by_accident(assets, tmp_path, capsys, module, flags_for):
    out = tmp_path / "done"
    out.mkdir()
    (out / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# a finished model\n")
    flags = flags_for(assets, out) + ["--max_train_steps", "1"]
    message = rejection_line(module, flags, capsys)
    assert f"--output_dir {out} already holds a finished run" in message and "--overwrite_output_dir" in message
    # 'latest' with nothing to resume would retrain from scratch over the finished run: refused too
    assert "already holds a finished run" in rejection_line(module, flags + ["--resume_from_checkpoint", "latest"],
                                                            capsys)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "training_state.json").write_text('{"global_step": 4}')
    module.parse_args([str(a) for a in flags + ["--resume_from_checkpoint", "latest"]])
    # --overwrite_output_dir starts over: the old run's checkpoints go, so a later 'latest' cannot pick them
    module.parse_args([str(a) for a in flags + ["--overwrite_output_dir"]])
    assert not (out / "checkpoint-4").exists()
    (out / "README.md").write_text("# my notes, not a model card\n")
    module.parse_args([str(a) for a in flags])


def test_earlier_checkpoints_are_not_mixed_into_a_new_run(assets, tmp_path, capsys):
    out = tmp_path / "interrupted"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "training_state.json").write_text('{"global_step": 2}')
    message = rejection_line(lcd, lcd_flags(assets, out) + ["--max_train_steps", "1"], capsys)
    assert "already holds checkpoints of an earlier run (checkpoint-2): pass --resume_from_checkpoint latest" in message


@pytest.mark.parametrize("module, flags_for", [(lcd, lcd_flags), (lcm_lora, lora_flags)])
def test_unwritable_output_dir_and_full_disk_fail_before_loading(assets, tmp_path, capsys, monkeypatch, module,
                                                                flags_for):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    message = rejection_line(module, flags_for(assets, blocker / "out") + ["--max_train_steps", "1"], capsys)
    assert message.endswith(f"--output_dir {blocker / 'out'} is not writable: Not a directory")
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 5 * 2**20,
                                                                                            5 * 2**20))
    message = rejection_line(module, flags_for(assets, tmp_path / "out") + ["--max_train_steps", "1"], capsys)
    assert "only 0.00 GiB free on its disk; checkpoints need at least 1 GiB" in message


def test_incomplete_checkpoint_named_explicitly_is_refused(assets, tmp_path, capsys):
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    flags = lcd_flags(assets, tmp_path / "out") + ["--max_train_steps", "1", "--resume_from_checkpoint", "checkpoint-5"]
    message = rejection_line(lcd, flags, capsys)
    assert "checkpoint-5 is incomplete (no training_state.json)" in message


def test_every_script_has_the_fault_flags():
    for module in (lcd, lcm_lora, bk, db):
        source = Path(module.__file__).read_text()
        assert '"--max_nonfinite_steps"' in source and '"--overwrite_output_dir"' in source
        assert "StopOnSignal().install()" in source and "nonfinite.apply(" in source
    xl = (REPO / "train_lcm_distill_sdxl_wds.py").read_text()
    assert "StopOnSignal().install()" in xl and "nonfinite.apply(" in xl and '"--overwrite_output_dir"' in xl


def test_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {path.name: str(load_config_from_file(str(path)).distributed_type).split(".")[-1]
             for path in sorted((REPO / "configs").glob("*.yaml"))}
    assert kinds == {"ddp_2nodes_8gpu.yaml": "MULTI_GPU", "ddp_4gpu.yaml": "MULTI_GPU",
                     "deepspeed_zero2.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP"}
