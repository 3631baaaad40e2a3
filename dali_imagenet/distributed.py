"""Processes and devices: one process per GPU under `torchrun` (NCCL; gloo on CPU), or one alone.

Everything that makes ranks talk lives here: the process group, agreeing on a flag (all stop at
the same step), checking that all found the same checkpoint, and the replica checksum at the end.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dali_imagenet.errors import DaliImagenetError


class DeviceError(DaliImagenetError):
    """The device asked for is not there; the message is one line."""


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def local_master(self) -> bool:
        """The first process on each machine: the one that downloads for the machine."""
        return self.local_rank == 0


def setup(device_type: str, deterministic: bool = False) -> Processes:
    """Binds this process to its device and joins the process group; torchrun sets RANK,
    WORLD_SIZE and LOCAL_RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda but no CUDA GPU is visible (use --device cpu)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world, local_rank, device)


def machines(processes: Processes) -> int:
    """How many machines the run spans (torchrun's LOCAL_WORLD_SIZE processes on each)."""
    return max(1, processes.world // int(os.environ.get("LOCAL_WORLD_SIZE", processes.world)))


def teardown(processes: Processes) -> None:
    if processes.world > 1:
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.world > 1:
        dist.barrier()


def any_rank(flags: list[bool], processes: Processes) -> list[bool]:
    """Each flag true on every rank if it is true on any (one all-reduce for all of them)."""
    if processes.world == 1:
        return list(flags)
    values = torch.tensor([float(f) for f in flags], device=processes.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def gather(value, processes: Processes) -> list:
    """Every rank's `value` (a small picklable object), in rank order, on every rank."""
    if processes.world == 1:
        return [value]
    values = [None] * processes.world
    dist.all_gather_object(values, value)
    return values


def replica_checksum(model: torch.nn.Module) -> str:
    """A short hash of the weights: DDP replicas that drifted apart hash differently."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
