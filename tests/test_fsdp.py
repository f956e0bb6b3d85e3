"""FSDP (accelerate's FSDP 2, the shipped configs/fsdp.yaml) with the scripts that keep an EMA target: full LCD
and BK-SDM --use_ema train, checkpoint and resume on 2 CPU processes. accelerate 1.15 runs FSDP only on
accelerator devices; tests/fsdp_on_cpu.py lets its GPU path run with gloo on the CPU and runs the whole plan
(FSDP runs and their DDP references) in one launch, since imports dominate the cost of a launch.

What proves FSDP right: the same training as 2-process DDP (MULTI_CPU over gloo) with the same seed. Both read
the same data split and draw the same noise on each rank (seed + rank), so what differs is only the order of
fp32 sums (gradient reduce-scatter vs all-reduce, the global grad norm over shards). A 1-process run is no
reference: another data split and other noise. AdamW runs with --adam_epsilon 1, where a step is about
lr * gradient: with the usual 1e-8 its first step is lr * sign(gradient), which turns rounding noise in
near-zero gradients into differences of +-lr. The EMA decay is low, so the target moves well past tolerance."""

import io
import json
import socket
import tarfile
import subprocess
import sys
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import train_bk_sdm_kd as bk
import train_lcm_distill_sd_wds as lcd
import train_lcm_distill_sdxl_wds as lcm_xl
from conftest import REPO, launch_env

TOLERANCE = 1e-5  # measured: 3e-6 (LCD), 6e-8 (BK-SDM); the second step moves weights by 1e-2


def common_flags(assets, output_dir, *extra):
    return ["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
            "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
            "--learning_rate", "1", "--adam_epsilon", "1", "--lr_warmup_steps", "0", "--shuffle_buffer_size", "4",
            "--dataloader_num_workers", "0", "--validation_steps", "0", "--validation_prompts", "--report_to", "none",
            "--max_train_steps", "2", "--checkpointing_steps", "100", *extra]


