"""Whether a config's model fits the machine, known before a byte of it is allocated: the network
is built on PyTorch's meta device (shapes only: no memory, no initialisation time) and run once
on a meta image, which also finds an image size the network cannot take. The estimate:

- weights, gradients and SGD's momentum in float32 (and the EMA's copy when on): 4 B each;
- activations kept for the backward pass: every leaf module's output for one image x the batch,
  in the autocast dtype's bytes (float32: 4, bfloat16/float16: 2).

It leaves out the allocator's slack, cuDNN's workspaces and the loader's buffers: a model that
fits by this count may still not fit, one that does not surely does not."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.training import archs

USABLE_SHARE = 0.9  # of the GPU's memory that a run may plan to use
HOST_SHARE = 0.75  # of the host RAM available now: the loader's processes and the page cache need the rest
CPU_PROBE_SHARE = 0.25  # of the host RAM available: the largest network probed for real when the meta device fails
PROBE_BATCH = 2  # images in the meta forward (BatchNorm in training mode needs more than one value per channel)
AMP_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelSizeError(DaliImagenetError):
    """The model does not fit, or cannot take the configured image size; the message is one line."""


@dataclass(frozen=True)
class Estimate:
    parameters: int
    state_bytes: int  # weights + gradients + momentum (+ EMA)
    activation_bytes: int  # for one batch of the configured train size

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes


def estimate(arch: str, width: int, num_classes: int, *, image_size: int, batch_size: int, amp_dtype: str,
             ema: bool, drop_path: float = 0.0, blurpool: bool = False, other_sizes: tuple[int, ...] = ()) -> Estimate:
    """The estimate at the train size `image_size`; `other_sizes` (validation's) are only checked.
    A network whose forward the meta device cannot run (one that makes a CPU tensor inside it) is
    probed again for real on the CPU, where its weights take little room; a large one is refused
    with the meta device's reason."""
    def build():
        return archs.build(arch, num_classes, drop_path_rate=drop_path, blurpool=blurpool, width=width)

    with torch.device("meta"):
        model = build()
    parameters = sum(p.numel() for p in model.parameters())
    try:
        elements = _probe(model, "meta", image_size, other_sizes)
    except _SizeRefused as refused:
        if parameters * 4 > CPU_PROBE_SHARE * _host_available():
            raise ModelSizeError(f"arch {arch} cannot take {refused.size} px images: {refused.reason}") from None
        try:
            elements = _probe(build(), "cpu", image_size, other_sizes)
        except _SizeRefused as again:
            raise ModelSizeError(f"arch {arch} cannot take {again.size} px images: {again.reason}") from None
    return Estimate(parameters, parameters * 4 * (4 if ema else 3), elements * batch_size * AMP_BYTES.get(amp_dtype, 4))


class _SizeRefused(DaliImagenetError):
    """The probe's forward failed at `size` (turned into a `ModelSizeError` by `estimate`)."""

    def __init__(self, size: int, reason: str):
        super().__init__(reason)
        self.size, self.reason = size, reason


def _probe(model: torch.nn.Module, device: str, image_size: int, other_sizes: tuple[int, ...]) -> int:
    """Elements of every leaf module's output for one image at `image_size` (a forward of
    PROBE_BATCH images on `device`); the other sizes are only run."""
    elements = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor) and not any(output is x for x in inputs):  # in place: no new tensor
            elements[0] += output.numel() // PROBE_BATCH

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    size = image_size
    try:
        with torch.no_grad():
            model.train()(torch.zeros(PROBE_BATCH, 3, size, size, device=device))
            for hook in hooks:
                hook.remove()
            for size in other_sizes:
                model.eval()(torch.zeros(PROBE_BATCH, 3, size, size, device=device))
    except Exception as error:  # noqa: BLE001 - whatever the network says about the size, in one line
        raise _SizeRefused(size, " ".join(str(error).split())[:300]) from None
    finally:
        for hook in hooks:
            hook.remove()
    return elements[0]


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes a run may plan on, what they are): the GPU's total memory, or the host RAM available
    now divided among this machine's processes (torchrun's ranks share it on the CPU)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * USABLE_SHARE), f"{total / 2**30:.1f} GiB of GPU memory ({USABLE_SHARE:.0%} usable)"
    available = _host_available()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = available // max(ranks, 1)
    return int(share * HOST_SHARE), (f"{available / 2**30:.1f} GiB of host RAM available"
                                     + (f" for {ranks} processes" if ranks > 1 else "") + f" ({HOST_SHARE:.0%} usable)")


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(found: Estimate, device: torch.device, *, network: str, batch_size: int, image_size: int) -> None:
    """Refuses, in one line with the numbers, a model that would not fit."""
    usable, what = available_bytes(device)
    if found.total > usable:
        raise ModelSizeError(
            f"{network} does not fit: ~{found.total / 2**30:.1f} GiB needed ({found.parameters / 1e6:,.0f} M "
            f"parameters: {found.state_bytes / 2**30:.1f} GiB of weights, gradients and optimizer state; "
            f"{found.activation_bytes / 2**30:.1f} GiB of activations at batch {batch_size}, {image_size} px), "
            f"{what}: lower width, batch_size or image_size")
