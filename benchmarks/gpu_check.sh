#!/usr/bin/env bash
# The GPU-only checks on a lent NVIDIA machine (PyTorch, torchvision, Triton; no DALI, no internet).
# Under 6 minutes on an H100. Prints a table; with $OUT set, also writes $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python  # the project's environment, where there is one
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU visible to $python; run it on a GPU machine (python -m benchmarks.gpu_check --smoke --device cpu checks the plumbing)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 330 "$python" -m benchmarks.gpu_check "$@"
