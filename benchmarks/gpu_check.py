#!/usr/bin/env python
"""One-command GPU check of the five training scripts (run it through benchmarks/gpu_check.sh).

On one CUDA GPU, with random-weight pipelines of the real shapes (`sd15`, `sdxl` presets of
tools/make_random_pipeline.py) and toy data it writes itself (WebDataset shards, a DreamBooth instance folder),
it runs every script for a few steps through `accelerate launch`, in the regime users train in: fp16 mixed
precision, real bitsandbytes 8-bit AdamW, gradient checkpointing, and xformers attention when xformers imports
(PyTorch SDPA otherwise). It prints one table row per run: samples/s (median of the steps after the first two)
and the peak `torch.cuda.max_memory_allocated` each script reports at the end of training, and says whether
LCM-LoRA-SDXL at 1024 px, batch 1, fits a 24 GB card. Two more runs, `lcd_sd_inductor` and
`lcm_lora_sd_inductor`, repeat `lcd_sd` and `lcm_lora_sd` through `accelerate launch --dynamo_backend inductor`
(torch.compile of the trained model; the first steps, which compile, are outside the median). `lcd_sd_fsdp`
repeats `lcd_sd` under FSDP 2 (`accelerate launch --config_file configs/fsdp.yaml`, one process; torch's AdamW,
checkpoints every 3 steps): the sharded EMA target's forward, update and gathered save on CUDA with NCCL and
FSDP's mixed precision, which the CPU tests (gloo, fp32) cannot reach; the dry run runs it without FSDP,
which accelerate 1.15 does not start without a GPU. Everything is
offline; the whole check is meant to take under 8 minutes on a current datacentre GPU (the compiled runs come
last, so the time budget skips them first).

`GPU_CHECK_DEVICE=cpu` is a dry run of the same plumbing on tiny pipelines (64 px, 2 steps, fp32, still the
real 8-bit Adam): it proves the data, flags, launches and parsing work, not the numbers.

Environment: GPU_CHECK_DEVICE (cuda | cpu, default cuda), GPU_CHECK_WORK_DIR (default benchmarks/work/gpu_check;
pipelines and data there are reused by a rerun), GPU_CHECK_BUDGET_S (wall-clock budget of all runs, default 480),
GPU_CHECK_ONLY (comma-separated run names, to rerun some), GPU_CHECK_PRECISION (override: no | fp16 | bf16)."""

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

# A "24 GB" card (RTX 3090/4090, L4, A10 are 24 GiB = 24576 MiB) keeps roughly 1 GiB for the CUDA context and
# allocator fragmentation: peak tensor memory must stay under this to train there.
FITS_24GB_GIB = 23.0


