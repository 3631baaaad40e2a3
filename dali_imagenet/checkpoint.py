"""Checkpoints that a kill at any instant cannot corrupt, and finding the newest valid one.

A checkpoint is written to a temporary file in the run folder, flushed and fsynced, then renamed
over `last.pt` (rename is atomic on POSIX): a crash leaves either the old or the new file, never
half of one. `best.pt` is a hard link to (or a copy of) the `last.pt` that scored best.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

LAST, BEST = "last.pt", "best.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(state: dict, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def mark_best(run_dir: str | Path) -> Path:
    """Makes best.pt the current last.pt (atomically, like last.pt itself)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{BEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(run_dir / LAST, tmp)
    except OSError:  # file systems without hard links
        import shutil

        shutil.copyfile(run_dir / LAST, tmp)
    os.replace(tmp, run_dir / BEST)
    _fsync_dir(run_dir)
    return run_dir / BEST


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | Path, map_location="cpu") -> dict:
    # weights_only: a checkpoint fetched from S3 must not be able to run code.
    return torch.load(path, map_location=map_location, weights_only=True)


def newest_valid(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The loadable checkpoint in `run_dir` with the highest step, or None."""
    best = None
    for name in (LAST, BEST):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            state = load(path)
        except Exception:  # truncated or foreign file: skip it, an older one may still be good
            continue
        if best is None or state.get("step", -1) > best[1].get("step", -1):
            best = (path, state)
    return best


def clean_temporaries(run_dir: str | Path) -> None:
    """Removes temporary files a killed run left behind."""
    for tmp in Path(run_dir).glob(".*.pt.tmp-*"):
        tmp.unlink(missing_ok=True)
