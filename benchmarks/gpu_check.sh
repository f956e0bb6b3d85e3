#!/usr/bin/env bash
# One-command GPU check of the five scripts (fp16, real 8-bit Adam, gradient checkpointing, xformers or SDPA):
# samples/s and peak GPU memory per script, and whether LCM-LoRA-SDXL at 1024 px fits in 24 GB. See
# benchmarks/README.md. GPU_CHECK_DEVICE=cpu is a dry run of the plumbing on tiny pipelines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

# The GPU machines' image has torch, accelerate, transformers and peft, but not these: install them from the
# wheels in .whl/ (offline) when they are missing.
missing=$("$PYTHON" -c 'import importlib.util as u
print(" ".join(m for m in ("diffusers", "webdataset", "bitsandbytes") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    if [ ! -d .whl ]; then
        echo "missing $missing and no .whl/ folder to install from; fill it as benchmarks/README.md says" >&2
        exit 1
    fi
    echo "installing $missing from .whl/"
    # shellcheck disable=SC2086  # one argument per package
    "$PYTHON" -m pip install --quiet --no-index --find-links .whl $missing
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