def shards_with_unreadable_samples_first(assets, folder, unreadable_counts):
    """One shard per count: that many samples whose image bytes are not an image, then three readable samples."""
    folder.mkdir(parents=True)
    with tarfile.open(assets["shard_paths"][0]) as source:
        members = [(member.name, source.extractfile(member).read()) for member in source.getmembers()]
    readable = [(name, data) for name, data in members if name.split(".", 1)[0] in
                sorted({name.split(".", 1)[0] for name, _ in members})[:3]]
    paths = []
    for index, count in enumerate(unreadable_counts):
        paths.append(str(folder / f"shard-{index}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            files = [item for k in range(count) for item in ((f"broken{k}.jpg", b"\xff\xd8 not a jpeg"),
                                                              (f"broken{k}.txt", b"a broken image"))]
            for name, data in files + readable:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return paths


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_runs(assets, tmp_path_factory):
    """One 2-process launch of 5 runs of 2 steps (each costs seconds, so each shared path runs once):

    * full LCD under FSDP, step 1 with a checkpoint, then step 2 resumed from that checkpoint; and under DDP,
      with checkpoints at steps 1 and 2 and the end-of-run validation, then step 3 resumed from checkpoint-2;
    * BK-SDM --use_ema under FSDP with checkpoints at steps 1 and 2 and the end-of-run validation (teacher,
      student and EMA columns), and under DDP.
    The checkpoint hooks are one copied function in both scripts; validating on every rank is the engine's."""
    root = tmp_path_factory.mktemp("fsdp")
    lcd_flags = ["--ema_decay", "0.5"]
    bk_flags = ["--unet_config_name", "bk_tiny", "--use_ema"]
    plan = [
        {"name": "lcd_fsdp", "script": "train_lcm_distill_sd_wds.py", "fsdp": True,
         "args": common_flags(assets, root / "lcd_fsdp", *lcd_flags, "--max_train_steps", "1",
                              "--checkpointing_steps", "1")},
        {"name": "lcd_fsdp_resumed", "script": "train_lcm_distill_sd_wds.py", "fsdp": True,
         "copy": [str(root / "lcd_fsdp" / "checkpoint-1"), str(root / "lcd_fsdp_resumed" / "checkpoint-1")],
         "args": common_flags(assets, root / "lcd_fsdp_resumed", *lcd_flags, "--resume_from_checkpoint", "latest")},
        {"name": "lcd_ddp", "script": "train_lcm_distill_sd_wds.py", "fsdp": False,
         "args": common_flags(assets, root / "lcd_ddp", *lcd_flags, "--checkpointing_steps", "1",
                              "--validation_prompts", "a red circle")},
        {"name": "lcd_ddp_resumed", "script": "train_lcm_distill_sd_wds.py", "fsdp": False,
         "copy": [str(root / "lcd_ddp" / "checkpoint-2"), str(root / "lcd_ddp_resumed" / "checkpoint-2")],
         "args": common_flags(assets, root / "lcd_ddp_resumed", *lcd_flags, "--max_train_steps", "3",
                              "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")},
        {"name": "bk_fsdp", "script": "train_bk_sdm_kd.py", "fsdp": True,
         "args": common_flags(assets, root / "bk_fsdp", *bk_flags, "--checkpointing_steps", "1",
                              "--validation_prompts", "a red circle", "--num_validation_inference_steps", "2")},
        {"name": "bk_ddp", "script": "train_bk_sdm_kd.py", "fsdp": False,
         "args": common_flags(assets, root / "bk_ddp", *bk_flags)},
        # the data counts of both ranks: each reads one of these shards, with 1 and 2 unreadable samples first
        {"name": "counts_ddp", "script": "train_lcm_distill_sd_wds.py", "fsdp": False,
         "args": common_flags(assets, root / "counts_ddp", "--max_train_steps", "1", "--checkpointing_steps", "1",
                              "--shuffle_buffer_size", "0", "--train_shards_path_or_url",
                              "::".join(shards_with_unreadable_samples_first(assets, root / "counts", [1, 2])))},
    ]
    plan_path = root / "plan.json"
    plan_path.write_text(json.dumps(plan))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "fsdp.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "tests" / "fsdp_on_cpu.py"), str(plan_path)]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=1800)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    records = [{r["name"]: r for r in json.loads((root / f"plan.json.rank{rank}").read_text())} for rank in (0, 1)]
    return {"root": root, "log": log, "records": records}


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def check_setups(records, fsdp_runs, ddp_run):
    """What accelerate set up in each run, on each rank (the plan's own record, not the launch flags)."""
    for rank_records in records:
        for run in fsdp_runs:
            assert rank_records[run]["distributed_type"] == str(DistributedType.FSDP)
            assert rank_records[run]["num_processes"] == 2 and rank_records[run]["fsdp_version"] == 2
            assert 0.4 < rank_records[run]["ema_local_fraction"] < 0.6  # each rank holds half of the EMA target
        assert rank_records[ddp_run]["distributed_type"] == str(DistributedType.MULTI_CPU)
        assert rank_records[ddp_run]["num_processes"] == 2


def check_equals_ddp(trained, ddp, step_1, folder):
    """`trained` (2 steps under FSDP) equals the DDP run within fp32 tolerance, after moving well past it."""
    fsdp_weights = weights(trained / folder)
    moved = max_difference(fsdp_weights, weights(step_1 / folder))
    assert moved > 100 * TOLERANCE, (folder, moved)  # the second step moved it, the EMA target included
    assert max_difference(fsdp_weights, weights(ddp / folder)) < TOLERANCE, folder


