"""The train step the trainer calls: eager on any device, and as a CUDA graph on a GPU."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dali_imagenet.config import TrainConfig
from dali_imagenet.errors import UsageError
from dali_imagenet.training.ema import WeightEMA
from dali_imagenet.training.mixing import MixConfig
from dali_imagenet.training.model import build_model
from dali_imagenet.training.precision import Precision
from dali_imagenet.training.schedule import parameter_groups
from dali_imagenet.training.step import GraphedTrainStep, TrainStep


def make_step(step_class, device: str, dtype: str = "float32", ema: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("resnet18", 10, drop_path_rate=0.0).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, 1e-4), lr=0.1, momentum=0.9, nesterov=True,
                                fused=device == "cuda")
    precision = Precision.for_device(dtype, device)
    return step_class(model, model, optimizer, precision.scaler(), precision=precision,
                      mix=MixConfig.from_config(TrainConfig()), num_classes=10,
                      ema=WeightEMA(model, 0.99) if ema else None, seed=seed)


def batches(device: str, count: int, size: int = 32):
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        images = torch.randn(8, 3, size, size, generator=generator).to(device).contiguous(
            memory_format=torch.channels_last)
        yield images, torch.randint(0, 10, (8,), generator=generator).to(device)


def test_eager_step_records_the_first_bad_step():
    step = make_step(TrainStep, "cpu")
    losses = [step(x, y, step=i, lr=0.05) for i, (x, y) in enumerate(batches("cpu", 3))]
    assert all(torch.isfinite(loss) for loss in losses) and step.bad_step() is None
    x, y = next(batches("cpu", 1))
    step(x * float("nan"), y, step=3, lr=0.05)
    step(x, y, step=4, lr=0.05)
    assert step.bad_step() == 3  # the first one, not the latest


def test_graphed_step_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="needs a GPU"):
        make_step(GraphedTrainStep, "cpu")


def test_graph_guard_counts_processes_not_wrappers():
    """Under `compile: true` the DDP module sits inside torch.compile's wrapper, where an
    isinstance check cannot see it: the guard must go by the number of processes."""
    cuda = torch.device("cuda", 0)
    assert GraphedTrainStep.refusal(cuda, "bfloat16", world_size=1) is None
    assert "one process" in GraphedTrainStep.refusal(cuda, "bfloat16", world_size=2)
    assert "float16" in GraphedTrainStep.refusal(cuda, "float16", world_size=1)
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model)  # what train.py makes of a DDP module with compile: true
    assert not isinstance(compiled, torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(UsageError, match="one process"):
        GraphedTrainStep(model, compiled, torch.optim.SGD(model.parameters()), None, world_size=2,
                         precision=Precision("bfloat16", cuda), mix=MixConfig(0, 0, 0.5, 0), num_classes=2)


# Ops that read a device tensor's value on the host (a sync; illegal inside a CUDA graph), or
# whose output shape depends on the data (the host must wait to learn it).
HOST_READS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
              "_unique", "repeat_interleave", "allclose", "tolist")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def host_reads(self) -> list[str]:
        return sorted({op for op in self.ops if op.lstrip("_").startswith(tuple(r.lstrip("_") for r in HOST_READS))})


def test_the_recorder_sees_a_host_read():
    with RecordOps() as recorder:
        x = torch.ones(3)
        float(x.sum())
        bool(x.any())
        torch.nonzero(x)
    assert recorder.host_reads() == ["_local_scalar_dense", "nonzero"]


def test_no_host_sync_in_what_the_cuda_graph_captures():
    """The graphed step's per-step work, run on the CPU under a dispatch recorder: the mixing
    draws, mixup/cutmix, forward under autocast, loss, backward, fused SGD with a tensor LR, the
    EMA update with a device weight and the NaN record. Any op that reads a value on the host
    fails here, so a future `.item()`, `float(t)` or `if t:` in the step fails CI."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, drop_path_rate=0.1, blurpool=True).to(memory_format=torch.channels_last)
    lr = torch.tensor(0.05)
    optimizer = torch.optim.SGD(parameter_groups(model, 1e-4), lr=lr, momentum=0.9, nesterov=True, fused=True)
    precision = Precision.for_device("bfloat16", "cpu")
    step = TrainStep(model, model, optimizer, precision.scaler(), precision=precision,
                     mix=MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_switch_prob=0.5, label_smoothing=0.1),
                     num_classes=10, ema=WeightEMA(model, 0.99))
    images, labels = next(batches("cpu", 1))
    ema_weight = torch.tensor(0.25)
    before = [p.detach().clone() for p in step.ema.module.parameters()]
    for number in range(2):  # the second step has momentum buffers: SGD's other branch
        with RecordOps() as recorder:
            draws = step.draws(number)
            loss = step.body(images, labels, draws, ema_weight)
        assert recorder.host_reads() == [], f"host reads in the step: {recorder.host_reads()}"
        assert "convolution_backward" in recorder.ops and "_fused_sgd_" in recorder.ops  # it really ran
    assert torch.isfinite(loss) and step.bad_step() is None
    assert any(not torch.equal(a, b) for a, b in zip(before, step.ema.module.parameters()))  # the EMA moved


