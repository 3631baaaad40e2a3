#!/usr/bin/env bash
# The GPU-only checks on a lent NVIDIA machine (PyTorch, torchvision, Triton; no DALI, no internet).
# Under 6 minutes on an H100. Prints a table; with $OUT set, also writes $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 330 python3 -m benchmarks.gpu_check "$@"
