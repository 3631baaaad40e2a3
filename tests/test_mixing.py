"""Mixup/CutMix semantics (timm's Mixup, torchvision's v2.MixUp/CutMix) on CPU tensors."""
from __future__ import annotations

import pytest
import torch

from dali_imagenet.config import TrainConfig
from dali_imagenet.training.mixing import (
    MixConfig,
    apply_mix,
    cutmix_box,
    mix_batch,
    smooth_one_hot,
    soft_target_cross_entropy,
)

N, C, H, W, CLASSES = 6, 3, 16, 20, 10


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(N, C, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    return images, labels


def test_smooth_one_hot_rows_sum_to_one():
    targets = smooth_one_hot(torch.tensor([0, 9]), CLASSES, 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets[0, 0] == pytest.approx(0.9 + 0.01) and targets[0, 1] == pytest.approx(0.01)


@pytest.mark.parametrize("config", [MixConfig(0.2, 0.0, 0.5, 0.0), MixConfig(0.0, 1.0, 0.5, 0.0),
                                    MixConfig(0.2, 1.0, 0.5, 0.0)])
def test_targets_have_exactly_the_two_right_classes(config):
    images, labels = batch()
    for seed in range(20):
        mixed, targets = mix_batch(images, labels, CLASSES, config, torch.Generator().manual_seed(seed))
        assert torch.allclose(targets.sum(1), torch.ones(N))
        lam = targets[0, 0]
        assert 0.0 <= lam <= 1.0
        for i in range(N):
            nonzero = set(torch.nonzero(targets[i]).flatten().tolist())
            assert nonzero <= {int(labels[i]), int(labels[N - 1 - i])}  # paired with the mirror sample
            assert targets[i, labels[i]] == pytest.approx(float(lam), abs=1e-6)
        assert mixed.dtype == images.dtype and mixed.is_contiguous(memory_format=torch.channels_last)


def test_cutmix_weight_is_the_area_actually_pasted():
    images, labels = batch()
    config = MixConfig(0.0, 1.0, 0.5, 0.0)
    for seed in range(30):
        mixed, targets = mix_batch(images, labels, CLASSES, config, torch.Generator().manual_seed(seed))
        from_partner = (mixed[0] == images[N - 1]).all(0) & (mixed[0] != images[0]).any(0)
        kept = 1.0 - from_partner.sum().item() / (H * W)
        assert targets[0, labels[0]].item() == pytest.approx(kept, abs=1e-6)


def test_mixup_is_a_convex_combination_with_the_mirror():
    images, labels = batch()
    mixed, targets = mix_batch(images, labels, CLASSES, MixConfig(0.2, 0.0, 0.5, 0.0), torch.Generator().manual_seed(3))
    lam = targets[0, labels[0]]
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_mixup_edges(lam):
    images, labels = batch()
    targets = smooth_one_hot(labels, CLASSES, 0.0)
    mixed, mixed_targets = apply_mix(images, targets, torch.tensor(lam), torch.tensor(False),
                                     cutmix_box(torch.tensor(1.0), H, W, torch.rand(2)))
    expected = images if lam == 1.0 else images.flip(0)
    assert torch.equal(mixed, expected)
    assert torch.equal(mixed_targets, targets if lam == 1.0 else targets.flip(0))


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_cutmix_edges(lam):
    images, labels = batch()
    targets = smooth_one_hot(labels, CLASSES, 0.0)
    box = cutmix_box(torch.tensor(lam), H, W, torch.rand(2, generator=torch.Generator().manual_seed(0)))
    mixed, mixed_targets = apply_mix(images, targets, torch.tensor(0.5), torch.tensor(True), box)
    area = ((box[1] - box[0]) * (box[3] - box[2])).item()
    if lam == 1.0:  # an empty box: nothing pasted, targets untouched
        assert area == 0 and torch.equal(mixed, images) and torch.equal(mixed_targets, targets)
    else:  # the box covers what is left of it after clipping; λ follows the pasted area
        assert 0 < area <= H * W
        assert mixed_targets[0, labels[0]].item() == pytest.approx(1 - area / (H * W))


def test_alpha_zero_turns_mixing_off():
    images, labels = batch()
    mixed, targets = mix_batch(images, labels, CLASSES, MixConfig(0.0, 0.0, 0.5, 0.1))
    assert mixed is images
    assert torch.equal(targets, smooth_one_hot(labels, CLASSES, 0.1))


def test_switch_prob_picks_both_methods():
    images, labels = batch()
    config = MixConfig(0.2, 1.0, 0.5, 0.0)
    kinds = set()
    for seed in range(40):
        mixed, _ = mix_batch(images, labels, CLASSES, config, torch.Generator().manual_seed(seed))
        exact = ((mixed[0] == images[0]) | (mixed[0] == images[N - 1])).all().item()
        kinds.add("cutmix" if exact else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_soft_target_loss_equals_cross_entropy_on_one_hot():
    logits = torch.randn(5, CLASSES)
    labels = torch.randint(0, CLASSES, (5,))
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, smooth_one_hot(labels, CLASSES, 0.1)).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


@pytest.mark.gpu
def test_no_host_sync_on_gpu():
    images, labels = batch()
    images, labels = images.cuda().half(), labels.cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    mix_batch(images, labels, CLASSES, MixConfig.from_config(TrainConfig()), generator)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        mix_batch(images, labels, CLASSES, MixConfig.from_config(TrainConfig()), generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
