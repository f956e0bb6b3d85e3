#!/usr/bin/env python
"""Peak memory of every script next to its floor: what the weights, gradients, optimiser state and EMA it must
hold take, computed from parameter counts.

Each run trains a random-weight pipeline of the real shapes (`sd15`, `sdxl` presets of
tools/make_random_pipeline.py) for a few steps through `accelerate launch` (64 px, batch 1, no validation, no
checkpoint), in the precision asked for. The measured peak is the training process's peak RSS on a CPU
(getrusage of the launcher's children: the largest process, i.e. the training one) and the script's own
`torch.cuda.max_memory_allocated` line on a GPU. Off CUDA the peak RSS also holds the Python runtime with torch,
diffusers and transformers imported (the "runtime" column, measured by importing them alone).

The floor of a run, bytes per parameter:
  frozen networks         2 (bf16/fp16) or 4 (fp32: SDXL's own VAE, everything in an fp32 run)
  trained parameters      4 weight + 4 gradient + 8 AdamW state (2 with bitsandbytes 8-bit AdamW)
  EMA / target network    4
  autocast working copy   2 per trained parameter in a mixed-precision run (autocast keeps the half-precision
                          copy of each trained weight for the backward pass); 0 in a run without autocast

    python benchmarks/benchmark_memory.py                        # every run, CPU, bf16
    python benchmarks/benchmark_memory.py --runs lcm_lora_sd15,lcd_sd15_8bit
    python benchmarks/benchmark_memory.py --device cuda          # on a GPU (peak = max_memory_allocated)
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402  (the assets and the flags of a short run are the GPU check's)

# name: (script, preset, extra flags)
RUNS = {
    "lcm_lora_sd15": ("train_lcm_distill_lora_sd_wds.py", "sd15", []),
    "lcd_sd15": ("train_lcm_distill_sd_wds.py", "sd15", []),
    "lcd_sd15_8bit": ("train_lcm_distill_sd_wds.py", "sd15", ["--use_8bit_adam"]),
    "bk_small_sd15": ("train_bk_sdm_kd.py", "sd15", ["--unet_config_name", "bk_small"]),
    "dreambooth_lora_sd15": ("train_dreambooth_lora.py", "sd15", []),
    "lcm_lora_sdxl": ("train_lcm_distill_sdxl_wds.py", "sdxl", ["--use_lora"]),
    "dreambooth_lora_sdxl": ("train_dreambooth_lora.py", "sdxl", []),
    "lcd_sdxl_8bit": ("train_lcm_distill_sdxl_wds.py", "sdxl", ["--use_8bit_adam"]),
    # BK-SDM's SDXL students (the student name last: floor_terms reads it there)
    "bk_ssd1b_sdxl_8bit": ("train_bk_sdm_kd.py", "sdxl", ["--use_8bit_adam", "--unet_config_name", "ssd-1b"]),
    "bk_vega_sdxl_8bit": ("train_bk_sdm_kd.py", "sdxl", ["--use_8bit_adam", "--unet_config_name", "vega"]),
}
# more than this shared 24 GB machine can give one run: full LCD of SDXL (~37 GB), the SSD-1B (~23 GB) and Vega
# (~16 GB) students beside their 2.6B-parameter teacher
DEFAULT_CPU_RUNS = [name for name in RUNS if name not in ("lcd_sdxl_8bit", "bk_ssd1b_sdxl_8bit", "bk_vega_sdxl_8bit")]

# The training process's peak RSS: the launcher and its children are waited for, so RUSAGE_CHILDREN holds the
# largest of them (KiB on Linux).
MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "print(f'PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); sys.exit(code)")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def meta_models(pipeline):
    """The pipeline's networks built on the meta device from their configs (parameter counts, no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(pipeline, subfolder="unet")),
                  "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(pipeline, subfolder="vae"))}
        for name, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (Path(pipeline) / name).is_dir():
                models[name] = model_class(CLIPTextConfig.from_pretrained(pipeline, subfolder=name))
    return models


def floor_terms(run, pipeline, half, assets):
    """{term: bytes} of the floor of `run` (see the module docstring); `half` is False for an fp32 run."""
    import torch

    script, preset, extra = RUNS[run]
    frozen_bytes = 2 if half else 4
    adam_bytes = 2 if "--use_8bit_adam" in extra else 8
    models = meta_models(pipeline)
    text_encoders = sum(count(m) for name, m in models.items() if name.startswith("text_encoder"))
    sdxl = "text_encoder_2" in models
    vae = count(models["vae"]) * (4 if sdxl else frozen_bytes)  # SDXL's own VAE stays fp32 (fp16 overflow)
    unet = count(models["unet"])
    terms = {"VAE": vae, "text encoders": text_encoders * frozen_bytes}

    def trained(n):
        terms["trained weights, gradients, optimiser"] = n * (8 + adam_bytes)
        if half:
            terms["autocast working copy"] = n * 2

    if script == "train_lcm_distill_sd_wds.py" or (script == "train_lcm_distill_sdxl_wds.py" and "--use_lora" not in extra):
        student = unet + 256 * models["unet"].config.block_out_channels[0]  # + the zero omega projection
        terms["teacher UNet"] = unet * frozen_bytes
        terms["EMA target UNet"] = student * 4
        trained(student)
    elif script == "train_bk_sdm_kd.py":
        bk = load_script(script)
        with torch.device("meta"):
            student = bk.UNet2DConditionModel.from_config(bk.student_unet_config(models["unet"].config, extra[-1]))
        terms["teacher UNet"] = unet * frozen_bytes
        trained(count(student))
    else:  # LoRA on a frozen UNet
        module = load_script(script)
        args = module.parse_args(lora_parse_flags(script, pipeline, assets))
        unet_model = models["unet"]
        unet_model.requires_grad_(False)
        with torch.device("meta"):
            config = module.lora_config(args, module.UNET_LORA_TARGETS) if script == "train_dreambooth_lora.py" \
                else module.lora_config(args)
            unet_model.add_adapter(config)
        terms["frozen UNet"] = unet * frozen_bytes
        trained(count(unet_model, trainable_only=True))
        if hasattr(module, "resolve_ema_decay"):  # LCM-LoRA: the default EMA adapter target, fp32, on one process
            from types import SimpleNamespace

            from accelerate.utils import DistributedType

            module.resolve_ema_decay(args, SimpleNamespace(distributed_type=DistributedType.NO))
            if args.ema_decay is not None:
                terms["EMA adapter"] = count(unet_model, trainable_only=True) * 4
    return terms


