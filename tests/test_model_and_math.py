"""Model builder (torchvision compatibility, drop path), LR schedule, config and checkpoint files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from dali_imagenet.config import ConfigError, TrainConfig, load_config
from dali_imagenet.run import checkpoint as ckpt
from dali_imagenet.run import checkpoint as saved
from dali_imagenet.run import run_folder
from dali_imagenet.run.resume import read_last
from dali_imagenet.run.run_folder import RunError
from dali_imagenet.training.model import WIDTH, build_model, drop_path
from dali_imagenet.training.schedule import lr_at, parameter_groups, scaled_lr

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dicts_round_trip(arch):
    ours = build_model(arch, 1000, drop_path_rate=0.1).eval()
    theirs = getattr(torchvision.models, arch)(weights=None).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    theirs.load_state_dict(build_model(arch, 1000).state_dict(), strict=True)
    if arch == "resnet18":  # resnet10 is resnet18 with one block a stage: a prefix of its state dict
        small = build_model("resnet10", 1000).state_dict()
        assert set(small) < set(theirs.state_dict()) and sum(v.numel() for k, v in small.items()
                                                             if k.endswith(("weight", "bias"))) == 5_418_792
    if arch == "resnet50":
        assert sum(p.numel() for p in ours.parameters()) == 25_557_032


def test_drop_path_rates_rise_with_depth_and_zero_init():
    model = build_model("resnet50", 10, drop_path_rate=0.1, zero_init_last_bn=True)
    blocks = [m for m in model.modules() if hasattr(m, "drop_rate")]
    rates = [b.drop_rate for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert all(torch.count_nonzero(b.last_bn.weight) == 0 for b in blocks)


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2, 2)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert y.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_channels_last_forward():
    model = build_model("resnet18", 5).to(memory_format=torch.channels_last)
    out = model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 5)


def test_lr_schedule_edges():
    kw = dict(peak_lr=0.4, total_steps=1000, warmup_steps=100, min_lr=1e-5)
    assert lr_at(0, **kw) == pytest.approx(0.4 / 100)  # step 0 already trains
    assert lr_at(99, **kw) == pytest.approx(0.4)  # warmup ends at the peak
    assert lr_at(100, **kw) == pytest.approx(0.4)
    assert lr_at(550, **kw) == pytest.approx(1e-5 + 0.5 * (0.4 - 1e-5))  # cosine midpoint
    assert 1e-5 < lr_at(999, **kw) < 1e-5 + 1e-5  # last step: just above the floor
    assert lr_at(1000, **kw) == lr_at(5000, **kw) == pytest.approx(1e-5)
    values = [lr_at(s, **kw) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    no_warmup = dict(kw, warmup_steps=0)
    assert lr_at(0, **no_warmup) == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, 128) == pytest.approx(0.8)


def test_no_weight_decay_on_batchnorm_and_bias():
    model = build_model("resnet18", 10)
    decay, no_decay = parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])
    assert any(p is model.fc.bias for p in no_decay["params"]) and any(
        p is model.bn1.weight for p in no_decay["params"]
    )


def test_config_files_load_and_override():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    cfg = load_config(REPO / "configs" / "imagenet1k.yaml", ["batch_size=256", "nesterov=false", "lr=0.2"])
    assert (cfg.batch_size, cfg.nesterov, cfg.lr, cfg.epochs) == (256, False, 0.2, 90)
    assert load_config().batch_size == TrainConfig().batch_size


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="epochs: expected int"):
        load_config(None, ["epochs=1.5"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("item, message", [("no_such_key=1", "unknown key 'no_such_key'"),
                                           ("batch_size=abc", "batch_size: expected int"),
                                           ("nesterov=maybe", "nesterov: expected true or false"),
                                           ("arch=vgg", "arch must be"),
                                           ("width=0", "width must be > 0"),
                                           ("arch=timm:test_resnet,width=32", "leave width at 64")])
def test_bad_set_names_the_key(item, message):
    """What train.py prints as its one line for a bad --set (checked end to end in test_train)."""
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, item.split(","))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ["resnet10", "resnet50"])
def test_a_narrow_resnet_is_timms_resnet_with_those_channels(arch):
    """`width` scales each stage (the stem stays 64): timm's ResNet with `channels` is the same
    network, key for key and logit for logit, whatever the width (the published format's claim)."""
    import timm

    from dali_imagenet.run.published import timm_equivalent

    for width in (64, 16):
        ours = build_model(arch, 10, width=width).eval()
        name, model_args = timm_equivalent(arch, False, width)
        theirs = timm.create_model(name, num_classes=10, **model_args).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))
        assert ours.layer4[0].conv1.out_channels == 8 * width and ours.conv1.out_channels == 64
    assert sum(p.numel() for p in build_model("resnet10", 1000, width=16).parameters()) == 453_576  # 5.4M at width 64
    assert TrainConfig().width == WIDTH  # the config's default is the paper's


