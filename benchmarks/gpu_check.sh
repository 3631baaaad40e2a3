#!/usr/bin/env bash
# The whole GPU product on one GPU (benchmarks/gpu_check.py says what): DALI loaders, steps, graphs,
# train.py with resume, pytest -m gpu. Aims at 6 minutes on an H100/H200. Prints a table; with $OUT
# set, also writes $OUT/gpu_check.json and $OUT/gpu_check.md. Needs DALI importable (on the lent
# machine: source .device/dali-device-unpack; PYTHONPATH=/tmp/site:$PWD).
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python  # the project's environment, where there is one
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU visible to $python; run it on a GPU machine (python -m benchmarks.gpu_check --smoke --device cpu checks the plumbing)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 420 "$python" -m benchmarks.gpu_check "$@"
