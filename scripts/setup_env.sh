#!/usr/bin/env bash
# Create (or reuse) .venv with the suite's requirements. Idempotent: a second call only checks.
# TORCH_SPEC picks the torch build; the default is the CPU-capable release the suite is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements-stamp
want="$(cat requirements.txt requirements-dev.txt) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
# --no-compile: byte-compiling every module of torch and transformers costs minutes on a small machine;
# Python caches the few hundred modules the suite imports on first use (run_tests.sh allows that).
pip_install=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile)
# uv installs the same releases in a third of pip's time (16 s against 56 s for this suite on a 2-core machine: it
# downloads in parallel); pip does it where uv cannot be had. uv reads no pip config, so local wheel folders
# (PIP_FIND_LINKS) are passed on.
if [ "${USE_UV:-1}" = 1 ] && "${pip_install[@]}" uv 2>/dev/null; then
    find_links=()
    for folder in ${PIP_FIND_LINKS:-}; do find_links+=(--find-links "$folder"); done
    pip_install=(.venv/bin/python -m uv pip install --quiet --python .venv/bin/python "${find_links[@]}")
fi
"${pip_install[@]}" "$TORCH_SPEC"
"${pip_install[@]}" -r requirements-dev.txt
printf '%s' "$want" > "$stamp"
