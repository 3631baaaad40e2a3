"""ResNet-18/34/50/101/152 (v1.5: stride in the 3x3 conv) with drop path, torchvision-compatible.

Parameter and buffer names and shapes are torchvision's, so its state dicts load into these
models and theirs into torchvision's. Drop path (stochastic depth) drops a sample's residual
branch with a probability rising linearly with depth, as in timm. BlurPool (Zhang, "Making
convolutional networks shift-invariant again", 2019) low-passes the input of every strided conv
of the residual stages, which FFCV's short ResNet-50 recipes use; it has no weights, so the
state-dict keys stay torchvision's with it on or off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 64  # channels of a ResNet's first stage in the paper (and of its stem, whatever the width)
LAYOUTS = {
    "resnet10": ("basic", [1, 1, 1, 1]),  # the smallest: tests, smoke runs, CPU demos (5.4M weights; 0.45M at width 16)
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Zeroes whole samples of a residual branch with probability `rate`, scaling the rest by 1/(1-rate)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class BlurPool(nn.Module):
    """A fixed 3x3 binomial blur ([1,2,1] x [1,2,1] / 16), one per channel, stride 1: what a
    strided conv that follows sees has no frequencies above its new Nyquist limit."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :] / 16).expand(channels, 1, 3, 3).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)  # not in the state dict: keys stay torchvision's

    def forward(self, x):
        return F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=x.shape[1])


def _blur(channels: int, stride: int, blurpool: bool) -> nn.Module:
    return BlurPool(channels) if (blurpool and stride > 1) else nn.Identity()


def _downsample(inplanes: int, planes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inplanes == planes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, drop_rate: float, blurpool: bool = False):
        super().__init__()
        self.blur = _blur(inplanes, stride, blurpool)  # shared by conv1 and the downsample: both stride
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride)
        self.drop_rate = drop_rate

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x):
        x = self.blur(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(drop_path(out, self.drop_rate, self.training) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, drop_rate: float, blurpool: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.blur = _blur(planes, stride, blurpool)
        self.blur_identity = _blur(inplanes, stride, blurpool)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * 4, stride)
        self.drop_rate = drop_rate

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(self.blur_identity(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(self.blur(out))))
        out = self.bn3(self.conv3(out))
        return self.relu(drop_path(out, self.drop_rate, self.training) + identity)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, drop_path_rate: float = 0.0,
                 zero_init_last_bn: bool = True, blurpool: bool = False, width: int = WIDTH):
        """`width`: the first stage's channels, doubled at each stage after. The stem keeps the
        paper's whatever the width, as timm's ResNet does with its `channels`: the same network."""
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        total, index, inplanes = sum(layers), 0, WIDTH
        for stage, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
            stage_blocks = []
            for i in range(blocks):
                rate = drop_path_rate * index / max(1, total - 1)
                stage_blocks.append(block(inplanes, planes, 2 if (i == 0 and stage > 0) else 1, rate, blurpool))
                inplanes, index = planes * block.expansion, index + 1
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last_bn:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_bn.weight)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(arch: str, num_classes: int = 1000, drop_path_rate: float = 0.0,
                zero_init_last_bn: bool = True, blurpool: bool = False, width: int = WIDTH) -> ResNet:
    if arch not in LAYOUTS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(LAYOUTS)}")
    kind, layers = LAYOUTS[arch]
    block = Bottleneck if kind == "bottleneck" else BasicBlock
    return ResNet(block, layers, num_classes, drop_path_rate, zero_init_last_bn, blurpool, width)
