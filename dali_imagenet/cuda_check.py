"""Whether this machine's NVIDIA driver can run the installed PyTorch and DALI builds, and which
PyTorch build it can run when it cannot: what `train.py --device cuda` checks before anything
else (a GPU instance must never train on its CPU unnoticed) and what `cloud/torch-for-driver.sh`
acts on.

Only the standard library at import: the setup script runs it in a fresh venv. The driver's
version comes from `nvidia-smi` (the tool every NVIDIA driver installs), else from the kernel
module's /proc file; neither: no driver.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from dali_imagenet.errors import DaliImagenetError

PROC_VERSION = Path("/proc/driver/nvidia/version")

# The oldest Linux driver each CUDA release runs on through CUDA's minor-version compatibility
# (NVIDIA's CUDA Toolkit release notes, "CUDA Driver" tables): any 12.x build runs on a driver of
# the 12.0 era (525.60.13) and any 13.x build needs a 13.0-era driver (580.65.06). PyTorch's and
# DALI's wheels ship their CUDA runtime and rely on this.
MINOR_COMPAT_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
# The driver each toolkit release shipped with: at or above it, even PTX JIT and every new API work.
TOOLKIT_DRIVER = {"13.0": "580.65.06", "12.9": "575.51.03", "12.8": "570.26", "12.6": "560.28.03",
                  "12.4": "550.54.14", "12.1": "530.30.02", "11.8": "520.61.05"}
# PyTorch's own wheel indexes (https://download.pytorch.org/whl/<tag>), newest CUDA first: the
# builds offered for an older driver. Which tags a torch release has varies, so the setup tries them in order.
TORCH_CUDA_TAGS = ("cu130", "cu129", "cu128", "cu126", "cu124")


class CudaUnusable(DaliImagenetError):
    """CUDA was asked for and cannot run here; the message is one line naming why."""


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def tag_cuda(tag: str) -> str:
    """"cu128" -> "12.8"."""
    digits = tag.removeprefix("cu")
    return f"{digits[:-1]}.{digits[-1]}"


def driver_needed(cuda: str) -> str:
    """The oldest driver a build for CUDA `cuda` ("13.0", "12.9") runs on."""
    major = cuda.split(".")[0]
    if major not in MINOR_COMPAT_DRIVER:
        raise ValueError(f"CUDA {cuda}: no driver requirement known")
    return MINOR_COMPAT_DRIVER[major]


def driver_runs(driver: str, cuda: str) -> bool:
    return version_key(driver) >= version_key(driver_needed(cuda))


def driver_version() -> str | None:
    """The NVIDIA driver's version ("580.95.05"), or None when the machine has no NVIDIA driver."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            result = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0:
            found = re.search(r"\d+\.\d+(\.\d+)?", result.stdout)
            if found:
                return found.group(0)
    try:
        found = re.search(r"Kernel Module\s+(\d+\.\d+(\.\d+)?)", PROC_VERSION.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def dali_cuda() -> str | None:
    """The CUDA release the installed DALI was built with ("12.9"), or None without DALI."""
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    digits = str(getattr(dali, "__cuda_version__", ""))  # 12986 for 12.9.86
    return f"{digits[:2]}.{digits[2]}" if len(digits) >= 3 else None


def unusable_reason(torch_cuda: str | None, torch_version: str, driver: str | None, dali: str | None,
                    torch_says: str = "") -> str:
    """Why CUDA cannot run here, in one line, from what was found; `torch_says`: torch's own warning, if any."""
    if torch_cuda is None:
        return f"this PyTorch ({torch_version}) is a CPU-only build: install a CUDA build (cloud/torch-for-driver.sh)"
    if driver is None:
        return ("no NVIDIA driver on this machine (no nvidia-smi, no /proc/driver/nvidia/version): it has no usable "
                "GPU; train on a GPU machine, or --device cpu")
    if not driver_runs(driver, torch_cuda):
        return (f"the NVIDIA driver {driver} is older than this PyTorch's CUDA {torch_cuda} needs (>= "
                f"{driver_needed(torch_cuda)}): install the torch build for this driver (cloud/torch-for-driver.sh) "
                f"or a newer driver")
    if dali is not None and not driver_runs(driver, dali):
        return f"the NVIDIA driver {driver} is older than DALI's CUDA {dali} needs (>= {driver_needed(dali)})"
    detail = f": {torch_says}" if torch_says else ""
    return f"CUDA is not usable (driver {driver}, PyTorch's CUDA {torch_cuda}; no GPU visible to it{detail})"


def require_cuda() -> None:
    """Returns when torch can use a CUDA GPU here; raises `CudaUnusable` (one line) otherwise."""
    import torch

    with warnings.catch_warnings(record=True) as caught:  # torch's "driver too old" warning: told in our line
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return
    said = " ".join(str(caught[0].message).split()) if caught else ""
    raise CudaUnusable("--device cuda: " + unusable_reason(torch.version.cuda, torch.__version__, driver_version(),
                                                           dali_cuda(), said[:200]))


def cuda_available() -> bool:
    """torch.cuda.is_available() without torch's warning (a CPU default needs no word)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def pick_torch_index(driver: str, current_cuda: str | None) -> list[str]:
    """The PyTorch wheel tags to try, best first, for `driver` when the installed build (CUDA
    `current_cuda`) cannot run on it: every newer-first tag the driver runs, those whose own
    toolkit driver it also meets first. Empty: none can (the caller stops)."""
    runnable = [tag for tag in TORCH_CUDA_TAGS if driver_runs(driver, tag_cuda(tag))
                and (current_cuda is None or version_key(tag_cuda(tag)) < version_key(current_cuda))]
    full = [tag for tag in runnable if version_key(driver) >= version_key(TOOLKIT_DRIVER.get(tag_cuda(tag), "999"))]
    return full + [tag for tag in runnable if tag not in full]


def setup_plan() -> int:
    """For cloud/torch-for-driver.sh: prints the triple (driver, torch's CUDA, DALI's CUDA) and, on
    stdout's last line, what to do: "ok", "install TAG TAG ..." (PyTorch's indexes to try, best
    first); or one line on stderr and exit 1 when nothing can run here."""
    import torch

    driver, torch_cuda, dali = driver_version(), torch.version.cuda, dali_cuda()
    print(f"NVIDIA driver {driver or 'none'}; torch {torch.__version__} built for CUDA {torch_cuda or 'none (CPU)'}"
          f"{f' (needs driver >= {driver_needed(torch_cuda)})' if torch_cuda else ''}; DALI built for CUDA "
          f"{dali or 'none'}{f' (needs driver >= {driver_needed(dali)})' if dali else ''}", flush=True)
    if driver is None:
        print("torch-for-driver: no NVIDIA driver on this machine (no nvidia-smi, no /proc/driver/nvidia/version): "
              "this task needs a GPU instance", file=sys.stderr)
        return 1
    if dali is not None and not driver_runs(driver, dali):
        print(f"torch-for-driver: the NVIDIA driver {driver} is older than DALI's CUDA {dali} needs "
              f"(>= {driver_needed(dali)}): use an image with a newer driver", file=sys.stderr)
        return 1
    if torch_cuda is not None and driver_runs(driver, torch_cuda):
        print("ok")
        return 0
    tags = pick_torch_index(driver, torch_cuda)
    if not tags:
        print(f"torch-for-driver: the NVIDIA driver {driver} runs no PyTorch CUDA build this project can use "
              f"(the oldest, CUDA {tag_cuda(TORCH_CUDA_TAGS[-1])}, needs >= "
              f"{driver_needed(tag_cuda(TORCH_CUDA_TAGS[-1]))})", file=sys.stderr)
        return 1
    print("install " + " ".join(tags))
    return 0


if __name__ == "__main__":
    sys.exit(setup_plan())
