"""Run training scripts under accelerate's FSDP 2 on CPU processes (gloo): what tests/test_fsdp.py launches.

accelerate 1.15 turns FSDP on only for accelerator devices (state.py picks DistributedType.FSDP only from
MULTI_GPU and its kin): on a machine without one, `accelerate launch --config_file configs/fsdp.yaml` gives
plain MULTI_CPU DDP (with ACCELERATE_USE_CPU) or N processes that each believe they are alone. Here the one
function that picks the backend answers "gloo, as on GPUs" while ACCELERATE_TORCH_DEVICE keeps the device the
CPU; everything after that is accelerate's and torch's own FSDP 2 code (fsdp2_prepare_model, the FSDP
checkpoint files, get_state_dict, clip_grad_norm_).

One launch runs a plan of several trainings (imports cost 10-20 s per process on a busy CI machine), each
under FSDP or under MULTI_CPU DDP, in one gloo group that this script owns (accelerate's end_training would
otherwise destroy it after the first run). Usage:

    accelerate launch --config_file configs/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp_on_cpu.py PLAN.json

PLAN.json: a list of {"name", "script", "args", "fsdp": bool, "copy": [src, dst] (optional, done by rank 0
before the run)}. Each rank writes PLAN.json.rank<R> with, per run, what accelerate set up and how much of
the EMA target this rank holds.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import state as accelerate_state
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]


def use_gloo_as_on_gpus():
    """With ACCELERATE_USE_FSDP, answer accelerate's backend choice as on GPUs, with gloo: AcceleratorState then
    turns MULTI_GPU into FSDP. And keep the plan's process group alive through each run's end_training."""
    original = accelerate_state.PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if os.environ.get("ACCELERATE_USE_FSDP") == "true":
            return "gloo", DistributedType.MULTI_GPU  # then AcceleratorState makes it FSDP
        return original(self, cpu, sagemaker_dp, backend)

    accelerate_state.PartialState._prepare_backend = prepare_backend
    accelerate_state.PartialState.destroy_process_group = lambda self, group=None: None  # the plan's group


def load_script(name):
    spec = importlib.util.spec_from_file_location(Path(name).stem, REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_ema(module, record):
    """Record, at the first EMA update, the fraction of the target's elements that this rank holds."""
    update_ema = module.update_ema

    def recording_update_ema(target_params, source_params, decay):
        target_params = list(target_params)
        if "ema_local_fraction" not in record:
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in target_params)
            record["ema_local_fraction"] = local / sum(p.numel() for p in target_params)
        return update_ema(target_params, source_params, decay)

    module.update_ema = recording_update_ema


def main(plan_path):
    plan = json.loads(Path(plan_path).read_text())
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    use_gloo_as_on_gpus()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    records = []
    for run in plan:
        if run.get("copy") and rank == 0:
            shutil.copytree(*run["copy"])
        dist.barrier()
        os.environ["ACCELERATE_USE_FSDP"] = "true" if run["fsdp"] else "false"
        os.environ["ACCELERATE_USE_CPU"] = "false" if run["fsdp"] else "true"
        accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)
        accelerate_state.GradientState._reset_state()
        module = load_script(run["script"])
        record = {"name": run["name"]}
        probe_ema(module, record)
        module.main(module.parse_args(run["args"]))
        module.OutputDirLock.release_all()
        state = accelerate_state.AcceleratorState()
        record.update(distributed_type=str(state.distributed_type), num_processes=state.num_processes,
                      fsdp_version=getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None))
        records.append(record)
        dist.barrier()
    Path(f"{plan_path}.rank{rank}").write_text(json.dumps(records, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
