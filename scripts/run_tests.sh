#!/usr/bin/env bash
# The test suite: set up .venv if needed, check the copies (`# Copied from` definitions and `# region` copies),
# run pytest on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 WANDB_MODE=offline
# cache bytecode of what the suite imports (setup_env.sh installs without it): every test process re-imports torch
unset PYTHONDONTWRITEBYTECODE
.venv/bin/python tools/check_copies.py tools  # the scripts, and the tools that repeat their code
# whole files per worker, in the order tests/conftest.py sorts them (heaviest first), not xdist's most-tests-first
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
