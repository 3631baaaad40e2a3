"""What every benchmark shares: the machine description, repeat statistics, isolated processes."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict:
    from dali_imagenet.run.logger import machine as run_machine

    return {**run_machine(), "git_commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarize(rates: list[float]) -> dict:
    """Median and spread of repeated images/s measurements."""
    return {"images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "repeats": len(rates), "all_images_per_s": rates}


def endless(loader):
    """Batches across epoch boundaries: a timed window must not stop at an epoch's end."""
    while True:
        yield from loader


def run_isolated(module: str, args: list[str], timeout_s: float = 900, prefix: list[str] = (),
                 env: dict | None = None) -> dict:
    """Runs `python -m module args` in a fresh process (DALI pipelines in one process disturb
    each other's timings) and returns the JSON object it prints last. `prefix`: a command to run
    it under, such as `taskset -c 0-3`; `env`: its environment (default: this one's)."""
    result = subprocess.run([*prefix, sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def save_figure(fig, results: list[dict], title: str, path: Path) -> Path:
    """Titles a chart with the machine the results came from, and writes it as a PNG."""
    import matplotlib.pyplot as plt

    env = results[0]["env"] if results else {}
    fig.suptitle(f"{title}: {env.get('cpu_count')} CPUs, GPU {env.get('gpu') or 'none'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
