#!/usr/bin/env python
"""samples/s of training scripts with and without torch.compile (`accelerate launch --dynamo_backend inductor`).

Each run is a real `accelerate launch` of the script (gpu_check's assets, flags and launcher), so the compiled
model is exactly what accelerate.prepare makes. samples/s is the median of the progress bar's per-step values
after the first `--warmup` steps: the compile (minutes on a CPU) happens in the first step and is not training
throughput; it is reported separately as the extra wall time of the compiled run. TORCH_LOGS=recompiles is set,
and every "Recompiling" line in a run's log is counted: a recompilation after the warm-up would be paid again.

    python benchmarks/benchmark_compile.py                                  # CPU: tiny-sd, 64 px, batch 1
    python benchmarks/benchmark_compile.py --runs lcd_sd,lcm_lora_sd,bk_sdm_small --steps 12
    python benchmarks/benchmark_compile.py --device cuda --mixed_precision fp16   # sd15, 512 px, batch 4

Results go to WORK_DIR/compile.md and .json (default benchmarks/work/compile)."""

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="lcd_sd,lcm_lora_sd", help="gpu_check run names (its configuration)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median (compile)")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--backends", default="no,inductor")
    parser.add_argument("--cpu_threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the runs (default: accelerate's choice, one per physical core)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launched run")
    parser.add_argument("--work_dir", default=str(REPO / "benchmarks" / "work" / "compile"))
    return parser.parse_args(argv)


def steady_samples_per_second(log, warmup):
    """Median of the progress bar's samples/s over the steps after `warmup` (gpu_check's parsing)."""
    per_step = {}
    for match in re.finditer(r"(\d+)/\d+ \[[^\]\r\n]*samples_s=([\d.]+)", log):
        per_step[int(match.group(1))] = float(match.group(2))  # the last refresh of a step carries its value
    steady = [value for step, value in per_step.items() if step > warmup]
    return (statistics.median(steady) if steady else None), len(steady)


def main(argv=None):
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    runs, _common = gpu_check.configuration(args.device)
    wanted = args.runs.split(",")
    runs = [run for run in runs if run[0] in wanted]
    if len(runs) != len(wanted):
        raise SystemExit(f"unknown run in --runs {args.runs}")
    assets = gpu_check.build_assets(work_dir, args.device, sorted({run[2] for run in runs}))
    os.environ["TORCH_LOGS"] = "recompiles"  # inherited by the launched scripts
    if args.cpu_threads:  # on a shared machine, inductor's OpenMP kernels suffer more from busy cores than ATen's
        os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)
    rows = []
    for name, script, preset, resolution, batch, extra in runs:
        for backend in args.backends.split(","):
            output_dir = work_dir / "runs" / f"{name}-{backend}"
            shutil.rmtree(output_dir, ignore_errors=True)
            flags = gpu_check.script_flags(script, assets[preset], resolution, batch, args.steps, assets, output_dir)
            flags += extra + ["--mixed_precision", args.mixed_precision]
            started = time.perf_counter()
            result = gpu_check.launch(script, flags, args.device, args.mixed_precision, args.timeout, backend)
            wall = time.perf_counter() - started
            log = result.stdout + result.stderr
            (work_dir / "runs" / f"{name}-{backend}.log").write_text(log)
            samples_per_s, measured = steady_samples_per_second(log, args.warmup)
            row = {"run": name, "script": script, "preset": preset, "resolution": resolution, "batch": batch,
                   "dynamo_backend": backend, "samples_per_s": samples_per_s, "steps_measured": measured,
                   "recompiles": log.count("Recompiling function"), "wall_s": round(wall, 1),
                   "status": "ok" if result.returncode == 0 else f"failed: {gpu_check.failure_line(log)[:150]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)

    threads = f", OMP_NUM_THREADS={args.cpu_threads}" if args.cpu_threads else ""
    lines = [f"{args.device}{threads}, mixed precision {args.mixed_precision}, {args.steps} steps, median of steps "
             f"{args.warmup + 1}-{args.steps}", "",
             "| run | preset, px, batch | --dynamo_backend | samples/s | speed-up | recompiles | wall s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        eager = next((r for r in rows if r["run"] == row["run"] and r["dynamo_backend"] == "no"), None)
        speedup = (f"{row['samples_per_s'] / eager['samples_per_s']:.2f}x"
                   if eager and row["samples_per_s"] and eager["samples_per_s"] else "n/a")
        value = f"{row['samples_per_s']:.2f}" if row["samples_per_s"] is not None else "n/a"
        lines.append(f"| {row['run']} | {row['preset']}, {row['resolution']}, {row['batch']} | "
                     f"{row['dynamo_backend']} | {value} | {speedup} | {row['recompiles']} | {row['wall_s']:.0f} | "
                     f"{row['status']} |")
    table = "\n".join(lines)
    print("\n" + table)
    (work_dir / "compile.md").write_text(table + "\n")
    (work_dir / "compile.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
