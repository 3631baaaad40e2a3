#!/usr/bin/env bash
# Makes the venv's PyTorch one this machine's NVIDIA driver can run, or stops in one line.
#   bash cloud/torch-for-driver.sh [PYTHON]        # default ~/venv/bin/python; run after the project is installed
# Prints the triple that decides (the driver, the CUDA torch was built for, DALI's CUDA). The pinned
# torch wheel from PyPI is a CUDA 13.0 build (driver >= 580.65.06); on an older driver (an image
# from 2025) it would leave torch.cuda.is_available() False and a run on the CPU. Then the same torch
# version is installed from PyPI's CUDA 12 builds on PyTorch's own index (cu129, cu128, cu126, ... the
# first that exists for it), which run on any driver >= 525.60.13, as DALI's CUDA 12 build does.
# No driver, or one older than that: one line on stderr, exit 1. TORCH_FOR_DRIVER_DRY_RUN=1 prints
# the install command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-$HOME/venv/bin/python}"
plan=$("$py" -m dali_imagenet.cuda_check) || { echo "$plan"; exit 1; }  # the triple; its one line is on stderr
echo "$plan" | sed '$d'
todo=$(echo "$plan" | tail -n 1)
[ "$todo" = ok ] && exit 0
versions=$("$py" -c 'import torch, torchvision; print(torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])')
torch_version=${versions% *}
vision_version=${versions#* }
if "$py" -m pip --version >/dev/null 2>&1; then pip=("$py" -m pip); yes=-y; else pip=(uv pip); yes=; fi
for tag in ${todo#install }; do
    # PyTorch's index alone: its torch of this version is the CUDA build named by the tag, and it
    # holds that build's nvidia-* libraries; the CUDA 13 build goes first (the same version is "installed")
    command=("${pip[@]}" install -q "torch==$torch_version" "torchvision==$vision_version"
             --index-url "https://download.pytorch.org/whl/$tag")
    [ "${pip[0]}" = uv ] && command+=(--python "$py")
    if [ -n "${TORCH_FOR_DRIVER_DRY_RUN:-}" ]; then
        echo "would run (the first whose install succeeds wins): ${command[*]}"
        continue
    fi
    echo "installing torch $torch_version for $tag from PyTorch's index ..."
    if [ "${pip[0]}" = uv ]; then uv pip uninstall -q --python "$py" torch torchvision; else "${pip[@]}" uninstall -q $yes torch torchvision; fi
    if "${command[@]}"; then
        after=$("$py" -m dali_imagenet.cuda_check) || exit 1
        echo "$after" | sed '$d'
        [ "$(echo "$after" | tail -n 1)" = ok ] && exit 0
        echo "torch-for-driver: torch for $tag installed, and still not one the driver runs" >&2
        exit 1
    fi
done
[ -n "${TORCH_FOR_DRIVER_DRY_RUN:-}" ] && exit 0
echo "torch-for-driver: no torch $torch_version build for ${todo#install } on PyTorch's index installed" >&2
exit 1
