"""Numeric precision, decided once for train.py, evaluate.py, predict.py and the benchmarks: the
autocast dtype, the dtype the loader hands over, the loss scaler, and what each device allows."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dali_imagenet.errors import DaliImagenetError

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}  # None: no autocast


class PrecisionError(DaliImagenetError):
    """A precision the device cannot run; the message says what to use instead."""


@dataclass(frozen=True)
class Precision:
    name: str  # a key of AMP_DTYPES
    device: torch.device

    @classmethod
    def for_device(cls, name: str, device: torch.device | str, *, fallback: bool = False) -> Precision:
        """`fallback`: on a CPU, take float16 as bfloat16 (for reading a GPU run's checkpoint)
        instead of failing."""
        device = torch.device(device)
        if name not in AMP_DTYPES:
            raise PrecisionError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, not {name!r}")
        if name == "float16" and device.type != "cuda":
            if not fallback:
                raise PrecisionError("amp_dtype float16 needs a GPU; use bfloat16 or float32 on the CPU")
            name = "bfloat16"
        return cls(name, device)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.name]

    @property
    def loader_dtype(self) -> torch.dtype:
        """What the loader should emit. On the GPU, half-size batches halve the loader's memory
        traffic (autocast casts fp16 input to bf16 in the first conv anyway); on the CPU, DALI's
        fp16 conversion costs ~20 % of its throughput, more than autocast's cast of fp32 input."""
        return torch.float16 if (self.amp_dtype is not None and self.device.type == "cuda") else torch.float32

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; the fused SGD checks for inf on the GPU, with no host sync.
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "float16")