def configuration(device):
    """The runs: (name, script, preset, resolution, batch size, extra flags), plus the common settings."""
    if device == "cuda":
        sd, sdxl, sd_res, sdxl_res, steps, batch, precision = "sd15", "sdxl", 512, 1024, 6, 4, "fp16"
    else:  # dry run: the same runs on the tiny presets
        sd, sdxl, sd_res, sdxl_res, steps, batch, precision = "tiny-sd", "tiny-sdxl", 64, 64, 2, 1, "no"
    runs = [
        ("lcm_lora_sdxl", "train_lcm_distill_sdxl_wds.py", sdxl, sdxl_res, 1, ["--use_lora"]),
        ("lcd_sdxl", "train_lcm_distill_sdxl_wds.py", sdxl, sdxl_res, 1, []),
        ("lcd_sd", "train_lcm_distill_sd_wds.py", sd, sd_res, batch, []),
        ("lcm_lora_sd", "train_lcm_distill_lora_sd_wds.py", sd, sd_res, batch, []),
        ("bk_sdm_small", "train_bk_sdm_kd.py", sd, sd_res, batch, ["--unet_config_name", "bk_small"]),
        ("dreambooth_lora", "train_dreambooth_lora.py", sd, sd_res, max(1, batch // 2), []),
        # issue 15, each against the row above it of the same script: fused AdamW (no 8-bit Adam), channels-last
        # UNets, and BK-SDM on shards of latents precomputed by tools/precompute_latents.py
        ("lcd_sd_fused_adamw", "train_lcm_distill_sd_wds.py", sd, sd_res, batch, []),
        ("lcd_sd_channels_last", "train_lcm_distill_sd_wds.py", sd, sd_res, batch, ["--channels_last"]),
        ("bk_sdm_small_precomputed", "train_bk_sdm_kd.py", sd, sd_res, batch, ["--unet_config_name", "bk_small"]),
        # issue 23: BK-SDM's SDXL students (SSD-1B, Segmind-Vega) of an SDXL teacher, at 1024 px
        ("bk_sdm_ssd1b_sdxl", "train_bk_sdm_kd.py", sdxl, sdxl_res, 1, ["--unet_config_name", "ssd-1b"]),
        ("bk_sdm_vega_sdxl", "train_bk_sdm_kd.py", sdxl, sdxl_res, 1, ["--unet_config_name", "vega"]),
        # issue 21: full LCD (its EMA target sharded like the student) under FSDP 2, checkpoints included
        ("lcd_sd_fsdp", "train_lcm_distill_sd_wds.py", sd, sd_res, batch, ["--checkpointing_steps", "3"]),
        # torch.compile through `accelerate launch --dynamo_backend inductor`, to compare with lcd_sd / lcm_lora_sd
        # (last: their compile takes minutes, and the time budget skips them first)
        ("lcd_sd_inductor", "train_lcm_distill_sd_wds.py", sd, sd_res, batch, []),
        ("lcm_lora_sd_inductor", "train_lcm_distill_lora_sd_wds.py", sd, sd_res, batch, []),
    ]
    # fp16 without autocast (a CPU) is the DeepSpeed regime: GPU_CHECK_PRECISION=fp16 tries it in the dry run
    return runs, {"steps": steps, "precision": os.environ.get("GPU_CHECK_PRECISION", precision)}


def xformers_works():
    """xformers is used only when its ops import (a wheel built for another torch fails here, not mid-run)."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        importlib.import_module("xformers.ops")
    except Exception as error:  # a broken build is a reason to fall back to SDPA, not to stop the check
        print(f"xformers present but unusable ({type(error).__name__}: {error}); using PyTorch SDPA")
        return False
    return True


def build_assets(work_dir, device, presets):
    """Pipelines (built on the GPU when there is one: random init of 3.5B parameters is seconds there), toy
    shards and a DreamBooth instance folder; anything already in `work_dir` is reused."""
    import torch
    from make_random_pipeline import build_pipeline
    from make_toy_dataset import make_toy_dataset
    from make_wds_shards import make_shards

    assets = {}
    for preset in presets:
        path = work_dir / "pipelines" / preset
        if not (path / "model_index.json").is_file():
            started = time.perf_counter()
            shutil.rmtree(path, ignore_errors=True)
            with torch.device(device):
                build_pipeline(preset, str(path), seed=0)
            print(f"built {preset} in {time.perf_counter() - started:.0f}s")
        assets[preset] = str(path)
    if device == "cuda":
        torch.cuda.empty_cache()  # the built models went to the meta device: give their memory to the runs
    images, shards = work_dir / "data" / "images", work_dir / "data" / "shards"
    if not list(shards.glob("shard-*.tar")):
        shutil.rmtree(work_dir / "data", ignore_errors=True)
        make_toy_dataset(str(images), num_images=64, seed=0, captions="jsonl")
        make_shards(str(images), str(shards), samples_per_shard=8)
    assets["shards"] = str(shards / f"shard-{{00000..{len(list(shards.glob('shard-*.tar'))) - 1:05d}}}.tar")
    instance = work_dir / "data" / "instance"
    if not instance.is_dir():
        instance.mkdir(parents=True)
        for png in sorted(images.glob("*.png"))[:4]:
            shutil.copy(png, instance / png.name)
    assets["instance"] = str(instance)
    return assets


def script_flags(script, teacher, resolution, batch, steps, assets, output_dir):
    """Flags of one short run: no validation, no checkpoint, no tracker (nothing but the training steps and
    the final save)."""
    common = ["--output_dir", output_dir, "--resolution", resolution, "--train_batch_size", batch,
              "--max_train_steps", steps, "--checkpointing_steps", 100000, "--seed", 0, "--report_to", "none"]
    if script == "train_dreambooth_lora.py":
        return common + ["--pretrained_model_name_or_path", teacher, "--instance_data_dir", assets["instance"],
                         "--instance_prompt", "a photo of sks circle"]
    return common + ["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", assets["shards"],
                     "--dataloader_num_workers", 2, "--shuffle_buffer_size", 8, "--validation_prompts"]


def run_flags(run, common, assets, output_dir, attention):
    """All flags of one run of `configuration`: the users' memory-saving regime on top of `script_flags`."""
    name, script, preset, resolution, batch, extra = run
    flags = script_flags(script, assets[preset], resolution, batch, common["steps"], assets, output_dir)
    if name.endswith("_precomputed"):
        flags[flags.index("--train_shards_path_or_url") + 1] = assets["precomputed"]
    flags += extra + ["--mixed_precision", common["precision"], "--gradient_checkpointing"]
    flags += ["--use_8bit_adam"] if uses_8bit_adam(name) else []
    if attention == "xformers":
        flags.append("--enable_xformers_memory_efficient_attention")
    return flags


def parse_run(log):
    """samples/s after the warm-up steps, and the peak memory line, from a script's tqdm and log output."""
    per_step = {}
    for match in re.finditer(r"(\d+)/\d+ \[[^\]\r\n]*samples_s=([\d.]+)", log):
        per_step[int(match.group(1))] = float(match.group(2))  # the last refresh of a step carries its value
    steady = [value for step, value in sorted(per_step.items()) if step > 2] or list(per_step.values())
    peak = re.findall(r"peak GPU memory: ([\d.]+) GiB", log)
    return (statistics.median(steady) if steady else None), (float(peak[-1]) if peak else None)


def failure_line(log):
    """The script's own last message: the launcher's traceback (CalledProcessError) that follows it says nothing."""
    lines = [line for line in log.splitlines() if line.strip() and not line[0].isspace()
             and not line.startswith("Traceback") and "CalledProcessError" not in line]
    return lines[-1] if lines else "(no output)"


def uses_8bit_adam(name):
    """Every run trains with 8-bit AdamW but the `*_fused_adamw` ones (torch's fused AdamW on CUDA) and the
    `*_fsdp` ones (bitsandbytes does not step FSDP's sharded DTensor parameters)."""
    return not name.endswith(("_fused_adamw", "_fsdp"))


def launcher_flags(name, device):
    """`accelerate launch` flags of a run beyond the common ones: the `*_fsdp` runs read configs/fsdp.yaml (on
    a GPU; without one accelerate does not start FSDP, so the dry run trains without it)."""
    if name.endswith("_fsdp") and device == "cuda":
        return ["--config_file", str(REPO / "configs" / "fsdp.yaml")]
    return []


def precompute_latents(work_dir, assets, preset, resolution, device):
    """Shards of the toy data's latents for the `*_precomputed` runs (tools/precompute_latents.py, reused)."""
    out = work_dir / "data" / f"latents-{preset}-{resolution}"
    if not list(out.glob("latents-*.tar")):
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "tools" / "precompute_latents.py"), "--pretrained_model_name_or_path",
                        assets[preset], "--train_shards_path_or_url", assets["shards"], "--output_dir", str(out),
                        "--resolution", str(resolution), "--samples_per_shard", "8", "--device", device],
                       check=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    count = len(list(out.glob("latents-*.tar")))
    return str(out / f"latents-{{000000..{count - 1:06d}}}.tar")


