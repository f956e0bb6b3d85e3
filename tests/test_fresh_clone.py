"""What a new user meets on a fresh clone (issue 21): a quiet one-line start-up error, a warning when the resolution
is far from the teacher's, the toy teachers' own validation prompts, model cards that state a fixed omega and the
precision in words, loader workers that fit the shards, lcm_generate's defaults fitting the demo student.

All cheap: flag parsing and `start_run` in this process, pure functions, and one `accelerate launch` that stops
at its flags."""

import importlib
import re
import subprocess
import sys
import types

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType

import toy_world
from conftest import REPO, TOY_TEACHERS, launch_env

SHARD_SCRIPTS = ["train_lcm_distill_sd_wds", "train_lcm_distill_lora_sd_wds", "train_lcm_distill_sdxl_wds",
                 "train_bk_sdm_kd"]
TOY_SD, TOY_SDXL = str(TOY_TEACHERS / "toy-sd"), str(TOY_TEACHERS / "toy-sdxl")


def script_flags(name, assets, output_dir):
    """The least a script needs to parse, on the toy teacher of its kind, at its default --resolution."""
    if name == "train_dreambooth_lora":
        return ["--pretrained_model_name_or_path", TOY_SD, "--instance_data_dir", assets["images"],
                "--instance_prompt", "a sks square", "--output_dir", output_dir, "--max_train_steps", "1"]
    teacher = TOY_SDXL if name == "train_lcm_distill_sdxl_wds" else TOY_SD
    return ["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", assets["shards"],
            "--output_dir", output_dir, "--max_train_steps", "1"]


def parse(module, flags):
    return module.parse_args([str(flag) for flag in flags])


