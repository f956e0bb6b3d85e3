"""Start-up checks of issue 21 ("Nothing silent"): what used to fail only after training, or to train silently
untracked, is refused in one line before any model loads: --push_to_hub offline, without a token or with a
repository that cannot be created; --report_to a tracker that is unknown or not installed; --num_ddim_timesteps
beyond the teacher's schedule. Also --max_grad_norm reaching DeepSpeed's own clipping. Everything here parses flags
or calls the checking functions (no training run); tools/lcm_generate.py's checks are in test_lcm_generate.py."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import PartialState
from accelerate.utils import DistributedType

import train_bk_sdm_kd as bk
import train_dreambooth_lora as db
import train_lcm_distill_lora_sd_wds as lcm_lora
import train_lcm_distill_sd_wds as lcd
from conftest import rejection_line


def flags_for(module, assets, output_dir):
    if module is db:
        return ["--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_data_dir", assets["images"],
                "--instance_prompt", "a photo of sks", "--output_dir", str(output_dir)]
    data = ["--train_data_dir", assets["images"]] if module is bk else ["--train_shards_path_or_url", assets["shards"]]
    return ["--pretrained_teacher_model", assets["tiny-sd"], *data, "--output_dir", str(output_dir),
            "--max_train_steps", "1", "--resolution", "64"]


# ---- --push_to_hub: the upload at the end must be possible, known at the start ----------------------------


@pytest.mark.parametrize("module", [lcd, lcm_lora, bk, db], ids=lambda m: m.__name__)
def test_push_to_hub_offline_is_refused_before_anything(module, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = rejection_line(module, flags_for(module, assets, tmp_path / "out") + ["--push_to_hub"], capsys)
    assert line.endswith("error: --push_to_hub: the Hub is offline here (HF_HUB_OFFLINE is set); unset it, or train "
                         "without --push_to_hub and upload the output dir afterwards (`hf upload`)")
    assert not (tmp_path / "out").exists()  # refused before the output dir is even locked


def test_push_to_hub_needs_a_token_and_a_repository(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(lcd, "get_token", lambda: None)
    calls = []

    def create_repo(repo_id, exist_ok, token):
        calls.append((repo_id, exist_ok, token))
        raise RuntimeError("403 Forbidden: You don't have the rights to create a model under the namespace 'org'\n"
                           "(request id ...)")

    monkeypatch.setattr(lcd, "create_repo", create_repo)
    flags = flags_for(lcd, assets, tmp_path / "my-lcm") + ["--push_to_hub"]
    assert rejection_line(lcd, flags, capsys).endswith(
        "error: --push_to_hub needs a Hub token: log in with `hf auth login` (or set HF_TOKEN)")
    assert calls == []
    flags += ["--hub_token", "hf_test", "--hub_model_id", "org/my-lcm"]
    assert rejection_line(lcd, flags, capsys).endswith(
        "error: --push_to_hub: cannot create the Hub repository org/my-lcm: 403 Forbidden: You don't have the rights "
        "to create a model under the namespace 'org'")
    assert calls == [("org/my-lcm", True, "hf_test")] and not (tmp_path / "my-lcm").exists()

    monkeypatch.setattr(lcd, "create_repo", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RANK", "1")  # only the main process creates the repository
    lcd.OutputDirLock.release_all()
    lcd.parse_args(flags)
    assert len(calls) == 1
    monkeypatch.setenv("RANK", "0")
    lcd.parse_args(flags)
    assert calls[-1] == {"repo_id": "org/my-lcm", "exist_ok": True, "token": "hf_test"}
    lcd.OutputDirLock.release_all()


# ---- --report_to: a tracker that would silently not track ------------------------------------------------


@pytest.mark.parametrize("report_to, message", [
    ("tensorbord", "--report_to: unknown tracker 'tensorbord'; accelerate knows aim, comet_ml, mlflow, tensorboard, "
                   "wandb, "),
    ("comet_ml", "--report_to comet_ml: comet_ml is not installed (pip install comet_ml); installed trackers: "
                 "tensorboard, wandb"),
    ("tensorboard,mlflow", "--report_to mlflow: mlflow is not installed (pip install mlflow); installed trackers: "),
])
def test_report_to_a_tracker_that_would_not_track(report_to, message, assets, tmp_path, capsys, monkeypatch):
    real_find_spec = lcd.importlib.util.find_spec
    missing = {"comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio"}
    monkeypatch.setattr(lcd.importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real_find_spec(name, *a))
    flags = flags_for(lcd, assets, tmp_path / "out") + ["--report_to", report_to]
    assert message in rejection_line(lcd, flags, capsys)


# ---- --num_ddim_timesteps: the DDIM grid must fit the teacher's schedule ----------------------------------


def test_num_ddim_timesteps_beyond_the_teachers_schedule(assets, tmp_path, capsys):
    """Before: an IndexError ('index -1 is out of bounds') at the DDIM solver, after the models loaded."""
    teacher = tmp_path / "teacher-40-steps"
    teacher.mkdir()
    for entry in Path(assets["tiny-sd"]).iterdir():
        if entry.name != "scheduler":
            (teacher / entry.name).symlink_to(entry)
    (teacher / "scheduler").mkdir()
    config = json.loads((Path(assets["tiny-sd"]) / "scheduler" / "scheduler_config.json").read_text())
    (teacher / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": 40}))
    for module in (lcd, lcm_lora):
        flags = flags_for(module, assets, tmp_path / module.__name__) + ["--num_ddim_timesteps", "50"]
        flags[flags.index("--pretrained_teacher_model") + 1] = str(teacher)
        assert rejection_line(module, flags, capsys).endswith(
            "error: --num_ddim_timesteps 50 exceeds the teacher's 40 training timesteps (num_train_timesteps of its "
            "scheduler); use at most 40")
        module.OutputDirLock.release_all()  # parsing took the output dir's lock before the LCD checks
    # a Hub teacher's schedule is known once it loads: the same line, before the DDIM solver is built
    from diffusers import DDPMScheduler

    args = SimpleNamespace(num_ddim_timesteps=50)
    with pytest.raises(SystemExit, match=r"^error: --num_ddim_timesteps 50 exceeds the teacher's 40 training"):
        lcd.make_lcd_context(args, DDPMScheduler(num_train_timesteps=40), None, None, None, w_embedding_dim=0,
                             device="cpu", autocast=None)


# ---- DeepSpeed clips at --max_grad_norm -------------------------------------------------------------------


@pytest.mark.parametrize("from_launcher, flag", [(None, 0.25), (1.0, 0.25), (0.5, 0.0)])
def test_max_grad_norm_becomes_deepspeeds_gradient_clipping(from_launcher, flag, caplog):
    """DeepSpeed clips inside its own step at its config's gradient_clipping (accelerate fills an unset one with
    1.0); accelerator.clip_grad_norm_ does nothing there. Before, --max_grad_norm was silently ignored."""
    from accelerate.utils import DeepSpeedPlugin

    PartialState()  # accelerate's logger needs one
    plugin = DeepSpeedPlugin(zero_stage=2, gradient_clipping=from_launcher)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    args = SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=flag)
    with caplog.at_level(logging.WARNING):
        lcd.configure_deepspeed(accelerator, args)
    config = plugin.deepspeed_config
    assert config["gradient_clipping"] == flag  # 0: DeepSpeed does not clip
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (2, 6)
    replaced = f"--max_grad_norm {flag} replaces gradient_clipping {from_launcher} of the DeepSpeed config"
    assert (replaced in caplog.text) == (from_launcher is not None)
