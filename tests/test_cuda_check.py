"""Never the CPU by accident: the cloud setup's driver check (a stand-in `nvidia-smi` on PATH that
answers as the real one does to `--query-gpu=driver_version --format=csv,noheader`: the version,
one line per GPU) and `train.py --device cuda` where CUDA cannot run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, child_env

from dali_imagenet import cuda_check
from dali_imagenet.run import exits

NO_CUDA_HERE = not cuda_check.cuda_available() and not cuda_check.PROC_VERSION.exists()


def stand_in_smi(folder: Path, driver: str | None) -> dict:
    """An environment whose PATH has no real nvidia-smi, and a stand-in reporting `driver` if given."""
    folder.mkdir(parents=True, exist_ok=True)
    if driver:
        smi = folder / "nvidia-smi"
        smi.write_text(f'#!/bin/sh\ncase "$*" in *--query-gpu=driver_version*) echo {driver};;\n'
                       f'  *) echo "NVIDIA-SMI {driver}   Driver Version: {driver}";; esac\n')
        smi.chmod(0o755)
    path = [str(folder)] + [p for p in os.environ["PATH"].split(os.pathsep)
                            if p and not (Path(p) / "nvidia-smi").exists()]
    return child_env(PATH=os.pathsep.join(path), TORCH_FOR_DRIVER_DRY_RUN="1")


def setup_check(tmp_path: Path, driver: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "cloud" / "torch-for-driver.sh"), sys.executable], capture_output=True,
                          text=True, timeout=120, env=stand_in_smi(tmp_path / "bin", driver))


@pytest.mark.skipif(not NO_CUDA_HERE, reason="a real NVIDIA driver is here: the stand-in cannot hide it")
def test_setup_prints_the_triple_and_picks_the_torch_build_the_driver_runs(tmp_path):
    torch_cuda, dali = torch.version.cuda, cuda_check.dali_cuda()
    new = setup_check(tmp_path / "new", "580.95.05")
    assert new.returncode == 0, new.stderr
    triple = new.stdout.splitlines()[0]
    assert triple.startswith("NVIDIA driver 580.95.05; torch ") and f"built for CUDA {torch_cuda}" in triple
    assert f"DALI built for CUDA {dali}" in triple and "would run" not in new.stdout  # nothing to change

    old = setup_check(tmp_path / "old", "550.163.01")
    assert old.returncode == 0, old.stderr
    assert old.stdout.splitlines()[0].startswith("NVIDIA driver 550.163.01; ")
    commands = [line for line in old.stdout.splitlines() if line.startswith("would run")]
    if torch_cuda.startswith("13"):  # the pinned PyPI wheel: CUDA 13.0, needs 580
        version = torch.__version__.split("+")[0]
        assert f"torch=={version}" in commands[0] and commands[0].endswith("https://download.pytorch.org/whl/cu124")
        assert [c.rsplit("/", 1)[-1] for c in commands] == ["cu124", "cu129", "cu128", "cu126"]  # 550 meets 12.4's own
    else:
        assert commands == []

    none = setup_check(tmp_path / "none", None)
    assert none.returncode == 1 and none.stdout.startswith("NVIDIA driver none; ")
    assert none.stderr.strip().splitlines() == [
        "torch-for-driver: no NVIDIA driver on this machine (no nvidia-smi, no /proc/driver/nvidia/version): this "
        "task needs a GPU instance"]

    ancient = setup_check(tmp_path / "ancient", "470.256.02")
    assert ancient.returncode == 1 and len(ancient.stderr.strip().splitlines()) == 1
    assert "470.256.02 is older than DALI's CUDA" in ancient.stderr and ">= 525.60.13" in ancient.stderr


def test_the_torch_builds_a_driver_runs():
    assert cuda_check.driver_runs("580.65.06", "13.0") and not cuda_check.driver_runs("575.57.08", "13.0")
    assert cuda_check.driver_runs("525.60.13", "12.9") and not cuda_check.driver_runs("520.61.05", "12.1")
    assert cuda_check.pick_torch_index("575.57.08", "13.0") == ["cu129", "cu128", "cu126", "cu124"]
    assert cuda_check.pick_torch_index("535.247.01", "13.0") == ["cu129", "cu128", "cu126", "cu124"]
    assert cuda_check.pick_torch_index("560.35.03", "13.0") == ["cu126", "cu124", "cu129", "cu128"]
    assert cuda_check.pick_torch_index("470.256.02", "13.0") == []
    assert cuda_check.tag_cuda("cu130") == "13.0"


def test_why_cuda_cannot_run_in_one_line():
    reason = cuda_check.unusable_reason("13.0", "2.14.1", "550.54.15", "12.9")
    assert "driver 550.54.15 is older than this PyTorch's CUDA 13.0 needs (>= 580.65.06)" in reason
    assert "no NVIDIA driver" in cuda_check.unusable_reason("13.0", "2.14.1", None, "12.9")
    assert "CPU-only build" in cuda_check.unusable_reason(None, "2.14.1+cpu", "580.95.05", "12.9")
    assert "DALI's CUDA 12.9" in cuda_check.unusable_reason("11.8", "2.1", "520.61.05", "12.9")
    assert "no GPU visible" in cuda_check.unusable_reason("13.0", "2.14.1", "580.95.05", "12.9")


@pytest.mark.skipif(not NO_CUDA_HERE, reason="CUDA or a driver is here")
@pytest.mark.parametrize("driver", [None, "550.163.01"])
def test_train_py_device_cuda_without_cuda_stops_in_one_line(tmp_path, driver):
    """No driver, or one older than the wheel's CUDA: one line naming why (both versions), exit 1
    (an error: SkyPilot retries it twice, never as a reclaim), in seconds, nothing written."""
    out = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--dali", "--device", "cuda", "--data",
                             str(tmp_path / "no-shards"), "--out", str(out), "--no-wandb"], capture_output=True,
                            text=True, timeout=120, env=stand_in_smi(tmp_path / "bin", driver))
    assert time.monotonic() - started < 60
    assert result.returncode == exits.ERROR != exits.RECLAIM
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    if driver is None:
        assert lines[0].startswith("error: --device cuda: no NVIDIA driver on this machine")
    else:
        assert lines[0].startswith(f"error: --device cuda: the NVIDIA driver {driver} is older than this PyTorch's "
                                   f"CUDA {torch.version.cuda} needs (>= 580.65.06)")
    assert not out.exists() and "step" not in result.stdout
