"""A training checkpoint: what it holds, written so that a kill at any instant cannot corrupt it,
and read back safely: any `.pt` this project reads (a checkpoint, final weights, a torchvision
state dict) with `weights_only=True` (a file fetched from S3 must not be able to run code), and the
weights inside a checkpoint: raw, EMA, or whichever scored higher.

A checkpoint is written as `atomic.open_atomic` writes (a temporary file, fsynced, renamed over
the final name): a crash leaves either the old or the new file, never half of one. Which files a
run folder holds, and their names, is `run_folder`'s business.
"""
from __future__ import annotations

import pickle
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dali_imagenet.atomic import open_atomic
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.training.evaluation import better_weights


@dataclass
class TrainState:
    """Where training stands: everything besides the weights that an exact resume needs."""
    step: int = 0  # optimizer steps taken, over all epochs
    epoch: int = 0  # the epoch under way (or next, when batch_in_epoch is 0)
    batch_in_epoch: int = 0
    best_top1: float = -1.0  # best val top-1 so far, % (EMA or raw, whichever is higher)
    history: list = field(default_factory=list)  # one dict of val metrics per validation
    wandb_id: str | None = None
    loader: list | None = None  # every rank's train-loader state mid-epoch (None at an epoch boundary)
    wall_s: float = 0.0  # wall-clock seconds trained up to this checkpoint, over all resumes (the run's cost)
    run_id: str = ""  # drawn when the run starts, kept by every resume: which run a checkpoint belongs to
    validation_due: int = 0  # the epoch (1-based) whose validation has not happened yet; 0: none
    s3_usage: dict = field(default_factory=dict)  # S3 requests and bytes so far, over all resumes (`s3.Usage`)
    budget: dict = field(default_factory=dict)  # a budget run's choice (run/budgeting.py), kept by every resume

    def finish_epoch(self, validate: bool) -> None:
        """The epoch under way is complete: the next one starts at its first batch; with
        `validate`, its validation is due (the checkpoint written now says so, so that a stop
        during validation redoes it after the resume)."""
        self.epoch += 1
        self.batch_in_epoch = 0
        self.loader = None
        self.validation_due = self.epoch if validate else 0


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


def contents(state: TrainState, *, model, optimizer, scaler, ema, config: dict, class_names) -> dict:
    """The checkpoint as saved: weights, optimiser, state, and what `evaluate.py`, `predict.py`
    and the report need to use the weights without the run's config at hand."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "state": asdict(state), "rng": rng_state(),
            "config": config, "arch": config["arch"], "num_classes": len(class_names),
            "class_names": list(class_names), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def restore(checkpoint: dict, *, model, optimizer, scaler, ema) -> TrainState:
    unwrap(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None:
        if checkpoint.get("ema") is None:
            raise CheckpointError("the checkpoint has no EMA weights but the config asks for ema_decay; "
                                  "resume with --set ema_decay=0")
        ema.load_state_dict(checkpoint["ema"])
    return TrainState(**checkpoint["state"])


def save_atomic(obj: dict, path: str | Path) -> Path:
    with open_atomic(path) as f:
        torch.save(obj, f)
    return Path(path)


def load_training(path: str | Path) -> dict:
    """A checkpoint that training can resume from (not just weights)."""
    checkpoint = load(path)
    missing = [key for key in ("model", "optimizer", "scaler", "state", "config") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a dali-imagenet training checkpoint (no {', '.join(missing)})")
    return checkpoint

class CheckpointError(DaliImagenetError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def load(path: str | Path, map_location="cpu") -> dict:
    """Any `.pt` this project reads back (a checkpoint, final weights, a torchvision state dict).
    weights_only: a file fetched from S3 must not be able to run code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, and not a published model (no config.json in it): give a checkpoint "
                              f"file (best.pt, last.pt) or a folder publish.py wrote")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # a damaged file draws pickle warnings: its one line below says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+)", str(error))  # weights_only's refusal of a pickled function or class
        if named:
            raise CheckpointError(f"{path}: refused: it names {named.group(1)}, a Python object beyond tensors and "
                                  f"numbers, which loading could run; only plain weights are read (torch.load "
                                  f"weights_only=True)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        raise CheckpointError(f"{path}: not a checkpoint: PyTorch cannot read it "
                              f"({detail.group(1).strip() if detail else _first_line(error)})") from None
    except Exception as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a checkpoint: PyTorch cannot read it ({first})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a checkpoint: holds a {type(loaded).__name__}, not a dict")
    return loaded


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__


def weights(checkpoint: dict, which: str = "raw") -> dict:
    """The model weights of a loaded checkpoint: "raw", or "ema" (the exponential moving average,
    when the run kept one), or "auto" (EMA if it scored higher at the last validation, else raw).
    A plain state dict (final_weights.pt, torchvision's) is its own weights."""
    if "model" not in checkpoint:
        return checkpoint
    ema = checkpoint.get("ema")
    if which == "auto":
        last = (checkpoint.get("state") or {}).get("history") or [{}]
        which = "ema" if ema is not None and better_weights(last[-1])[0] == "ema" else "raw"
    if which == "ema":
        if ema is None:
            raise CheckpointError("this checkpoint has no EMA weights (the run had ema_decay 0)")
        return ema["weights"]
    return checkpoint["model"]
