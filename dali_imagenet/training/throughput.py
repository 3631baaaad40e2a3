"""How fast training goes: images per second, the share of time spent waiting for the loader, what
an epoch's first step cost, and the peak GPU memory."""
from __future__ import annotations

import time


class ThroughputMeter:
    """Images per second and the share of time spent waiting for the loader, over a window of
    steps (reset at each log) and over the epoch; what the epoch's first step cost (a compile, a
    graph capture, cuDNN's autotuning at a new size) and the rate after it; on a GPU, the peak
    memory. Host clocks only, but for one GPU sync an epoch, after its first step."""

    def __init__(self, world_size: int = 1, device=None):
        import torch

        self.world_size = world_size
        self.gpu = device if device is not None and torch.device(device).type == "cuda" else None
        self._epoch = self._window = None
        self._warm = None  # (time, images) after the epoch's first step

    def batches(self, loader):
        """Iterates `loader`, timing each wait for a batch and counting its images."""
        import torch

        if self.gpu is not None:
            torch.cuda.reset_peak_memory_stats(self.gpu)  # each image size's own peak
        # What the loader waited for before its first batch (tars still being staged) is data wait too.
        waited = getattr(loader, "build_wait_s", 0.0)
        now = time.perf_counter() - waited
        self._epoch, self._window = [now, 0, waited], [now, 0, waited]  # start, images, seconds waited
        self._warm = None
        batches = iter(loader)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - started
            for totals in (self._epoch, self._window):
                totals[2] += waited
                totals[1] += 0 if batch is None else batch[0].shape[0]
            if batch is None:
                return
            yield batch
            if self._warm is None:
                self._first_step_done()

    def _first_step_done(self) -> None:
        import torch

        if self.gpu is not None:
            torch.cuda.synchronize(self.gpu)  # once an epoch: what the first step (a compile) cost
        self._warm = (time.perf_counter(), self._epoch[1] * self.world_size)

    @staticmethod
    def _rates(totals, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - totals[0], 1e-9)
        return {"images_per_s": totals[1] * world_size / elapsed, "data_wait": totals[2] / elapsed}

    def take_window(self) -> dict:
        """The window's rates (and, on a GPU, the peak memory so far), then a new window."""
        import torch

        rates = self._rates(self._window, self.world_size)
        if self.gpu is not None:
            rates["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.gpu) / 2**30
        self._window = [time.perf_counter(), 0, 0.0]
        return rates

    def epoch(self) -> dict:
        """The epoch's rates and the images it trained, over all ranks; with first_step_s,
        warm_images_per_s (the steps after the first), peak_gpu_mem_gb and peak_gpu_reserved_gb
        once a step ran (the caller's last log step synced: nothing is waited for here)."""
        import torch

        rates = {**self._rates(self._epoch, self.world_size), "images": self._epoch[1] * self.world_size}
        if self._warm is None:
            return rates
        warm_images = rates["images"] - self._warm[1]
        on_gpu = self.gpu is not None
        return {**rates, "first_step_s": self._warm[0] - self._epoch[0],
                "warm_images_per_s": warm_images / max(time.perf_counter() - self._warm[0], 1e-9)
                if warm_images else None,
                "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(self.gpu) / 2**30 if on_gpu else None,
                "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(self.gpu) / 2**30 if on_gpu else None}
