"""One optimisation step: mix the batch, forward under autocast, backward, SGD, EMA. No host sync.

`TrainStep` is what the trainer calls: the step at the LR and mixing draws of a given global
step, the EMA update after it, and a device-side record of the first step whose loss was not
finite (read only when the caller syncs anyway). `GraphedTrainStep` replays all of that as one
CUDA graph per input shape, so that a fast GPU is not held back by ~1,000 kernel launches a step.
"""
from __future__ import annotations

import torch

from dali_imagenet import seeding
from dali_imagenet.errors import UsageError
from dali_imagenet.training.mixing import MixConfig, draw_mix, mix_with_draws, soft_target_cross_entropy
from dali_imagenet.training.precision import Precision


class TrainStep:
    def __init__(self, model: torch.nn.Module, train_model: torch.nn.Module, optimizer, scaler, *,
                 precision: Precision, mix: MixConfig, num_classes: int, ema=None, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        """`model`: the plain module (the EMA follows it); `train_model`: what runs the step
        (the same module, or its DDP / torch.compile wrapper); `world_size`: processes in the run."""
        self.model = model
        self.train_model = train_model
        self.optimizer = optimizer
        self.scaler = scaler
        self.precision = precision
        self.mix = mix
        self.num_classes = num_classes
        self.ema = ema
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        device = precision.device
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.step_number = torch.zeros((), dtype=torch.int64, device=device)

    def draws(self, step: int) -> torch.Tensor:
        # The mixing RNG depends only on (seed, step, rank): resumable without saving its state.
        generator = torch.Generator(self.precision.device).manual_seed(
            seeding.derive_seed(self.seed, "mixing", step, self.rank))
        return draw_mix(self.mix, generator, self.precision.device)

    def body(self, images: torch.Tensor, labels: torch.Tensor, draws: torch.Tensor, ema_weight) -> torch.Tensor:
        """The step's device work, from the loss to the EMA: what a CUDA graph captures."""
        images, targets = mix_with_draws(images, labels, self.num_classes, self.mix, draws)
        with self.precision.autocast():
            loss = soft_target_cross_entropy(self.train_model(images), targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # fused SGD on GPU: the fp16 inf check stays on the device
        self.scaler.update()
        if self.ema is not None:
            self.ema.lerp(self.model, ema_weight)
        self.first_bad_step.copy_(torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss),
                                              self.step_number, self.first_bad_step))
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, step: int, lr: float) -> torch.Tensor:
        """Returns the loss as a device tensor; reading it (`.item()`) is the caller's sync."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # a Python float: setting it launches nothing
        self.step_number.fill_(step)
        self.optimizer.zero_grad(set_to_none=True)
        return self.body(images, labels, self.draws(step), self.ema.weight_at(step) if self.ema else None)

    def bad_step(self) -> int | None:
        """The first step whose loss was NaN or inf, or None. A host sync: call it when logging."""
        bad = int(self.first_bad_step.item())
        return bad if bad >= 0 else None


class GraphedTrainStep(TrainStep):
    """`TrainStep` as one CUDA graph per input shape (a size ramp captures one per size).

    Each batch is copied into the graph's static input buffers; the LR, the EMA weight, the step
    number and the mixing draws live in device tensors that are filled before each replay (fills
    and a few RNG kernels: no host sync). The first `WARMUP_STEPS` steps at a new shape run eagerly
    on a side stream (cuDNN autotuning, optimizer state, lazy allocations), then the graph is
    captured and replayed; those warm-up steps are real training steps. Needs a GPU, one process
    (DDP is not captured) and bf16 or fp32 (fp16's GradScaler reads its scale on the host).

    DALI's worker threads keep issuing CUDA calls while a graph is captured (DALI itself is not
    capturable, NVIDIA/DALI#3703), so capture uses `capture_error_mode="thread_local"`: only this
    thread's capture-unsafe calls invalidate it, not the loader's.

    A size ramp never returns to a size it left, so the graphs of earlier shapes are dropped when a
    new shape arrives, and the next one is captured into a fresh private pool: the old pool's
    memory goes back to the caching allocator (and is reused) once its last block is freed, and the
    ramp's peak is its largest size's, not the sum over its sizes (on an L4's 24 GB, the difference
    between fitting and not at batch 256). Capturing into the dropped graph's pool instead makes
    PyTorch's allocator assert if any of its blocks survived the graph (a cuBLAS workspace,
    a loss tensor the caller still holds: pytorch#175276).
    """
    WARMUP_STEPS = 3

    @staticmethod
    def refusal(device: torch.device, precision_name: str, world_size: int) -> str | None:
        """Why a graphed step cannot run here, or None. The process count is what decides, not the
        module's type: under `compile: true` the DDP module is hidden inside torch.compile's wrapper."""
        if device.type != "cuda":
            return "cuda_graph needs a GPU (--device cuda)"
        if precision_name == "float16":
            return "cuda_graph needs amp_dtype bfloat16 or float32 (fp16 loss scaling syncs)"
        if world_size > 1:
            return "cuda_graph runs one process; under torchrun use cuda_graph: false"
        return None

    def __init__(self, *args, precision: Precision, world_size: int = 1, **kwargs):
        refusal = self.refusal(precision.device, precision.name, world_size)
        if refusal:  # before anything is put on a device that may not be there
            raise UsageError(refusal)
        super().__init__(*args, precision=precision, world_size=world_size, **kwargs)
        device = self.precision.device
        self.lr = torch.zeros((), device=device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr  # fused SGD reads a tensor LR on the device
        self.ema_weight = torch.zeros((), device=device)
        self.static_draws = torch.zeros(5, device=device)
        self.graphs: dict[tuple, tuple] = {}  # shape -> (graph, images, labels, loss)
        self.steps_seen: dict[tuple, int] = {}
        self.pool = None
        self.side_stream = torch.cuda.Stream(device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, step: int, lr: float) -> torch.Tensor:
        """The loss, valid until the next call (a graph's output buffer)."""
        self.lr.fill_(lr)
        self.step_number.fill_(step)
        self.ema_weight.fill_(self.ema.weight_at(step) if self.ema else 0.0)
        self.static_draws.copy_(self.draws(step))
        shape = tuple(images.shape)
        if shape in self.graphs:
            graph, static_images, static_labels, loss = self.graphs[shape]
            static_images.copy_(images)
            static_labels.copy_(labels)
            graph.replay()
            return loss
        seen = self.steps_seen.get(shape, 0)
        self.steps_seen[shape] = seen + 1
        if seen == 0 and self.graphs:
            self.graphs.clear()  # a finished size: its graph and static buffers go, their pool once emptied
            self.pool = None  # the next capture: a fresh pool, never one whose blocks may outlive its graph
        if seen < self.WARMUP_STEPS:
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.body(images, labels, self.static_draws, self.ema_weight)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return loss
        static_images, static_labels = images.clone(), labels.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward then writes fresh grads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss = self.body(static_images, static_labels, self.static_draws, self.ema_weight)
        self.pool = graph.pool()
        self.graphs[shape] = (graph, static_images, static_labels, loss)
        graph.replay()  # capturing only recorded this step: now it runs
        return loss