def lora_parse_flags(script, pipeline, assets):
    """Just enough flags for the script's parse_args to give its default LoRA settings."""
    out = str(REPO / "benchmarks" / "work" / "memory" / "parse_only" / script)  # parsing locks its output dir
    if script == "train_dreambooth_lora.py":
        return ["--pretrained_model_name_or_path", pipeline, "--instance_data_dir", assets["instance"],
                "--instance_prompt", "x", "--output_dir", out]
    flags = ["--pretrained_teacher_model", pipeline, "--train_shards_path_or_url", assets["shards"],
             "--max_train_steps", "1", "--output_dir", out]
    return flags + (["--use_lora"] if script == "train_lcm_distill_sdxl_wds.py" else [])


def runtime_rss_gib():
    """Peak RSS of a Python process that only imports what every script imports."""
    code = ("import resource, torch, diffusers, transformers, accelerate, peft, webdataset; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    return int(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1]) / 2**20


def measure(run, assets, device, precision, steps, work_dir):
    script, preset, extra = RUNS[run]
    output_dir = work_dir / "runs" / run
    shutil.rmtree(output_dir, ignore_errors=True)
    flags = gpu_check.script_flags(script, assets[preset], 64, 1, steps, assets, output_dir) + extra
    if script != "train_dreambooth_lora.py":
        flags = [str(f) for f in flags]
        flags[flags.index("--dataloader_num_workers") + 1] = "0"  # every byte in the one measured process
    command = [sys.executable, "-c", MEASURE, sys.executable, "-m", "accelerate.commands.launch",
               "--num_processes", "1", "--num_machines", "1", "--mixed_precision", precision,
               "--dynamo_backend", "no"] + (["--cpu"] if device == "cpu" else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_CONFIG_FILE=str(REPO / "benchmarks" / "no_accelerate_config.yaml"))
    started = time.perf_counter()
    result = subprocess.run(command + [str(REPO / script)] + [str(f) for f in flags], cwd=REPO, env=env,
                            capture_output=True, text=True)
    log = result.stdout + result.stderr
    (work_dir / "runs").mkdir(parents=True, exist_ok=True)
    (work_dir / "runs" / f"{run}.log").write_text(log)
    peak_rss = [int(line.split()[-1]) / 2**20 for line in log.splitlines() if line.startswith("PEAK_RSS_KIB")]
    _, peak_cuda = gpu_check.parse_run(log)
    status = "ok" if result.returncode == 0 else f"failed: {gpu_check.failure_line(log)[:150]}"
    return {"peak_gib": peak_cuda if device == "cuda" else (peak_rss[-1] if peak_rss else None),
            "wall_s": round(time.perf_counter() - started), "status": status}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=None, help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work_dir", default=str(REPO / "benchmarks" / "work" / "memory"))
    parser.add_argument("--floors_only", action="store_true", help="compute the floors, run nothing")
    args = parser.parse_args()
    runs = args.runs.split(",") if args.runs else (DEFAULT_CPU_RUNS if args.device == "cpu" else list(RUNS))
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    work_dir = Path(args.work_dir)
    presets = sorted({RUNS[run][1] for run in runs})
    assets = gpu_check.build_assets(work_dir, "cuda" if args.device == "cuda" else "cpu", presets)
    runtime = runtime_rss_gib() if args.device == "cpu" else 0.0
    half = args.mixed_precision != "no"
    rows = []
    for run in runs:
        terms = floor_terms(run, assets[RUNS[run][1]], half, assets)
        floor = sum(terms.values()) / 2**30
        row = {"run": run, "floor_gib": floor, "terms_gib": {k: v / 2**30 for k, v in terms.items()}}
        if not args.floors_only:
            row.update(measure(run, assets, args.device, args.mixed_precision, args.steps, work_dir))
        rows.append(row)
        print(json.dumps(row), flush=True)

    what = "peak RSS" if args.device == "cpu" else "peak max_memory_allocated"
    lines = [f"{args.device}, {args.mixed_precision}, 64 px, batch 1, {args.steps} steps; runtime (imports alone) "
             f"{runtime:.2f} GiB", "",
             f"| run | floor GiB | {what} GiB | over floor{' + runtime' if runtime else ''} GiB | floor terms (GiB) |",
             "|---|---|---|---|---|"]
    for row in rows:
        peak = row.get("peak_gib")
        over = f"{peak - row['floor_gib'] - runtime:+.2f}" if peak is not None else "n/a"
        terms = ", ".join(f"{k} {v:.2f}" for k, v in row["terms_gib"].items())
        lines.append(f"| {row['run']} | {row['floor_gib']:.2f} | {f'{peak:.2f}' if peak is not None else 'n/a'} | "
                     f"{over} | {terms} |")
    table = "\n".join(lines)
    print("\n" + table)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / f"memory_{args.device}.md").write_text(table + "\n")
    return 0 if all(row.get("status", "ok") == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
