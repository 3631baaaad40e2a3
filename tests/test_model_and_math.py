"""Model builder (torchvision compatibility, drop path), LR schedule, config and checkpoint files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from dali_imagenet import checkpoint as ckpt
from dali_imagenet.config import ConfigError, TrainConfig, load_config
from dali_imagenet.model import build_model, drop_path
from dali_imagenet.schedule import lr_at, parameter_groups, scaled_lr

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
    assert any(p is model.fc.bias for p in no_decay["params"]) and any(p is model.bn1.weight for p in no_decay["params"])


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


def fake_checkpoint(step: int, **extra) -> dict:
    return {"model": {}, "optimizer": {}, "scaler": {}, "config": {}, "state": {"step": step}, **extra}


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_atomic(fake_checkpoint(1, w=torch.ones(3)), tmp_path / ckpt.LAST)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic(fake_checkpoint(2, w=torch.zeros(3)), tmp_path / ckpt.LAST)
    monkeypatch.undo()
    path, state = ckpt.newest_valid(tmp_path)
    assert path.name == ckpt.LAST and state["state"]["step"] == 1
    ckpt.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST]


def test_newest_valid_skips_a_corrupt_file(tmp_path):
    ckpt.save_atomic(fake_checkpoint(5), tmp_path / ckpt.LAST)
    ckpt.mark_best(tmp_path)
    ckpt.save_atomic(fake_checkpoint(9), tmp_path / ckpt.LAST)
    assert ckpt.newest_valid(tmp_path)[1]["state"]["step"] == 9
    (tmp_path / ckpt.LAST).write_bytes(b"garbage")
    assert ckpt.newest_valid(tmp_path)[1]["state"]["step"] == 5


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(3)
    ckpt.save_atomic({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = torch.rand(3)
    ckpt.restore_rng_state(ckpt.load(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(3), expected)
