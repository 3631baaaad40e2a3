#!/usr/bin/env bash
# The whole GPU product on one GPU (benchmarks/gpu_check.py says what): train.py with the L4 config
# as it runs (compile, the size ramp, resume), cuda_graph's memory over the ramp, pytest -m gpu, the
# DALI loaders, steps and graphs. At most 8 minutes on an H100/H200 (--budget-s 450 for the
# sections). With $OUT set, $OUT gets gpu_check.json, gpu_check.md and gpu_check.log, nothing else;
# the shards and runs go to a temporary folder (--work, --keep). Needs DALI importable (on the lent
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
PYTHONUNBUFFERED=1 timeout 480 "$python" -m benchmarks.gpu_check "$@"
