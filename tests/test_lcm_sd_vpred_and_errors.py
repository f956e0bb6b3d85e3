"""train_lcm_distill_sd_wds.py with a v-prediction (SD 2.x-style) teacher, what --use_8bit_adam says without
bitsandbytes (the real optimiser is tested in test_8bit_adam.py), and what a user sees for bad input: one clear
line on stderr and a non-zero exit. Runs are in process (see conftest)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import train_lcm_distill_sd_wds as lcd
from conftest import rejection_line, run_in_process
from test_lcm_sd_e2e import SCRIPT, common_flags, lcm_image, unet_weights


@pytest.mark.slow
def test_v_prediction_teacher_huber_empty_prompts(assets, tmp_path):
    out = tmp_path / "vpred"
    flags = common_flags(assets["tiny-sd2"], assets["shards"], out) + [
        "--max_train_steps", "2",
        "--dataloader_num_workers", "0",
        "--loss_type", "huber",
        "--proportion_empty_prompts", "1.0",
        "--validation_prompts",  # no prompt: validation disabled
        "--report_to", "none",
    ]
    run_in_process(SCRIPT, flags)
    scheduler = json.loads((Path(assets["tiny-sd2"]) / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert not (out / "validation").exists()
    assert (out / "unet_target" / "config.json").is_file()
    teacher = unet_weights(Path(assets["tiny-sd2"]) / "unet")
    online = unet_weights(out / "unet")
    assert any(not np.array_equal(online[k].numpy(), teacher[k].numpy()) for k in teacher)
    images = lcm_image(assets["tiny-sd2"], str(out / "unet"))
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.slow
def test_filter_rejecting_every_sample_is_one_clear_error(assets, tmp_path):
    flags = common_flags(assets["tiny-sd"], assets["shards"], tmp_path / "out") + [
        "--max_train_steps", "2", "--dataloader_num_workers", "2", "--min_image_size", "100000",
    ]
    result = run_in_process(SCRIPT, flags, check=False)
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: no usable sample") or last.startswith("error: a whole pass"), last
    assert "--min_image_size" in last or "filtered out" in last
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "out" / "unet").exists()


def parse_error(capsys, argv):
    return rejection_line(lcd, argv, capsys)


@pytest.fixture
def good_flags(assets, tmp_path):
    return ["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
            "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1"]


def test_good_flags_parse(good_flags):
    args = lcd.parse_args(good_flags)
    assert args.w_min == 5.0 and args.w_max == 15.0 and args.ema_decay == 0.95 and args.loss_type == "l2"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--w_min", "9", "--w_max", "3"], "--w_min (9.0) must not exceed --w_max (3.0)"),
        (["--resolution", "100"], "--resolution must be a positive multiple of 8"),
        (["--loss_type", "l1"], "invalid choice: 'l1'"),
        (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts: must be <= 1"),
        (["--ema_decay", "1.0"], "--ema_decay: must be < 1"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit: must be >= 1"),
        (["--resume_from_checkpoint", "checkpoint-77"], "no such checkpoint directory: checkpoint-77"),
        (["--hub_token", "x", "--report_to", "wandb"], "would leak the token"),
    ],
)
def test_bad_flags_are_one_line(capsys, good_flags, extra, message):
    assert message in parse_error(capsys, good_flags + extra)


def test_missing_shards_and_teacher(capsys, good_flags, tmp_path):
    flags = list(good_flags)
    flags[flags.index("--train_shards_path_or_url") + 1] = str(tmp_path / "data" / "{00000..00003}.tar")
    line = parse_error(capsys, flags)
    assert "shard not found" in line and "00000.tar" in line and "3 more" in line
    flags = list(good_flags)
    flags[1] = str(tmp_path / "no_teacher")
    assert "no such directory" in parse_error(capsys, flags)


def test_stream_needs_a_length(capsys, good_flags):
    flags = [f for f in good_flags if f not in ("--max_train_steps", "1")]
    assert "set --max_train_steps" in parse_error(capsys, flags)


def test_xformers_requested_but_absent(capsys, good_flags, monkeypatch):
    real_find_spec = lcd.importlib.util.find_spec
    monkeypatch.setattr(lcd.importlib.util, "find_spec",
                        lambda name, *a: None if name == "xformers" else real_find_spec(name, *a))
    line = parse_error(capsys, good_flags + ["--enable_xformers_memory_efficient_attention"])
    assert "needs xformers" in line


def test_push_to_hub_uploads_card_and_weights_not_checkpoints(tmp_path, monkeypatch):
    calls = {}

    def fake_create_repo(repo_id, exist_ok, token):
        calls["create"] = (repo_id, exist_ok, token)
        return SimpleNamespace(repo_id=f"user/{repo_id}")

    def fake_upload_folder(**kwargs):
        calls["upload"] = kwargs

    monkeypatch.setattr(lcd, "create_repo", fake_create_repo)
    monkeypatch.setattr(lcd, "upload_folder", fake_upload_folder)
    args = SimpleNamespace(hub_model_id=None, output_dir=str(tmp_path / "my-lcm"), hub_token=None, logging_dir="logs")
    assert lcd.push_output_to_hub(args) == "user/my-lcm"
    assert calls["create"] == ("my-lcm", True, None)
    upload = calls["upload"]
    assert upload["repo_id"] == "user/my-lcm" and upload["folder_path"] == args.output_dir
    assert "checkpoint-*" in upload["ignore_patterns"] and "logs/**" in upload["ignore_patterns"]


def test_model_card_text(good_flags):
    args = lcd.parse_args(good_flags + ["--w_min", "3", "--w_max", "9", "--loss_type", "huber"])
    card = lcd.model_card_text(args, "user/lcm-test", "validation/unet_target_step_000010.png")
    assert card.startswith("---\nbase_model: ")
    assert "library_name: diffusers" in card and "- lcm" in card
    assert 'from_pretrained("user/lcm-test", subfolder="unet_target"' in card
    assert "LCMScheduler" in card and "num_inference_steps=4" in card
    assert "between 4.0 and 10.0" in card and "| loss | huber" in card
    assert "![validation grid" in card


def test_8bit_adam_requested_but_bitsandbytes_absent(capsys, good_flags, monkeypatch):
    real_find_spec = lcd.importlib.util.find_spec
    monkeypatch.setattr(lcd.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    assert "--use_8bit_adam needs bitsandbytes" in parse_error(capsys, good_flags + ["--use_8bit_adam"])
