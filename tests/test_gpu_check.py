"""benchmarks/gpu_check.py without running it (the dry run, GPU_CHECK_DEVICE=cpu, takes minutes): every run's
flags, GPU and dry configuration, are accepted by its script, and the numbers are read from the logs as the
scripts write them."""

import importlib
import importlib.util
from pathlib import Path

import pytest

from conftest import REPO, build_pipeline

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_run_parses_with_the_memory_saving_flags(assets, tmp_path, device):
    runs, common = gpu_check.configuration(device)
    scripts = {p.name for p in REPO.glob("train_*.py")}
    assert {run[1] for run in runs} == scripts, (
        f"benchmarks/gpu_check.py configuration() runs {sorted({run[1] for run in runs})} but the repository has "
        f"{sorted(scripts)}: a script added or removed needs its row(s) there (name, script, preset, resolution, "
        "batch, flags), and this test's per-row expectations updated")
    assert [run[0] for run in runs if "--use_lora" in run[5]] == ["lcm_lora_sdxl"]
    # the torch.compile rows repeat an eager row with only the launcher's --dynamo_backend changed
    compiled = {run[0]: run for run in runs if gpu_check.dynamo_backend(run[0]) == "inductor"}
    assert sorted(compiled) == ["lcd_sd_inductor", "lcm_lora_sd_inductor"]
    eager = {run[0]: run for run in runs if gpu_check.dynamo_backend(run[0]) == "no"}
    assert all(run[1:] == eager[name.removesuffix("_inductor")][1:] for name, run in compiled.items())
    # the FSDP row: full LCD through the shipped FSDP config on a GPU (accelerate starts no FSDP without one)
    assert [run[0] for run in runs if gpu_check.launcher_flags(run[0], "cuda")] == ["lcd_sd_fsdp"]
    assert gpu_check.launcher_flags("lcd_sd_fsdp", "cuda") == ["--config_file", str(REPO / "configs" / "fsdp.yaml")]
    assert gpu_check.launcher_flags("lcd_sd_fsdp", "cpu") == []
    instance = tmp_path / "instance"
    instance.mkdir()
    for png in sorted(Path(assets["images"]).glob("*.png"))[:2]:
        (instance / png.name).write_bytes(png.read_bytes())
    # the tiny pipelines of the same kind stand in for the real-size presets
    tiny_sdxl = build_pipeline("tiny-sdxl", str(tmp_path / "tiny-sdxl"), seed=0)
    paths = {"sd15": assets["tiny-sd"], "tiny-sd": assets["tiny-sd"], "sdxl": tiny_sdxl, "tiny-sdxl": tiny_sdxl}
    paths.update(shards=assets["shards"], instance=str(instance), precomputed=assets["shard_paths"][0])
    for run in runs:
        flags = gpu_check.run_flags(run, common, paths, tmp_path / run[0], "sdpa")
        module = importlib.import_module(Path(run[1]).stem)
        args = module.parse_args([str(f) for f in flags])
        assert args.use_8bit_adam == (run[0] not in ("lcd_sd_fused_adamw", "lcd_sd_fsdp"))
        assert args.gradient_checkpointing and args.report_to == "none"
        assert args.channels_last == (run[0] == "lcd_sd_channels_last")
        if run[0].endswith("_precomputed"):
            assert args.train_shards_path_or_url == paths["precomputed"]
        assert args.max_train_steps == common["steps"] and args.train_batch_size == run[4]
        assert args.mixed_precision == common["precision"]
        assert not args.enable_xformers_memory_efficient_attention
        assert getattr(args, "validation_prompts", []) == [] and getattr(args, "validation_prompt", None) is None
    flags = gpu_check.run_flags(runs[0], common, paths, tmp_path / "x", "xformers")
    assert flags[-1] == "--enable_xformers_memory_efficient_attention"
    if device == "cuda":
        assert common["precision"] == "fp16" and {run[3] for run in runs if "sdxl" in run[1]} == {1024}


def test_log_parsing_takes_steady_state_samples_per_second_and_the_peak_line():
    bar = "steps:  {n}/6 [00:0{n}<00:02,  1.1it/s, loss=0.1, lr=1e-05, samples_s={v}, skipped=0]"
    log = "\r".join(bar.format(n=n, v=v) for n, v in [(1, 0.5), (2, 3.0), (2, 3.9), (3, 4.0), (4, 5.0), (5, 6.0)])
    log += "\n12:00:00 - INFO - __main__ - [RANK 0] peak GPU memory: 17.25 GiB allocated (torch.cuda...)\n"
    assert gpu_check.parse_run(log) == (5.0, 17.25)  # median of steps 3-5; the first two are warm-up
    assert gpu_check.parse_run("no progress") == (None, None)


def test_a_failed_run_is_reported_by_the_scripts_own_last_line():
    log = ("steps: 0/6\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
           "RuntimeError: expected m1 and m2 to have the same dtype\nTraceback (most recent call last):\n"
           "  File \"launch.py\"\n    raise subprocess.CalledProcessError(returncode=1, cmd=cmd)\n"
           "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.\n")
    assert gpu_check.failure_line(log) == "RuntimeError: expected m1 and m2 to have the same dtype"
    assert gpu_check.failure_line("") == "(no output)"
