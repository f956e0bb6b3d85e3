"""Run a training script under `accelerate launch --use_deepspeed` on a CPU machine, without DeepSpeed's
shared-memory all-reduce: what tests/test_resume_safety.py launches.

On a CPU accelerator DeepSpeed's communication backend JIT-compiles a C++ op (`deepspeed_shm_comm`, a fast
intra-node all-reduce) when it starts, with ninja: about two minutes of a 2-core CI machine, in every fresh
checkout (its build key holds the venv's path). The test's runs have one process, so nothing is ever reduced
across processes; marking the op incompatible makes DeepSpeed fall back to torch.distributed, as it does on
machines without a compiler. Everything else is DeepSpeed's and the script's own code. Usage (as the script):

    accelerate launch --use_deepspeed ... tests/deepspeed_on_cpu.py train_lcm_distill_sd_wds.py --flags ...
"""

import runpy
import sys

import deepspeed.ops

if __name__ == "__main__":
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # probed once per process, then cached
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