@pytest.mark.slow
def test_lcd_full_under_fsdp_equals_ddp_across_a_resume(fsdp_runs):
    """The EMA target is sharded like the student: before, the first EMA update raised `aten._foreach_lerp_.Scalar
    got mixed torch.Tensor and DTensor`. Step 2 runs in a resumed process: the student comes back from
    accelerate's FSDP files, the sharded target from the checkpoint's gathered unet_target/ (a target restarted
    from the student instead would miss DDP's by about the size of a step)."""
    root = fsdp_runs["root"]
    check_setups(fsdp_runs["records"], ["lcd_fsdp", "lcd_fsdp_resumed"], "lcd_ddp")
    checkpoint = root / "lcd_fsdp" / "checkpoint-1"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # accelerate's own FSDP model file
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    for folder in ("unet", "unet_target"):
        # the checkpoint hooks gathered the shards: the checkpoint holds what the final save of step 1 wrote
        assert max_difference(weights(checkpoint / folder), weights(root / "lcd_fsdp" / folder)) == 0, folder
        check_equals_ddp(root / "lcd_fsdp_resumed", root / "lcd_ddp", checkpoint, folder)


@pytest.mark.slow
def test_lcd_ddp_two_processes_checkpoint_validate_and_resume(fsdp_runs):
    """2-process DDP (MULTI_CPU): each rank saves its RNG state into the one checkpoint, validation is written
    once (student and target columns), and a resume from the latest checkpoint continues the step count."""
    root = fsdp_runs["root"]
    for rank_records in fsdp_runs["records"]:
        for run in ("lcd_ddp", "lcd_ddp_resumed"):
            assert rank_records[run]["distributed_type"] == str(DistributedType.MULTI_CPU)
            assert rank_records[run]["num_processes"] == 2
    run = root / "lcd_ddp"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert {p.name for p in (run / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert len(list((run / "validation").iterdir())) == 2  # unet and unet_target, written once
    resumed = root / "lcd_ddp_resumed"
    assert "resuming from" in fsdp_runs["log"] and str(resumed / "checkpoint-2") in fsdp_runs["log"]
    assert json.loads((resumed / "checkpoint-3" / "training_state.json").read_text())["global_step"] == 3
    assert (resumed / "unet_target" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_bk_sdm_ema_under_fsdp_equals_ddp(fsdp_runs):
    """BK-SDM --use_ema: DDP keeps the EMA on the main process only, FSDP on every rank as a shard."""
    root = fsdp_runs["root"]
    check_setups(fsdp_runs["records"], ["bk_fsdp"], "bk_ddp")
    assert "ema_local_fraction" not in fsdp_runs["records"][1]["bk_ddp"]  # no EMA on rank 1 under DDP
    fresh = root / "bk_fsdp"
    for folder in ("unet", "unet_ema"):
        assert max_difference(weights(fresh / folder), weights(fresh / "checkpoint-2" / folder)) == 0, folder
        check_equals_ddp(fresh, root / "bk_ddp", fresh / "checkpoint-1", folder)
    assert (fresh / "model_index.json").is_file()  # the output pipeline, with the gathered student
    # the end-of-run validation ran its forward passes on both ranks (the weights are sharded) and wrote once
    assert [p.name for p in (fresh / "validation").iterdir()] == ["step_000002.png"]


@pytest.mark.slow
def test_data_counts_are_summed_over_ranks(fsdp_runs):
    """Each rank reads its own shards: the logs and the checkpoint count what both skipped (they used to count
    only what the main process read)."""
    state = json.loads((fsdp_runs["root"] / "counts_ddp" / "checkpoint-1" / "training_state.json").read_text())
    assert state["n_corrupt"] == 1 + 2 and state["n_uncaptioned"] == 0
    assert "data: 3 unreadable" in fsdp_runs["log"]


@pytest.mark.parametrize("module", [lcd, lcm_xl, bk])
def test_fsdp1_with_an_ema_target_is_refused_in_one_line(module):
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(SystemExit, match="^error: an EMA target under FSDP needs FSDP 2: set fsdp_version: 2"):
        module.check_ema_sharding(accelerator)
    module.check_ema_sharding(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True))
    module.check_ema_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_fsdp2=False))