@pytest.fixture
def fresh_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("name", SHARD_SCRIPTS + ["train_dreambooth_lora"])
def test_start_up_warns_once_when_resolution_is_far_from_the_teachers(name, assets, tmp_path, caplog,
                                                                     fresh_accelerate):
    module = importlib.import_module(name)
    try:
        args = parse(module, script_flags(name, assets, tmp_path / "out"))
        assert args.resolution >= 512  # the script's default: 16x (SDXL's 1024: 32x) the toy teacher's 32 px
        with caplog.at_level("WARNING"):
            accelerator = module.start_run(args)
        warnings = [re.sub(r"^\[RANK 0\] ", "", r.getMessage()) for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings
        assert warnings[0].startswith(f"--resolution {args.resolution} is far from the 32 px that --"), warnings[0]
        assert warnings[0].endswith("pass --resolution 32 unless that is intended")
        # the precision in effect is what the model card reports (the flag was not given)
        assert args.mixed_precision == accelerator.mixed_precision == "no"
    finally:
        module.OutputDirLock.release_all()
    # at the teacher's size, and for a folder without configs (a Hub id's), nothing to say
    assert module.resolution_warning(TOY_SD, 32) is None and module.resolution_warning(TOY_SD, 64) is None
    assert module.resolution_warning("org/some-model", 4096) is None
    assert "costs about" not in module.resolution_warning(TOY_SD, 8)  # too small: another warning


def test_toy_teachers_validate_with_their_own_prompts(assets, tmp_path):
    import make_toy_teacher
    from transformers import CLIPTokenizer

    lcd = importlib.import_module("train_lcm_distill_sd_wds")
    sdxl = importlib.import_module("train_lcm_distill_sdxl_wds")
    own = toy_world.validation_prompts()
    try:
        assert parse(lcd, script_flags("train_lcm_distill_sd_wds", assets, tmp_path / "a")).validation_prompts == own
        assert parse(sdxl, script_flags("train_lcm_distill_sdxl_wds", assets, tmp_path / "b")).validation_prompts == own
        other = ["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
                 "--max_train_steps", "1"]
        assert parse(lcd, other + ["--output_dir", tmp_path / "c"]).validation_prompts == lcd.DEFAULT_VALIDATION_PROMPTS
        assert parse(lcd, other + ["--output_dir", tmp_path / "d", "--validation_prompts"]).validation_prompts == []
    finally:
        lcd.OutputDirLock.release_all()
        sdxl.OutputDirLock.release_all()
    # every colour and shape, each prompt within the toy tokenizer's 8 tokens (no truncation warning)
    assert {p.split()[1] for p in own} == set(toy_world.TEACHER_COLORS)
    assert {p.split()[2] for p in own} == set(toy_world.SHAPES)
    for teacher in (TOY_SD, TOY_SDXL):
        tokenizer = CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer")
        assert all(len(tokenizer(p).input_ids) <= tokenizer.model_max_length for p in own)
    # the committed teachers carry what the builder writes
    make_toy_teacher.write_validation_prompts(str(tmp_path))
    for teacher in ("toy-sd", "toy-sdxl"):
        assert (TOY_TEACHERS / teacher / "validation_prompts.txt").read_text() == (
            tmp_path / "validation_prompts.txt").read_text()


@pytest.mark.parametrize("name,extra", [("train_lcm_distill_sd_wds", []), ("train_lcm_distill_lora_sd_wds", []),
                                        ("train_lcm_distill_sdxl_wds", []),
                                        ("train_lcm_distill_sdxl_wds", ["--use_lora"])])
def test_model_card_states_a_fixed_omega_and_the_precision_in_words(name, extra, assets, tmp_path):
    module = importlib.import_module(name)
    cards = {}
    try:
        for omega in ("3", None):
            flags = script_flags(name, assets, tmp_path / f"out-{omega}") + extra
            flags += ["--w_min", omega, "--w_max", omega] if omega else ["--w_min", "5", "--w_max", "15"]
            args = parse(module, flags)
            args.mixed_precision = "no"  # as start_run records it
            cards[omega] = module.model_card_text(args, "repo")
    finally:
        module.OutputDirLock.release_all()
    fixed, ranged = cards["3"], cards[None]
    assert "| mixed precision | no (fp32) |" in fixed and "None" not in fixed
    assert "between 4.0 and 4.0" not in fixed and "[3.0, 3.0]" not in fixed
    assert "omega = 3.0" in fixed and "omega in [5.0, 15.0]" in ranged
    if name == "train_lcm_distill_sd_wds" or name == "train_lcm_distill_sdxl_wds" and not extra:
        # a full student (omega is its input): the advice and the inference example stay inside the trained range
        assert "so use `guidance_scale` 4.0." in fixed and "guidance_scale=4.0)" in fixed
        assert "so use `guidance_scale` between 6.0 and 16.0." in ranged and "guidance_scale=8.0)" in ranged


def test_default_loader_workers_fit_the_shards_and_the_fix_is_named(assets, tmp_path, monkeypatch):
    lcd = importlib.import_module("train_lcm_distill_sd_wds")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert [lcd.default_loader_workers(n) for n in (1, 2, 3, 4, 100)] == [1, 2, 3, 4, 4]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert [lcd.default_loader_workers(n) for n in (2, 8, 12, 64)] == [1, 2, 3, 4]
    monkeypatch.delenv("WORLD_SIZE")
    try:  # the tiny test data has 2 shards: 2 workers by default, and the resume topology records them
        args = parse(lcd, script_flags("train_lcm_distill_sd_wds", assets, tmp_path / "out"))
    finally:
        lcd.OutputDirLock.release_all()
    assert args.dataloader_num_workers == 2
    assert lcd.stream_topology(args, 1)["--dataloader_num_workers"] == 2
    # an explicit count that does not fit: the error names one that does
    stream = lcd.ShardStream([assets["shard_paths"][0]], batch_size=1, transform=lcd.ImageTransform(32))
    with pytest.raises(lcd.DataError, match=r"1 shard\(s\) for 2 readers .* pass --dataloader_num_workers 1"):
        next(stream._samples(0, 2, None, lcd.new_data_counts()))


def test_unwrap_peels_wrappers_without_asking_accelerate_outside_deepspeed():
    lcd = importlib.import_module("train_lcm_distill_sd_wds")

    def refuse(*_, **__):
        raise AssertionError("accelerate's unwrap_model imports DeepSpeed")

    model = torch.nn.Linear(2, 2)
    plain = types.SimpleNamespace(distributed_type=DistributedType.NO, unwrap_model=refuse)
    assert lcd.unwrap(plain, model) is model
    assert lcd.unwrap(plain, torch.compile(model, backend="eager")) is model
    assert lcd.unwrap(plain, torch.compile(torch.nn.DataParallel(model), backend="eager")) is model
    deepspeed = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                      unwrap_model=lambda m, keep_torch_compile: ("accelerate", m))
    assert lcd.unwrap(deepspeed, model) == ("accelerate", model)


def test_lcm_generate_defaults_fit_the_demo_student():
    import lcm_generate

    demo = (REPO / "scripts" / "demo.sh").read_text()
    w_min, w_max = (float(re.search(rf"--{flag} (\S+)", demo).group(1)) for flag in ("w_min", "w_max"))
    args = lcm_generate.parse_args(["--teacher", TOY_SD, "--unet", "unet_target"])
    assert w_min == w_max and args.guidance_scale == w_min + 1  # the omega the demo trains
    assert args.prompt in toy_world.full_prompts()
    # one thread per process, and the launcher's own traceback off, as the README advises
    assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in demo and "accelerate.commands.launch --quiet" in demo


def test_start_up_error_through_accelerate_launch_is_one_line(tmp_path):
    """A bad flag through `accelerate launch`, as a user starts it: the script's one line and nothing else (no
    notices of the imported libraries; the launcher's values passed and its traceback off with --quiet)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "train_lcm_distill_sd_wds.py"), "--pretrained_teacher_model", TOY_SD,
               "--train_shards_path_or_url", str(tmp_path / "missing-{000..003}.tar"),
               "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 1
    assert lines == [f"train_lcm_distill_sd_wds.py: error: --train_shards_path_or_url: shard not found: "
                     f"{tmp_path / 'missing-000.tar'} (and 3 more)"], lines
