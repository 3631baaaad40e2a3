"""The budget recipes against the anchor they cite (FFCV's ResNet-50 configs), and the plan
benchmark that turns a recipe into measured hours and dollars."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, run_in_process

from dali_imagenet.config import load_config
from dali_imagenet.data.partition import batches_per_epoch
from dali_imagenet.training.schedule import LRSchedule, scaled_lr

# FFCV's rn50_configs: epochs -> (start_ramp, end_ramp); min_res 160, max_res 192, lr 1.7 at 8 x 512.
FFCV_RN50 = {16: (11, 13), 24: (17, 20), 40: (29, 34)}
FFCV_LR_PER_256 = 1.7 / (8 * 512) * 256


def ffcv_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int) -> int:
    """FFCV train_imagenet.py's get_resolution, as its source states the rule."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


def ffcv_lr(epoch: float, lr: float, epochs: int, lr_peak_epoch: int = 2) -> float:
    """FFCV's cyclic schedule, per iteration: linear in the (fractional) epoch."""
    return float(np.interp([epoch], [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0])[0])


@pytest.mark.parametrize("name, epochs", [("l4-16h", 40), ("l4-8h", 16)])
def test_the_size_at_every_epoch_is_ffcvs(name, epochs):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    start, end = FFCV_RN50[epochs]
    assert (cfg.epochs, cfg.min_image_size, cfg.image_size, cfg.ramp_start_epoch, cfg.ramp_end_epoch) == \
        (epochs, 160, 192, start, end)
    sizes = [cfg.train_image_size(e) for e in range(epochs)]
    assert sizes == [ffcv_resolution(e, 160, 192, start, end) for e in range(epochs)]
    assert sizes[0] == 160 and sizes[-1] == 192 and set(sizes) == {160, 192}
    if epochs == 40:
        assert sizes.count(160) == 32 and sizes.count(192) == 8  # FFCV's table: 160 px x 32, 192 px x 8


@pytest.mark.parametrize("start, end", [(0, 0), (3, 3), (29, 34), (11, 13), (5, 20)])
def test_the_size_rule_at_the_ramp_edges(start, end):
    from dali_imagenet.training.schedule import image_size_at

    for epoch in range(0, 45):
        ours = image_size_at(epoch, image_size=192, min_image_size=160, ramp_start_epoch=start,
                             ramp_end_epoch=end, step=32)
        assert ours == ffcv_resolution(epoch, 160, 192, start, end), epoch


@pytest.mark.parametrize("name", ["l4-16h", "l4-8h", "imagenette-gpu"])
def test_the_recipe_knobs_are_ffcvs(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert scaled_lr(cfg.lr, 256, cfg.lr_reference_batch) == pytest.approx(FFCV_LR_PER_256)
    assert scaled_lr(cfg.lr, 4096, cfg.lr_reference_batch) == pytest.approx(1.7)  # FFCV's own batch
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.label_smoothing) == (0.9, False, 1e-4, 0.1)
    assert (cfg.mixup_alpha, cfg.cutmix_alpha, cfg.drop_path) == (0, 0, 0)
    assert cfg.blurpool and not cfg.zero_init_last_bn and cfg.lr_schedule == "linear" and cfg.warmup_epochs == 2
    assert (cfg.val_image_size, cfg.val_crop_fraction, cfg.val_flip) == (256, 224 / 256, True)


def test_the_lr_at_the_first_step_at_epoch_2_and_at_the_last_step():
    cfg = load_config(REPO / "configs" / "l4-16h.yaml")
    steps_per_epoch = batches_per_epoch(1_281_167, 1, cfg.batch_size, train=True)
    peak = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_reference_batch)
    schedule = LRSchedule(peak, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                          cfg.min_lr, cfg.lr_schedule)
    first, total = schedule.at(0), cfg.epochs * steps_per_epoch
    assert first == pytest.approx(peak / (2 * steps_per_epoch)) and first < 1.1e-4 * peak  # ~0, as FFCV's 1e-4 x peak
    assert schedule.at(2 * steps_per_epoch) == pytest.approx(peak)  # the peak at epoch 2
    assert schedule.at(total - 1) == pytest.approx(peak / (total - 2 * steps_per_epoch))  # one step above 0
    for step in (1, steps_per_epoch, 3 * steps_per_epoch + 17, 20 * steps_per_epoch, total - 1):
        assert schedule.at(step) == pytest.approx(ffcv_lr(step / steps_per_epoch, peak, cfg.epochs), rel=2e-3, abs=2e-5)


