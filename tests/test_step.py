"""The train step the trainer calls: eager on any device, and as a CUDA graph on a GPU."""
from __future__ import annotations

import pytest
import torch

from dali_imagenet.config import TrainConfig
from dali_imagenet.ema import WeightEMA
from dali_imagenet.mixing import MixConfig
from dali_imagenet.model import build_model
from dali_imagenet.precision import Precision
from dali_imagenet.schedule import parameter_groups
from dali_imagenet.step import GraphedTrainStep, TrainStep


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
    with pytest.raises(ValueError, match="needs a GPU"):
        make_step(GraphedTrainStep, "cpu")


@pytest.mark.gpu
def test_cuda_graph_step_matches_eager():
    """20 steps over two input sizes (so two graphs) give the eager step's losses, within bf16's
    tolerance, and the same EMA."""
    eager, graphed = make_step(TrainStep, "cuda", "bfloat16"), make_step(GraphedTrainStep, "cuda", "bfloat16")
    eager_losses, graph_losses = [], []
    for i, ((x, y), size) in enumerate(zip(batches("cuda", 20), [32] * 10 + [48] * 10)):
        x = torch.nn.functional.interpolate(x.float(), size=size).contiguous(memory_format=torch.channels_last)
        lr = 0.05 * (1 - i / 20)
        eager_losses.append(float(eager(x, y, step=i, lr=lr)))
        graph_losses.append(float(graphed(x, y, step=i, lr=lr)))
    assert len(graphed.graphs) == 2
    assert torch.allclose(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=0.05, atol=0.05), \
        (graph_losses, eager_losses)
    for a, b in zip(eager.ema.module.parameters(), graphed.ema.module.parameters()):
        assert torch.allclose(a, b, rtol=0.05, atol=0.02)