def fake_checkpoint(step: int, **extra) -> dict:
    return {"model": {}, "optimizer": {}, "scaler": {}, "config": {}, "state": {"step": step}, **extra}


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_atomic(fake_checkpoint(1, w=torch.ones(3)), tmp_path / run_folder.LAST)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic(fake_checkpoint(2, w=torch.zeros(3)), tmp_path / run_folder.LAST)
    monkeypatch.undo()
    assert read_last(tmp_path)["state"]["step"] == 1
    run_folder.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_folder.LAST]


def test_an_unreadable_last_checkpoint_is_refused_not_passed_over(tmp_path):
    """A resume never goes back in time silently: a garbage last.pt beside a good older best.pt
    stops the run with one line naming it, instead of continuing from best.pt."""
    ckpt.save_atomic(fake_checkpoint(5), tmp_path / run_folder.LAST)
    run_folder.mark_best(tmp_path)
    ckpt.save_atomic(fake_checkpoint(9), tmp_path / run_folder.LAST)
    assert read_last(tmp_path)["state"]["step"] == 9
    (tmp_path / run_folder.LAST).write_bytes(b"garbage")
    with pytest.raises(RunError) as error:
        read_last(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / run_folder.LAST}: not a checkpoint")
    assert "no older checkpoint is used" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / run_folder.LAST).unlink()
    with pytest.raises(RunError, match="best.pt but no last.pt: pass --resume"):
        read_last(tmp_path)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(3)
    ckpt.save_atomic({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = torch.rand(3)
    ckpt.restore_rng_state(saved.load(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_linear_lr_schedule_edges():
    kw = dict(peak_lr=0.4, total_steps=1000, warmup_steps=100, min_lr=0.0, shape="linear")
    assert lr_at(0, **kw) == pytest.approx(0.4 / 100)
    assert lr_at(99, **kw) == lr_at(100, **kw) == pytest.approx(0.4)  # the top of the triangle
    assert lr_at(550, **kw) == pytest.approx(0.2)  # halfway down: half the peak
    assert lr_at(999, **kw) == pytest.approx(0.4 / 900)
    assert lr_at(1000, **kw) == lr_at(2000, **kw) == 0.0
    values = [lr_at(s, **kw) for s in range(100, 1001)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert lr_at(0, **dict(kw, warmup_steps=0)) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_at(5, **dict(kw, shape="step"))


def test_image_size_schedule_edges():
    from dali_imagenet.training.schedule import image_size_at

    ramp = dict(image_size=192, min_image_size=160, ramp_start_epoch=10, ramp_end_epoch=13, step=32)
    sizes = [image_size_at(e, **ramp) for e in range(16)]
    assert sizes[0] == sizes[10] == 160  # first epoch and the ramp's start: the small size
    assert sizes[13] == sizes[15] == 192  # the ramp's end and the last epoch: the full size
    assert sizes == sorted(sizes) and all(s % 32 == 0 for s in sizes)
    assert set(sizes) == {160, 192}  # only multiples of the step: one compiled graph each
    assert [image_size_at(e, image_size=224) for e in (0, 50, 89)] == [224, 224, 224]  # no ramp: fixed
    fine = dict(image_size=128, min_image_size=64, ramp_start_epoch=2, ramp_end_epoch=6, step=16)
    assert [image_size_at(e, **fine) for e in range(8)] == [64, 64, 64, 80, 96, 112, 128, 128]


def test_config_train_image_size_and_ramp_checks():
    cfg = load_config(None, ["min_image_size=160", "image_size=192", "ramp_start_epoch=2", "ramp_end_epoch=4"])
    assert [cfg.train_image_size(e) for e in range(6)] == [160, 160, 160, 192, 192, 192]
    with pytest.raises(ConfigError, match="size ramp"):
        load_config(None, ["min_image_size=256", "image_size=192"])
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(None, ["lr_schedule=step"])


def test_ema_decay_warms_up_and_the_update_is_a_lerp():
    from dali_imagenet.training.ema import WeightEMA, ema_decay_at

    assert ema_decay_at(0, 0.999) == 0.0  # the first update copies the weights
    assert ema_decay_at(1, 0.999) == pytest.approx(1 - 2 ** -0.75)
    assert ema_decay_at(10**6, 0.999) == 0.999  # capped
    decays = [ema_decay_at(s, 0.9999) for s in range(0, 5000, 50)]
    assert decays == sorted(decays)

    model = build_model("resnet18", 4)
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bn1.running_mean.add_(2.0)
        model.bn1.num_batches_tracked.add_(7)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model, step=1000)  # decay 0.9 (capped)
    after, now = ema.module.state_dict(), model.state_dict()
    for key in ("conv1.weight", "fc.bias", "bn1.running_mean"):
        assert torch.allclose(after[key], 0.9 * before[key] + 0.1 * now[key], atol=1e-6), key
    assert int(after["bn1.num_batches_tracked"]) == int(now["bn1.num_batches_tracked"])  # a counter is copied
    ema.update(model, step=0)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()))


def test_flip_tta_on_a_flip_symmetric_input():
    from dali_imagenet.training.evaluation import evaluate, predict_logits
    from dali_imagenet.training.precision import Precision

    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    half = torch.randn(6, 3, 32, 16)
    symmetric = torch.cat([half, half.flip(3)], dim=3)  # equal to its mirror image
    with torch.no_grad():
        assert torch.allclose(predict_logits(model, symmetric, flip=True), model(symmetric), atol=1e-5)
        images = torch.randn(6, 3, 32, 32)
        expected = (model(images) + model(images.flip(3))) / 2
        assert torch.allclose(predict_logits(model, images, flip=True), expected, atol=1e-6)
        assert not torch.allclose(predict_logits(model, images, flip=True), model(images), atol=1e-3)
    labels = model(symmetric).argmax(1)
    batches = [(symmetric, labels)]
    precision = Precision.for_device("float32", "cpu")
    plain = evaluate({"": model, "ema": model}, batches, precision, channels_last=False)
    flipped = evaluate({"": model}, batches, precision, flip=True, channels_last=False)
    assert plain["top1"] == plain["ema_top1"] == flipped["top1"] == 100.0 and plain["images"] == 6


def test_the_better_weights_of_a_validation_and_what_auto_loads():
    """One rule for best.pt, the page, the index and --weights auto: the EMA only when strictly higher."""
    from dali_imagenet.training.evaluation import better_weights

    assert better_weights({"top1": 70.0, "ema_top1": 71.5}) == ("ema", 71.5)
    assert better_weights({"top1": 70.0, "ema_top1": 70.0}) == ("raw", 70.0)  # a tie keeps the raw weights
    assert better_weights({"top1": 70.0}) == ("raw", 70.0)  # no EMA kept
    assert better_weights({"val_top1": 3.0, "val_ema_top1": 4.0, "top1": 9.0}, "val_") == ("ema", 4.0)  # a log record
    assert better_weights({}) == ("raw", -1.0)  # no validation yet
    raw, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    for history, expected in (([{"top1": 1.0, "ema_top1": 2.0}], ema), ([{"top1": 2.0, "ema_top1": 1.0}], raw),
                              ([], raw)):
        checkpoint = fake_checkpoint(1, model=raw, ema={"weights": ema}, state={"history": history})
        assert saved.weights(checkpoint, "auto") is expected


def test_blurpool_keeps_shapes_and_state_dict_keys():
    x = torch.randn(2, 3, 64, 64)
    for arch in ("resnet18", "resnet50"):
        plain, blurred = build_model(arch, 7).eval(), build_model(arch, 7, blurpool=True).eval()
        assert list(plain.state_dict()) == list(blurred.state_dict())  # torchvision's keys, with it on or off
        assert [m for m in plain.modules() if type(m).__name__ == "BlurPool"] == []
        assert len([m for m in blurred.modules() if type(m).__name__ == "BlurPool"]) > 0
        blurred.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert plain(x).shape == blurred(x).shape == (2, 7)
            assert not torch.allclose(plain(x), blurred(x))  # the blur does change what strided convs see
    theirs = torchvision.models.resnet50(weights=None)
    build_model("resnet50", 1000, blurpool=True).load_state_dict(theirs.state_dict(), strict=True)


def test_blurpool_is_a_normalised_low_pass():
    from dali_imagenet.training.model import BlurPool

    flat = torch.full((1, 4, 8, 8), 3.0)
    assert torch.allclose(BlurPool(4)(flat)[..., 1:-1, 1:-1], flat[..., 1:-1, 1:-1])  # constants pass
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1
    assert BlurPool(1)(checker.view(1, 1, 8, 8).float())[..., 1:-1, 1:-1].abs().max() < 1e-6  # Nyquist removed


def test_grad_cam_peaks_where_the_logit_looks():
    """A model whose class-0 features see only the image's top-left quarter and class 1's only its
    bottom-right: each class's map peaks in its own quarter and is zero in the other."""
    from dali_imagenet.inference.gradcam import grad_cam

    class Quarters(torch.nn.Module):
        def forward(self, features):
            h, w = features.shape[-2:]
            mask = torch.zeros_like(features)
            mask[:, :2, : h // 2, : w // 2] = 1
            mask[:, 2:, h // 2:, w // 2:] = 1
            return features * mask

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            torch.nn.init.uniform_(self.conv.weight, 0.01, 0.1)  # positive: every pixel excites every channel
            self.layer4 = Quarters()

        def forward(self, x):
            a = self.layer4(torch.relu(self.conv(x)))
            return torch.stack([a[:, :2].mean(dim=(1, 2, 3)), a[:, 2:].mean(dim=(1, 2, 3))], 1)

    torch.manual_seed(0)
    model, image = Toy(), torch.rand(1, 3, 32, 32)
    for target, (rows, cols), (other_rows, other_cols) in (
        (0, (slice(0, 16), slice(0, 16)), (slice(16, 32), slice(16, 32))),
        (1, (slice(16, 32), slice(16, 32)), (slice(0, 16), slice(0, 16))),
    ):
        cam = grad_cam(model, image, target)
        assert cam.shape == (32, 32) and float(cam.max()) == pytest.approx(1.0)
        peak_row, peak_col = divmod(int(cam.argmax()), 32)
        assert rows.start <= peak_row < rows.stop and cols.start <= peak_col < cols.stop
        assert float(cam[other_rows, other_cols].max()) < 0.05
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients left behind


def test_predictions_per_class_confusions_and_examples(tmp_path):
    import numpy as np

    from dali_imagenet.inference.predictions import Predictions

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    top1 = np.array([0, 1, 1, 1, 0, 2, 2, 1, 2])
    top5 = np.stack([top1, *(np.full(9, c) for c in (3, 4, 5, 6))], 1)
    predictions = Predictions(np.array([f"k{i}" for i in range(9)]), labels, top5, np.full((9, 5), 0.2), "ema", 4)
    path = predictions.save(tmp_path / "predictions.npz")
    again = Predictions.load(path)
    assert list(again.keys) == list(predictions.keys) and again.weights == "ema" and again.epoch == 4
    assert [c["top1"] for c in again.per_class(4)] == [pytest.approx(100 / 3), 50.0, 75.0, None]
    assert again.confusions() == [{"true": 0, "predicted": 1, "count": 2, "share": pytest.approx(2 / 3)},
                                  {"true": 1, "predicted": 0, "count": 1, "share": 0.5},
                                  {"true": 2, "predicted": 1, "count": 1, "share": 0.25}]
    shown = again.examples(4, seed=3)
    assert shown == again.examples(4, seed=3) and len(shown) == 4  # the same rows every time
    assert sum(not again.correct[i] for i in shown) == 2  # half wrong, half right
    assert len(again.examples(12)) == 9 and sum(not again.correct[i] for i in again.examples(8)) == 4
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(Exception, match="not a predictions file"):
        Predictions.load(tmp_path / "bad.npz")


def test_data_cost_prices_requests_and_bytes_moved_across_regions_only():
    from dali_imagenet.run.cost import cost, data_cost, describe_cost

    prices = dict(get_price_per_1000=0.0004, put_price_per_1000=0.005, cross_region_price_per_gb=0.02)
    usage = {"get": 10_000, "put": 2_000, "free": 5, "buckets": {
        "data": {"bytes_in": 147e9, "bytes_out": 0, "region": "us-west-2"},
        "runs": {"bytes_in": 0, "bytes_out": 3e9, "region": "us-east-1"}}}
    here = data_cost(usage, instance_region="us-east-1", **prices)
    assert here["cross_region_gb"] == pytest.approx(147)  # the data bucket's GB; the run bucket is in the region
    assert here["dollars"] == pytest.approx(10_000 * 0.0004 / 1000 + 2_000 * 0.005 / 1000 + 147 * 0.02)
    unknown = data_cost(usage, instance_region=None, **prices)  # off EC2: no region to compare, nothing charged
    assert unknown["cross_region_gb"] == 0 and unknown["dollars"] == pytest.approx(0.004 + 0.01)
    streamed = data_cost({"get": 0, "put": 0, "buckets": {}}, instance_region=None, streamed_gets=1_000_000, **prices)
    assert streamed["dollars"] == pytest.approx(0.4)
    run = cost([launch(3600)], gpus=1, lifecycle=None, data=here)
    assert run["total_dollars"] == pytest.approx(0.8 + here["dollars"]) and run["dollars"] == pytest.approx(0.8)
    assert describe_cost(run).endswith("; S3 $2.95 (10,000 GETs, 2,000 PUTs, 147.00 GB in, 147.00 GB across regions)")
    quiet = cost([launch(60)], gpus=0, lifecycle=None,
                 data=data_cost({"get": 0, "put": 0, "buckets": {}}, instance_region=None, **prices))
    assert "S3" not in describe_cost(quiet)  # a run that never touched S3 says nothing of it
    assert "(est.)" in describe_cost(cost([launch(60)], gpus=0, lifecycle=None, data=streamed))


def launch(seconds: float, *, price: float = 0.8, training: float | None = None) -> dict:
    """One launch's record as `LaunchClock.record` writes it, all training unless said."""
    from dali_imagenet.run.launches import LaunchClock

    clock = LaunchClock(started=1000.0)
    clock.enter("training", 1000.0 + seconds - (seconds if training is None else training))
    return clock.record(exit_code=0, reason=None, machines=1, price=(price, "test"), on_demand_per_hour=0.8,
                        now=1000.0 + seconds)


def test_the_cost_of_a_run_sums_its_launches_each_at_its_own_price():
    """Three launches (two reclaimed on spot): hours, dollars and the time outside training summed
    over all of them, each launch at the price it ran at, on demand beside it."""
    from dali_imagenet.run.cost import cost, describe_cost

    launches = [launch(1800, price=0.3, training=600), launch(3600, price=0.4, training=2400), launch(1800, price=0.5)]
    run = cost(launches, gpus=1, lifecycle="spot")
    assert run["launches"] == 3 and run["wall_hours"] == pytest.approx(2.0)
    assert run["overhead_hours"] == pytest.approx((1200 + 1200) / 3600)
    assert run["phases_s"]["start"] == pytest.approx(2400) and run["phases_s"]["training"] == pytest.approx(4800)
    assert run["dollars"] == pytest.approx(0.5 * 0.3 + 1.0 * 0.4 + 0.5 * 0.5)
    assert run["on_demand_dollars"] == pytest.approx(2.0 * 0.8)
    assert describe_cost(run) == ("2.00 h (2.00 GPU-h), $0.80 on spot ($1.60 on demand); 3 launches, "
                                  "40.0 min outside training")


def test_a_launch_is_billed_from_the_instances_launch_or_from_an_earlier_launch_on_the_same_machine():
    """EC2 bills from the instance's launch: provisioning up to setup's start, setup, then on to the
    process; a second launch on a machine the run used already counts only from that launch's end."""
    from dali_imagenet.run.launches import LaunchClock

    clock = LaunchClock(started=1000.0)
    clock.on_machine({"pending_time": 700.0, "instance_id": "i-1"}, {"started": 800.0, "ended": 950.0})
    assert clock.before_start() == {"provisioning": 100.0, "setup": 150.0, "start": 50.0}
    clock.earlier = [{"instance": {"instance_id": "i-2"}, "ended_at": "1970-01-01T00:13:00Z"}]  # another machine
    assert clock.before_start()["provisioning"] == 100.0
    clock.earlier.append({"instance": {"instance_id": "i-1"}, "ended_at": "1970-01-01T00:13:00Z"})  # this one, to 780 s
    assert clock.before_start() == {"provisioning": 20.0, "setup": 150.0, "start": 50.0}
    clock.enter("training", 1100.0)
    record = clock.record(exit_code=0, reason=None, machines=1, price=(0.36, "test"), on_demand_per_hour=0.8,
                          now=1160.0)
    assert record["phases_s"]["start"] == 150.0 and record["phases_s"]["training"] == 60.0
    assert record["seconds"] == 380.0 and record["overhead_s"] == 320.0 and record["launch"] == 3
    assert record["started_at"] == "1970-01-01T00:13:00.000Z" and record["dollars"] == pytest.approx(380 / 3600 * 0.36)
    off_ec2 = LaunchClock(started=1000.0)
    off_ec2.on_machine({}, None)
    assert off_ec2.before_start() == {}


def test_spot_price_is_the_time_weighted_price_ec2_charged_else_the_configs_else_on_demand():
    from dali_imagenet.run.launches import average_price, machine_price

    # 0.30 from before the launch until t=400, then 0.60: a launch over [100, 700) paid 0.45 an hour on average
    assert average_price([(0, 0.30), (400, 0.60), (900, 0.90)], 100, 700) == pytest.approx(0.45)
    assert average_price([(0, 0.30)], 100, 700) == pytest.approx(0.30)
    assert average_price([(800, 0.30)], 100, 700) is None  # no price in effect during the launch
    spot = {"lifecycle": "spot", "instance_type": "g6.xlarge", "zone": "us-east-1a", "region": "us-east-1"}
    prices = dict(price_per_hour=0.8048, spot_price_per_hour=0.35)
    assert machine_price(spot, (100, 700), history=lambda *a: 0.41, **prices) == (
        0.41, "EC2 spot price history (g6.xlarge, us-east-1a)")

    def refused(*args):
        raise PermissionError("UnauthorizedOperation: not allowed to ec2:DescribeSpotPriceHistory")

    price, source = machine_price(spot, (100, 700), history=refused, **prices)
    assert price == 0.35 and source.startswith("spot_price_per_hour (config; ") and "UnauthorizedOperation" in source
    price, source = machine_price(spot, (100, 700), history=refused, price_per_hour=0.8048, spot_price_per_hour=0)
    assert price == 0.8048 and source.startswith("price_per_hour (on demand: no spot price known")
    assert machine_price({"lifecycle": "on-demand"}, (100, 700), history=refused, **prices) == (
        0.8048, "price_per_hour (on demand)")


def test_a_plain_state_dict_of_a_narrow_resnet_loads_at_its_width(trained_run):
    """final_weights.pt (a plain state dict: no config) of the test runs' width-16 ResNet-10 loads
    at that width, read off its first stage, and gives last.pt's raw logits."""
    from dali_imagenet.inference.predictor import load_model

    plain = load_model(trained_run / "final_weights.pt", arch="resnet10")
    last = load_model(trained_run / "last.pt", which="raw")
    assert plain.config.width == last.config.width == 16 and plain.config.network == "resnet10 (width 16)"
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(plain.model(x), last.model(x))


def test_launch_stamps_are_read_back_whatever_their_fraction_digits():
    """A launch's `ended_at` is read back by the next launch on the same machine (Python 3.10 there:
    its `fromisoformat` takes only 3 or 6 fraction digits and no "Z"; ours parses any)."""
    import datetime

    from dali_imagenet.run.launches import _iso
    from dali_imagenet.run.spot import utc_seconds

    noon = datetime.datetime(2026, 12, 7, 12, tzinfo=datetime.timezone.utc).timestamp()
    assert utc_seconds("2026-12-07T12:00:00Z") == noon
    assert utc_seconds("2026-12-07T12:00:00.1Z") == pytest.approx(noon + 0.1)
    assert utc_seconds("2026-12-07T12:00:00.123456+00:00") == pytest.approx(noon + 0.123456)
    stamp = _iso(noon + 1.2345)
    assert stamp == "2026-12-07T12:00:01.234Z"  # milliseconds: three digits, as 3.10 reads them too
    assert datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() == pytest.approx(noon + 1.234)
