"""Processes and devices: one process per GPU under `torchrun` (NCCL; gloo on CPU), or one alone.

Everything that makes ranks talk lives here: the process group, agreeing on a flag (all stop at
the same step), checking that all found the same checkpoint, one rank's fatal error told to the
others (`PeerErrors`), and the replica checksum at the end.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dali_imagenet.cuda_check import require_cuda


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    flags_group: object = None  # a gloo group for `FlagExchange` (CPU tensors: no CUDA sync), under torchrun

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
        require_cuda()  # one line naming why not (no driver, one too old for this torch): never the CPU instead
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    flags_group = None
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        flags_group = dist.new_group(backend="gloo")  # every rank, in the same order: a collective
    return Processes(rank, world, local_rank, device, flags_group)


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


class FlagExchange:
    """Flags agreed by every rank at every step without waiting for the GPU: each call starts a
    non-blocking all-reduce (MAX) of this rank's flags over the gloo group, on CPU tensors, and
    returns the previous call's result. Every rank makes the same calls, so every rank reads the
    same answer at the same call, one call late; in one process, the flags themselves."""

    def __init__(self, processes: Processes):
        self.processes = processes
        self._work = None
        self._values: torch.Tensor | None = None

    def exchange(self, flags: list[bool]) -> list[bool] | None:
        """Every rank's `flags` of the previous call, ORed (None at the first call); posts these."""
        if self.processes.world == 1:
            return list(flags)
        agreed = None
        if self._work is not None:
            self._work.wait()  # the ranks posted it a step ago: this waits for the slowest rank's post, no more
            agreed = [bool(v) for v in self._values.tolist()]
        self._values = torch.tensor([float(f) for f in flags])
        self._work = dist.all_reduce(self._values, op=dist.ReduceOp.MAX, group=self.processes.flags_group,
                                     async_op=True)
        return agreed

    def drain(self) -> None:
        """Waits for the last exchange (before the process group goes)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


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


def broadcast(value, processes: Processes):
    """Rank 0's `value` (a small picklable object) on every rank."""
    if processes.world == 1:
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


class PeerErrors:
    """One rank's fatal error (a sample that does not decode, a bug), told to the other ranks
    through torchrun's TCP store (MASTER_ADDR:MASTER_PORT), so that every rank stops within
    seconds with one line of its own, instead of hanging in an NCCL collective or dying of a gloo
    "connection closed by peer" traceback.

    The failing rank `post`s its line, then waits (`wait_for_others`) until each other rank has
    acknowledged: torchrun ends the other processes as soon as one exits, and rank 0 must first
    upload the closing record and the last good checkpoint. For the same reason every other rank,
    on any way out, waits (`wait_for_flush`) until rank 0 says it has `flushed`. The others learn of it from a thread
    that polls the store every `poll_s` and calls `on_peer_error(line)`, wherever their main thread
    is (an NCCL wait included); that callback acknowledges and ends the process.
    """
    PREFIX = "dali-imagenet"

    def __init__(self, processes: Processes, on_peer_error: Callable[[str], None], poll_s: float = 0.5):
        self.processes = processes
        self._store = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        if processes.world == 1 or "MASTER_ADDR" not in os.environ:
            return
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a torchrun restart starts a new exchange
        self._key, self._acks = f"{self.PREFIX}/{attempt}/error", f"{self.PREFIX}/{attempt}/acks"
        self._flushed = f"{self.PREFIX}/{attempt}/flushed"
        try:  # a client of its own: the process group's store is busy in the main thread
            self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=datetime.timedelta(seconds=30))
        except (RuntimeError, ValueError):  # no store to reach: a peer's error then ends in its own traceback
            return
        self._on_peer_error = on_peer_error
        self._poll_s = poll_s
        threading.Thread(target=self._watch, name="peer-errors", daemon=True).start()

    def _watch(self) -> None:
        while not self._done.wait(self._poll_s):
            try:
                with self._lock:
                    line = self._store.get(self._key).decode() if self._store.check([self._key]) else None
            except RuntimeError:  # the store went away: the run is over
                return
            if line is not None and not line.startswith(f"rank {self.processes.rank}:"):
                self._done.set()
                self._on_peer_error(line)
                return

    def post(self, message: str) -> None:
        """This rank failed with `message`: tells the others (the first rank to fail is the one told)."""
        if self._store is None:
            return
        self._done.set()
        try:
            with self._lock:
                self._store.compare_set(self._key, "", f"rank {self.processes.rank}: {message}")
        except RuntimeError:
            pass

    def acknowledge(self) -> None:
        if self._store is not None:
            try:
                with self._lock:
                    self._store.add(self._acks, 1)
            except RuntimeError:
                pass

    def wait_for_others(self, timeout_s: float) -> None:
        """Until every other rank has acknowledged a `post`, or `timeout_s` passed."""
        if self._store is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with self._lock:
                    if self._store.add(self._acks, 0) >= self.processes.world - 1:
                        return
            except RuntimeError:
                return
            time.sleep(0.1)

    def flushed(self) -> None:
        """Rank 0 has written its last files and waited for their uploads: the others may exit.
        (Said by rank 0 alone; a no-op elsewhere.)"""
        if self._store is not None and self.processes.master:
            try:
                with self._lock:
                    self._store.set(self._flushed, "1")
            except RuntimeError:
                pass

    def wait_for_flush(self, timeout_s: float) -> None:
        """Until rank 0 said `flushed`, or `timeout_s` passed. A rank that exits first makes torchrun
        end the others (SIGTERM, SIGKILL 30 s later): rank 0 in the middle of its uploads."""
        if self._store is None or self.processes.master:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with self._lock:
                    if self._store.check([self._flushed]):
                        return
            except RuntimeError:  # the store went away: nobody is left to wait for
                return
            time.sleep(0.1)

    def close(self) -> None:
        self._done.set()
