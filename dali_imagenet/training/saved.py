"""Reading back what a run saved, safely: any `.pt` this project reads (a checkpoint, final
weights, a torchvision state dict) with `weights_only=True` (a file fetched from S3 must not be
able to run code), and the weights inside a checkpoint: raw, EMA, or whichever scored higher."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dali_imagenet.errors import DaliImagenetError


class CheckpointError(DaliImagenetError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def load(path: str | Path, map_location="cpu") -> dict:
    """Any `.pt` this project reads back (a checkpoint, final weights, a torchvision state dict).
    weights_only: a file fetched from S3 must not be able to run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # a damaged file draws pickle warnings: its one line below says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a checkpoint: PyTorch cannot read it ({first})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a checkpoint: holds a {type(loaded).__name__}, not a dict")
    return loaded


def weights(checkpoint: dict, which: str = "raw") -> dict:
    """The model weights of a loaded checkpoint: "raw", or "ema" (the exponential moving average,
    when the run kept one), or "auto" (EMA if it scored higher at the last validation, else raw).
    A plain state dict (final_weights.pt, torchvision's) is its own weights."""
    if "model" not in checkpoint:
        return checkpoint
    ema = checkpoint.get("ema")
    if which == "auto":
        last = (checkpoint.get("state") or {}).get("history") or [{}]
        which = "ema" if ema is not None and last[-1].get("ema_top1", -1) > last[-1].get("top1", -1) else "raw"
    if which == "ema":
        if ema is None:
            raise CheckpointError("this checkpoint has no EMA weights (the run had ema_decay 0)")
        return ema["weights"]
    return checkpoint["model"]
