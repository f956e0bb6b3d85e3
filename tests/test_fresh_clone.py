"""What a new user meets on a fresh clone (issue 21): a quiet one-line start-up error, a warning when the resolution
is far from the teacher's, the toy teachers' own validation prompts, model cards that state a fixed omega and the
precision in words, loader workers that fit the shards, lcm_generate's defaults fitting the demo student.

All cheap: flag parsing and `start_run` in this process, pure functions, and one `accelerate launch` that stops
at its flags."""

import importlib
import json
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
    w_min, w_max = (set(map(float, re.findall(rf"--{flag} (\S+)", demo))) for flag in ("w_min", "w_max"))
    args = lcm_generate.parse_args(["--teacher", TOY_SD, "--unet", "unet_target"])
    assert w_min == w_max == {args.guidance_scale - 1}  # the one omega the demo trains both students at
    assert args.prompt in toy_world.full_prompts()
    # one thread per process, and the launcher's own traceback off, as the README advises
    assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in demo and "accelerate.commands.launch --quiet" in demo


def test_demo_trains_lcd_and_pcm_students_side_by_side_and_compares_both():
    """The demo's plan, read from demo.sh: two trainings in the background (LCD on N = 10, PCM on N = 8 in 4 phases,
    so that 1, 2 and 4 steps land on phase edges), both waited for and a failure named, then one comparison of
    both students with the sampler each was trained for."""
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert re.search(r"^distil lcd \S+ --num_ddim_timesteps 10$", demo, re.M)
    assert re.search(r"^distil pcm \S+ --num_ddim_timesteps 8 --num_phases 4$", demo, re.M)
    assert '--validation_prompts "a red circle" "a blue square" --seed 0 "$@" >"$OUT/$name.log" 2>&1 &' in demo
    assert "wait -n" in demo and 'echo "error: the $name student\'s training failed' in demo
    assert '--student "LCD student=$OUT/lcd:lcm" --student "PCM student=$OUT/pcm:tcd"' in demo
    for override in ("DEMO_STEPS", "DEMO_LCD_STEPS", "DEMO_PCM_STEPS", "DEMO_SEEDS_PER_PROMPT"):
        assert "${" + override + ":-" in demo
    assert "HF_HUB_OFFLINE=1" in demo


def test_comparison_tool_draws_teacher_lcd_and_pcm_rows_with_intervals(tmp_path, capsys):
    """toy_lcm_compare.py with two students, on 12 samples: the picture has a row per model and step count (the
    teacher's 50-step reference, then teacher / LCD / PCM at 1, 2 and 4 steps), and the metrics JSON every row with
    its 95% intervals plus each student's paired difference against the teacher's DDIM. The students are the toy
    teacher's own UNet laid out as training outputs, each with the scheduler its training saves (which picks the
    sampler and the DDIM grid)."""
    import toy_lcm_compare
    from diffusers import LCMScheduler, TCDScheduler
    from PIL import Image

    for name, scheduler in (("lcd", LCMScheduler.from_pretrained(TOY_SD, subfolder="scheduler",
                                                                 original_inference_steps=10)),
                            ("pcm", TCDScheduler.from_pretrained(TOY_SD, subfolder="scheduler",
                                                                 original_inference_steps=8))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "unet_target").symlink_to(TOY_TEACHERS / "toy-sd" / "unet")
        scheduler.save_pretrained(tmp_path / name / "scheduler")
    picture, metrics = tmp_path / "comparison.png", tmp_path / "metrics.json"
    assert toy_lcm_compare.main(["--teacher", TOY_SD, "--student", f"LCD student={tmp_path / 'lcd'}",
                                 "--student", f"PCM student={tmp_path / 'pcm'}", "--seeds_per_prompt", "1",
                                 "--output", str(picture), "--metrics_json", str(metrics)]) == 0
    prompts = toy_lcm_compare.PICTURE_PROMPTS
    assert Image.open(picture).size == toy_lcm_compare.picture_size(10, 4, len(prompts))
    result = json.loads(metrics.read_text())
    assert result["samples"] == 12
    assert [(r["model"], r["sampler"], r["steps"]) for r in result["rows"]] == [
        ("teacher", "ddim", 1), ("teacher", "ddim", 2), ("teacher", "ddim", 4), ("teacher", "ddim", 50),
        ("LCD student", "lcm", 1), ("LCD student", "lcm", 2), ("LCD student", "lcm", 4),
        ("PCM student", "tcd", 1), ("PCM student", "tcd", 2), ("PCM student", "tcd", 4)]
    for row in result["rows"]:
        for key in ("accuracy", "distance"):
            low, high = row[f"{key}_interval"]
            assert low <= row[key] <= high, row
    assert result["rows"][3]["distance"] == 0  # the 50-step reference itself
    assert [(p["model"], p["steps"]) for p in result["paired_differences"]] == [
        (name, steps) for name in ("LCD student", "PCM student") for steps in (1, 2, 4)]
    by_row = {(r["model"], r["steps"]): r for r in result["rows"]}
    for paired in result["paired_differences"]:
        student, teacher = by_row[paired["model"], paired["steps"]], by_row["teacher", paired["steps"]]
        assert paired["accuracy_difference"] == pytest.approx(student["accuracy"] - teacher["accuracy"])
        assert paired["distance_difference"] == pytest.approx(student["distance"] - teacher["distance"])
        for key in ("accuracy_difference", "distance_difference"):
            low, high = paired[f"{key}_interval"]
            assert low <= paired[key] <= high
    # the TCD sampler with eta 0 is deterministic DDIM on the phase edges: with the teacher's own UNet as the "PCM
    # student" it reproduces the teacher's trailing DDIM samples at 1, 2 and 4 steps
    pcm = [p for p in result["paired_differences"] if p["model"] == "PCM student"]
    assert all(abs(p["distance_difference"]) < 1e-4 and p["accuracy_difference"] == 0 for p in pcm), pcm
    printed = capsys.readouterr().out
    assert "| PCM student | tcd | 4 |" in printed and "| model - teacher DDIM | steps |" in printed
    # one-line refusals before any model loads
    for argv, message in ((["--student", "x"], "expected NAME=PATH"),
                          (["--student", f"teacher={tmp_path / 'lcd'}"], "not 'teacher'"),
                          (["--lora", str(tmp_path / "lcd" / "unet_target")], "pass it as --unet"),
                          (["--student", f"a={tmp_path}"], "is not a student")):
        with pytest.raises(SystemExit):
            toy_lcm_compare.parse_args(argv)
        assert message in capsys.readouterr().err


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