def dynamo_backend(name):
    """The launcher's --dynamo_backend of a run: the `*_inductor` runs train the torch.compile'd model."""
    return "inductor" if name.endswith("_inductor") else "no"


def launch(script, flags, device, precision, timeout, backend="no", launcher=()):
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", backend]
    command += ["--cpu"] if device == "cpu" else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               # a user's accelerate config (several GPUs, DeepSpeed) must not change what this check measures
               ACCELERATE_CONFIG_FILE=str(REPO / "benchmarks" / "no_accelerate_config.yaml"))
    return subprocess.run(command + [str(REPO / script)] + [str(f) for f in flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def main():
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    if device not in ("cuda", "cpu"):
        raise SystemExit(f"GPU_CHECK_DEVICE must be cuda or cpu, not {device!r}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or GPU_CHECK_DEVICE=cpu for the dry run")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("bitsandbytes is not installed: the check runs the real 8-bit Adam (see benchmarks/README)")
    work_dir = Path(os.environ.get("GPU_CHECK_WORK_DIR", REPO / "benchmarks" / "work" / "gpu_check"))
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", 480))
    only = {n for n in os.environ.get("GPU_CHECK_ONLY", "").split(",") if n}
    started = time.perf_counter()
    runs, common = configuration(device)
    runs = [run for run in runs if not only or run[0] in only]
    attention = "xformers" if device == "cuda" and xformers_works() else "sdpa"
    assets = build_assets(work_dir, device, sorted({run[2] for run in runs}))
    for _name, _script, preset, resolution, _batch, _extra in (r for r in runs if r[0].endswith("_precomputed")):
        assets["precomputed"] = precompute_latents(work_dir, assets, preset, resolution, device)
    hardware = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run: plumbing only)"
    import bitsandbytes
    import diffusers

    header = (f"{hardware}; torch {torch.__version__}, diffusers {diffusers.__version__}, bitsandbytes "
              f"{bitsandbytes.__version__}; mixed precision {common['precision']}, 8-bit AdamW, gradient "
              f"checkpointing, attention {attention}; {common['steps']} steps per run")
    print(header, flush=True)
    results = []
    for name, script, preset, resolution, batch, extra in runs:
        left = budget - (time.perf_counter() - started)
        row = {"run": name, "script": script, "preset": preset, "resolution": resolution, "batch": batch}
        results.append(row)
        if left < 30:
            row["status"] = "skipped: time budget spent"
            continue
        output_dir = work_dir / "runs" / name
        shutil.rmtree(output_dir, ignore_errors=True)
        flags = run_flags((name, script, preset, resolution, batch, extra), common, assets, output_dir, attention)
        run_started = time.perf_counter()
        try:
            result = launch(script, flags, device, common["precision"], timeout=left, backend=dynamo_backend(name),
                            launcher=launcher_flags(name, device))
            log = result.stdout + result.stderr
            ok = result.returncode == 0
        except subprocess.TimeoutExpired as timeout:
            parts = [part.decode(errors="replace") if isinstance(part, bytes) else part
                     for part in (timeout.stdout, timeout.stderr) if part]
            log, ok = "".join(parts), False
            row["status"] = f"timed out after {left:.0f}s"
        row["wall_s"] = round(time.perf_counter() - run_started, 1)
        (work_dir / "runs").mkdir(parents=True, exist_ok=True)
        (work_dir / "runs" / f"{name}.log").write_text(log)
        row["samples_per_s"], row["peak_gib"] = parse_run(log)
        if ok:
            row["status"] = "ok"
        elif "status" not in row:
            row["status"] = f"failed ({result.returncode}): {failure_line(log)[:150]}"
        print(f"{name}: {row['status']} in {row['wall_s']}s", flush=True)

    def cell(value, fmt):
        return format(value, fmt) if value is not None else "n/a"

    lines = [header, "", "| run | script | preset | px | batch | samples/s | peak GiB allocated | wall s | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        lines.append(f"| {row['run']} | {row['script']} | {row['preset']} | {row['resolution']} | {row['batch']} | "
                     f"{cell(row.get('samples_per_s'), '.2f')} | {cell(row.get('peak_gib'), '.2f')} | "
                     f"{cell(row.get('wall_s'), '.0f')} | {row['status']} |")
    lora_xl = next((row for row in results if row["run"] == "lcm_lora_sdxl"), None)
    if lora_xl is None or lora_xl.get("peak_gib") is None:
        verdict = "LCM-LoRA-SDXL fits in 24 GB: unknown (no CUDA peak measured)"
    else:
        fits = lora_xl["peak_gib"] <= FITS_24GB_GIB
        verdict = (f"LCM-LoRA-SDXL at {lora_xl['resolution']} px, batch {lora_xl['batch']}, fits in 24 GB: "
                   f"{'yes' if fits else 'no'} (peak {lora_xl['peak_gib']:.2f} GiB allocated; limit taken as "
                   f"{FITS_24GB_GIB} GiB, leaving ~1 GiB of a 24 GiB card for the CUDA context)")
    lines += ["", verdict, f"total {time.perf_counter() - started:.0f}s; logs in {work_dir / 'runs'}"]
    table = "\n".join(lines)
    print("\n" + table)
    (work_dir / "gpu_check.md").write_text(table + "\n")
    (work_dir / "gpu_check.json").write_text(json.dumps({"header": header, "runs": results, "verdict": verdict},
                                                        indent=2))
    return 0 if all(row["status"] == "ok" for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