@pytest.mark.slow
def test_plan_smoke_on_cpu(sample_shards, tmp_path):
    out = tmp_path / "plan.json"
    from benchmarks import plan as planner

    result = run_in_process(
        planner.main,
        [
            "plan",
            "--config",
            REPO / "configs" / "l4-16h.yaml",
            "--data",
            sample_shards,
            "--device",
            "cpu",
            "--seconds",
            "0.2",
            "--json",
            out,
            "--spot-price-per-hour",
            "0.3",
            "--reclaims",
            "0",
            "2",
            "--cross-region",
            *[
                f"--set={item}"
                for item in (
                    "arch=resnet10",
                    "width=16",
                    "batch_size=4",
                    "compile=false",
                    "min_image_size=32",
                    "image_size=64",
                    "val_image_size=32",
                    "loader_threads=1",
                    "ema_decay=0.9",
                )
            ],
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(out.read_text())
    rows = plan["phases"]
    assert [r["image_size"] for r in rows[:2]] == [32, 64] and [r["epochs"] for r in rows[:2]] == [32, 8]
    assert rows[2]["phase"] == "validation x 10" and rows[3]["phase"].startswith("warm-up")
    assert rows[4]["phase"] == "provisioning + setup" and rows[4]["hours"] == pytest.approx((3.5 + 2) / 60)
    # each launch waits for what its first step reads, not ImageNet's 147 GB (7.8 min at a g6.xlarge's 2.5 Gbit/s):
    # ~6 GB at the start, a relaunch half-way through an epoch ~70 GB more
    cfg = load_config(str(REPO / "configs" / "l4-16h.yaml"), ["batch_size=4"])
    start, relaunch = (planner.first_step_gb(cfg, 147, 1_281_167, 50_000, epoch_done=done) for done in (0, 0.5))
    assert 5 < start < 8 and 70 < relaunch - start < 72
    assert rows[5]["phase"] == "staging to the first step"
    assert rows[5]["hours"] == pytest.approx(start * 8 / 2.5 / 3600)  # the link bounds it (the CPUs: 1.6 GB/s)
    assert planner.measured_s3()["gets_per_sample"] == pytest.approx(2.80625)  # docs/results/s3.jsonl
    none, two = plan["reclaims"]
    relaunch_h = none["relaunch_min"] / 60  # a new machine: provisioning, setup, staging, compile, EC2's notice
    assert relaunch_h == pytest.approx((3.5 + 2 + 2) / 60 + relaunch * 8 / 2.5 / 3600
                                       + plan["launch"]["compile_min"] / 60)
    assert none["total_hours"] == pytest.approx(sum(r["hours"] for r in rows))
    assert two["total_hours"] == pytest.approx(none["total_hours"] + 2 * relaunch_h)
    assert two["overhead_hours"] - none["overhead_hours"] == pytest.approx(2 * relaunch_h)
    assert none["data"]["cross_region_gb"] == 147 and two["data"]["cross_region_gb"] == 3 * 147  # each stages again
    data = plan["data"]
    assert data["streamed_gets"] == round(2.80625 * (40 * 1_281_167 + 10 * 50_000))  # l4-16h: 40 epochs, 10 vals
    assert plan["total_dollars"] == pytest.approx(plan["dollars"] + data["dollars"])
    assert two["spot_dollars"] == pytest.approx(two["total_hours"] * 0.3)
    assert all(r["step_images_per_s"] > 0 and r["loader_images_per_s"] > 0 for r in rows[:3])
    for row in rows[:2]:  # hours: the epochs at the slower of step and loader
        rate = min(row["step_images_per_s"], row["loader_images_per_s"])
        assert row["hours"] == pytest.approx(row["epochs"] * 1_281_167 / rate / 3600)
    assert plan["total_hours"] == pytest.approx(sum(r["hours"] for r in rows))
    assert plan["dollars"] == pytest.approx(plan["total_hours"] * plan["price_per_hour"])
    assert plan["spot_dollars"] == pytest.approx(plan["total_hours"] * 0.3)
    assert "| epochs 1-32 | 32 | 32 |" in result.stdout and "on demand" in result.stdout
    assert f"| 2 | {two['total_hours']:.2f} | {two['overhead_hours']:.2f} |" in result.stdout


def test_an_interruption_rate_is_expected_reclaims_over_a_run_each_relaunch_makes_longer():
    from benchmarks.plan import relaunches

    # 0.05 reclaims an hour over a 16 h run whose relaunches take 0.4 h each: r = 0.05 * (16 + 0.4 r)
    (expected,) = relaunches(16.0, 0.4, reclaims=[0], rate=0.05)
    assert expected == pytest.approx(0.05 * (16 + 0.4 * expected)) and expected == pytest.approx(0.8 / 0.98)
    assert relaunches(16.0, 0.4, reclaims=[0, 2, 4], rate=None) == [0, 2, 4]
    with pytest.raises(ValueError, match="never ends"):
        relaunches(16.0, 0.5, reclaims=[0], rate=2.0)
