"""--report_to wandb (offline) and --report_to all, read back from what the trackers wrote: every loss term and
the validation grids reach the wandb run, and with `all` the tensorboard event files as well. BK-SDM is the
script used: it logs the most loss terms (task, output KD, feature KD and their sum) and its tiny student is
the cheapest to run. Runs are in process (see conftest)."""

import importlib
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import run_in_process

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

SCRIPT = "train_bk_sdm_kd.py"
LOSS_TERMS = {"train/loss", "train/loss_sd", "train/loss_kd_output", "train/loss_kd_feat"}
GRID = "validation/teacher_student"

def wandb_records(path):
    """Decode a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of chunks (crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf `Record`."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, position, payload = 32768, 7, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block tail too short for a chunk header is padding
            position += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def offline_run(wandb_dir):
    """The one offline run under `wandb_dir`: its history rows (key -> decoded value), config and folder."""
    [run_dir] = (Path(wandb_dir) / "wandb").glob("offline-run-*")
    history, config = [], {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return history, config, run_dir


def bk_flags(assets, output_dir, report_to, steps):
    return [
        "--pretrained_teacher_model", assets["tiny-sd"], "--output_dir", output_dir, "--resolution", "64",
        "--train_batch_size", "2", "--seed", "0", "--unet_config_name", "bk_tiny",
        "--train_data_dir", assets["images"], "--dataloader_num_workers", "0",
        "--validation_prompts", "a red circle", "--num_validation_inference_steps", "2",
        "--max_train_steps", steps, "--validation_steps", "1", "--report_to", report_to,
        "--tracker_project_name", "bk-tracker-test",
    ]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave the test's captured stdout alone
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield wandb_dir
    import wandb

    wandb.teardown()  # wandb reads WANDB_DIR once per process setup: the next test's run must see its own


@pytest.mark.slow
def test_report_to_wandb_offline_gets_every_loss_term_and_the_validation_grids(assets, tmp_path, offline_wandb):
    out = tmp_path / "run"
    run_in_process(SCRIPT, bk_flags(assets, out, "wandb", 2))
    history, config, run_dir = offline_run(offline_wandb)
    steps = {row["_step"]: row for row in history}
    assert sorted(steps) == [1, 2]
    for step, row in steps.items():
        assert LOSS_TERMS | {"train/lr", "train/samples_per_sec"} <= row.keys(), step
        assert all(np.isfinite(row[key]) for key in LOSS_TERMS)
        # the logged total is the sum the script trains on: task loss plus the two weighted KD terms (weights 1)
        assert row["train/loss"] == pytest.approx(
            row["train/loss_sd"] + row["train/loss_kd_output"] + row["train/loss_kd_feat"], rel=1e-5)
        # validation after step 1, and the final one at step 2: the same grid the script saved as PNG
        assert row[f"{GRID}/_type"] == "image-file" and (row[f"{GRID}/width"], row[f"{GRID}/height"]) == (128, 64)
        logged = np.asarray(Image.open(run_dir / "files" / row[f"{GRID}/path"]).convert("RGB"))
        saved = np.asarray(Image.open(out / "validation" / f"step_{step:06d}.png").convert("RGB"))
        np.testing.assert_array_equal(logged, saved)
    assert config["unet_config_name"] == "bk_tiny" and config["max_train_steps"] == 2
    assert "hub_token" not in config
    assert not list(out.rglob("events.out.tfevents.*")), "wandb alone wrote tensorboard files"


@pytest.mark.slow
def test_report_to_all_writes_tensorboard_and_wandb(assets, tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    offline_wandb.rmdir()
    os.environ.pop("WANDB_DIR")  # the fixture restores it; without it the run goes next to tensorboard's logs
    run_in_process(SCRIPT, bk_flags(assets, out, "all", 1))
    history, config, _ = offline_run(out / "logs")
    [row] = history
    assert LOSS_TERMS | {f"{GRID}/path"} <= row.keys() and row["_step"] == 1
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert LOSS_TERMS <= set(events.Tags()["scalars"])
    assert GRID in events.Tags()["images"]
    for key in LOSS_TERMS:  # both trackers got the same numbers
        assert events.Scalars(key)[0].value == pytest.approx(row[key], rel=1e-6)
    assert config["tracker_project_name"] == "bk-tracker-test"


@pytest.mark.parametrize("script", ["train_lcm_distill_sd_wds", "train_lcm_distill_lora_sd_wds",
                                    "train_lcm_distill_sdxl_wds", "train_bk_sdm_kd", "train_dreambooth_lora"])
def test_report_to_all_means_tensorboard_and_wandb_only(script):
    """The flag check asks for exactly these two; accelerate's own 'all' would add any installed tracker."""
    module = importlib.import_module(script)
    assert module.tracker_names("all") == ["tensorboard", "wandb"]
    assert module.tracker_names("wandb") == ["wandb"] and module.tracker_names("none") is None
    assert module.tracker_names("tensorboard,wandb") == ["tensorboard", "wandb"]


@pytest.mark.parametrize("script", ["train_lcm_distill_sd_wds", "train_lcm_distill_lora_sd_wds",
                                    "train_lcm_distill_sdxl_wds", "train_bk_sdm_kd", "train_dreambooth_lora"])
def test_peak_gpu_memory_is_logged_on_cuda_only(script, monkeypatch, caplog, request):
    """Each script reports torch.cuda.max_memory_allocated at the end of training (benchmarks/gpu_check.py reads
    the log line); there is no GPU here, so the CUDA query is stubbed."""
    import torch
    from accelerate.state import AcceleratorState, PartialState

    PartialState()  # accelerate's logger needs the state
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    module = importlib.import_module(script)
    logged = []
    accelerator = SimpleNamespace(device=torch.device("cuda", 0), num_processes=1,
                                  log=lambda values, step: logged.append((values, step)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30 + 2**29)
    with caplog.at_level("INFO"):
        assert module.report_peak_memory(accelerator, 7) == 3.5
    assert logged == [({"train/max_memory_allocated_gib": 3.5}, 7)]
    assert "peak GPU memory: 3.50 GiB allocated" in caplog.text
    logged.clear()
    accelerator.device = torch.device("cpu")
    assert module.report_peak_memory(accelerator, 7) is None and logged == []
