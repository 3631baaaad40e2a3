#!/usr/bin/env bash
# The whole GPU product on one GPU (benchmarks/gpu_check.py says what): train.py with the L4 config
# as it runs (compile, the size ramp, resume, the device memory peak), the L4 host's loader on 2
# cores + SMT feeding the l4-16h step, cuda_graph's memory over the ramp, pytest -m gpu, the DALI
# loaders, steps and graphs. Each section in its own time box inside --budget-s (500 s); $OUT gets
# every row as soon as it is measured (gpu_check.json, gpu_check.md, gpu_check.log, nothing else),
# so the `timeout` below, or any SIGTERM, leaves the rows finished. The shards and runs go to a
# temporary folder (--work, --keep). Needs DALI importable (on the lent machine: source
# .device/dali-device-unpack; PYTHONPATH=/tmp/site:$PWD).
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python  # the project's environment, where there is one
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU visible to $python; run it on a GPU machine (python -m benchmarks.gpu_check --smoke --device cpu checks the plumbing)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout -k 30 560 "$python" -m benchmarks.gpu_check "$@"  # SIGTERM: it writes what it has and stops