def test_ema_with_a_device_weight_equals_the_float_update():
    model = build_model("resnet18", 10)
    tensor_ema, float_ema = WeightEMA(model, 0.9), WeightEMA(model, 0.9)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    with RecordOps() as recorder:
        tensor_ema.lerp(model, torch.tensor(0.3))
    assert recorder.host_reads() == []
    float_ema.lerp(model, 0.3)
    for a, b in zip(tensor_ema.module.state_dict().values(), float_ema.module.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_graph_step_matches_eager():
    """20 steps over two input sizes (two graphs, the first dropped for the second) give the eager
    step's losses, within bf16's tolerance, and the same EMA."""
    eager, graphed = make_step(TrainStep, "cuda", "bfloat16"), make_step(GraphedTrainStep, "cuda", "bfloat16")
    eager_losses, graph_losses = [], []
    for i, ((x, y), size) in enumerate(zip(batches("cuda", 20), [32] * 10 + [48] * 10)):
        x = torch.nn.functional.interpolate(x.float(), size=size).contiguous(memory_format=torch.channels_last)
        lr = 0.05 * (1 - i / 20)
        eager_losses.append(float(eager(x, y, step=i, lr=lr)))
        graph_losses.append(float(graphed(x, y, step=i, lr=lr)))
    assert list(graphed.graphs) == [(8, 3, 48, 48)]  # the 32 px graph went when the ramp moved on (its pool reused)
    assert torch.allclose(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=0.05, atol=0.05), \
        (graph_losses, eager_losses)
    for a, b in zip(eager.ema.module.parameters(), graphed.ema.module.parameters()):
        assert torch.allclose(a, b, rtol=0.05, atol=0.02)


@pytest.mark.gpu
def test_cuda_graph_ramp_160_to_192_recaptures_into_a_fresh_pool():
    """The l4-16h ramp's sizes, with the 160 px loss still held (as the train loop holds its last
    loss) when the 192 px graph is captured: no allocator error, a new pool, finite losses."""
    graphed = make_step(GraphedTrainStep, "cuda", "bfloat16")
    losses, pools = [], []
    for i, ((x, y), size) in enumerate(zip(batches("cuda", 12), [160] * 6 + [192] * 6)):
        x = torch.nn.functional.interpolate(x.float(), size=size).contiguous(memory_format=torch.channels_last)
        losses.append(graphed(x, y, step=i, lr=0.05))  # the graphs' output buffers kept alive
        pools.append(graphed.pool)
    torch.cuda.synchronize()
    assert list(graphed.graphs) == [(8, 3, 192, 192)]
    assert pools[5] is not None and pools[-1] is not None and pools[-1] != pools[5]
    assert all(torch.isfinite(loss) for loss in losses[-3:])
