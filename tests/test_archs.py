"""Beyond our ResNets (issue 35): any timm model as `arch: timm:NAME`, trained, checkpointed,
resumed, evaluated and predicted by the same scripts with its own input size and mean/std; and
runs that start from trained weights (`train.py --init`), with a new classifier when the classes
differ. timm's `test_resnet` (370 k weights, 0.5 mean/std, 160 px by default) keeps it to seconds."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import records, run_in_process, script, train

from dali_imagenet import make_loader
from dali_imagenet.config import load_config
from dali_imagenet.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from dali_imagenet.run.checkpoint import CheckpointError, load, weights
from dali_imagenet.run.initial import initialise
from dali_imagenet.training import archs

TIMM = ("arch=timm:test_resnet", "width=64", "image_size=32", "val_image_size=32", "drop_path=0")


def test_a_timm_arch_brings_its_input_defaults_unless_the_config_sets_them():
    own = load_config(None, ["arch=timm:test_resnet"])
    assert (own.image_size, own.val_image_size, own.val_crop_fraction) == (160, 160, 0.95)
    assert own.normalization() == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    told = load_config(None, ["arch=timm:test_resnet", "image_size=32", "image_mean=0.4,0.4,0.4"])
    assert (told.image_size, told.val_image_size) == (32, 160)
    assert told.normalization() == ((0.4, 0.4, 0.4), (0.5, 0.5, 0.5))
    ours = load_config(None, [])
    assert (ours.image_size, ours.val_crop_fraction) == (224, 0.875)
    assert ours.normalization() == (archs.IMAGENET_MEAN_01, archs.IMAGENET_STD_01)


def test_the_loaders_normalise_with_the_models_mean_and_std(sample_shards):
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for backend in ("dali", "torchvision"):
        imagenet, _ = next(iter(make_loader(sample_shards, "validation", 8, device="cpu", image_size=32,
                                            backend=backend)))
        theirs, _ = next(iter(make_loader(sample_shards, "validation", 8, device="cpu", image_size=32, backend=backend,
                                          normalization=half)))
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        assert torch.allclose(imagenet * std + mean, theirs * 127.5 + 127.5, atol=0.02), backend  # the same pixels


@pytest.mark.slow
def test_a_timm_model_trains_checkpoints_resumes_exactly_evaluates_and_predicts(sample_shards, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(sample_shards, straight, *TIMM, "deterministic=true", "ema_decay=0.9")
    train(sample_shards, stopped, *TIMM, "deterministic=true", "ema_decay=0.9", "max_steps=4")
    train(sample_shards, stopped, *TIMM, "deterministic=true", "ema_decay=0.9", extra=["--resume", "auto"])
    a, b = load(straight / "final_weights.pt"), load(stopped / "final_weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "stopped + resumed != straight"
    config = load(straight / "last.pt")["config"]
    assert config["arch"] == "timm:test_resnet" and config["image_mean"] == "0.5,0.5,0.5"
    last_val = [r for r in records(straight) if "val_top1" in r][-1]
    evaluated = run_in_process(script("evaluate"), ["evaluate.py", "--checkpoint", straight / "last.pt", "--data",
                                                    sample_shards, "--dali", "--device", "cpu", "--weights", "raw",
                                                    "--json"])
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["top1"] == pytest.approx(last_val["val_top1"])
    predicted = run_in_process(script("predict"), ["predict.py", "--checkpoint", straight / "best.pt", "--data",
                                                   sample_shards, "--split", "validation", "--json", "--device", "cpu"])
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.strip().splitlines()) == 40
    page = (straight / "report.html").read_text()
    assert "Grad-CAM of " in page  # the last feature stage of a timm model, found through its feature_info


def test_an_unknown_timm_name_is_one_line_with_close_names(sample_shards, tmp_path):
    result = train(sample_shards, tmp_path / "run", "arch=timm:efficientnet_b9", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1
    assert "has no model 'efficientnet_b9'" in lines[0] and "timm:efficientnet_b8" in lines[0]
    assert not (tmp_path / "run").exists()


def test_init_from_a_run_with_the_same_classes_starts_at_its_accuracy(trained_run, sample_shards, tmp_path):
    out = tmp_path / "again"
    result = train(sample_shards, out, "epochs=1", "mixup_alpha=0", "cutmix_alpha=0", "ema_decay=0.8",
                   "val_image_size=40", extra=["--init", str(trained_run)])
    assert f"initialised from {trained_run / 'best.pt'}: every weight loaded (the same classes)" in result.stdout
    history = records(out)
    assert history[0]["init"]["source"] == str(trained_run / "best.pt") and not history[0]["init"]["new_head"]
    before = next(r for r in history if r.get("event") == "init_validation")
    source = load(trained_run / "best.pt")["state"]["history"][-1]
    assert before["step"] == 0 and before["val_top1"] == max(source["top1"], source.get("ema_top1", -1.0))
    assert f"started from {trained_run / 'best.pt'}: every weight" in (out / "report.html").read_text()


def test_init_from_other_classes_makes_a_new_classifier_and_loads_the_rest(trained_run):
    model = archs.build("resnet10", 10, width=16)
    started = initialise(str(trained_run), model, "resnet10", [f"class {i}" for i in range(10)], width=16)
    assert started.new_head and started.source_classes == 8
    # 78 tensors: at width 16 the first block has a downsample too (from the stem's 64 channels to 16)
    assert started.line(10).endswith("a new classifier for 10 classes (8 there), the rest loaded (78 tensors)")
    source = weights(load(trained_run / "best.pt"), "auto")
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert value.shape[0] == 10
        else:
            assert torch.equal(value, source[key]), key


def test_init_from_another_architecture_is_one_line(trained_run, sample_shards, tmp_path):
    result = train(sample_shards, tmp_path / "run", "arch=resnet18", extra=["--init", str(trained_run)], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1
    assert lines[0] == (f"error: {trained_run / 'best.pt'}: holds resnet10 (width 16)'s weights; this run trains "
                        f"resnet18 (width 16) "
                        f"(--init takes weights of the same architecture)")
    with pytest.raises(CheckpointError, match=r"final_weights.pt: its weights do not fit resnet18"):
        initialise(str(trained_run / "final_weights.pt"), archs.build("resnet18", 8), "resnet18", ["x"] * 8)
    with pytest.raises(CheckpointError, match=r"holds resnet10 \(width 16\)'s weights; this run trains resnet10 \("):
        initialise(str(trained_run), archs.build("resnet10", 8), "resnet10", ["x"] * 8)  # the same arch, wider


def test_grad_cam_finds_a_timm_models_last_stage_and_says_so_for_a_transformer():
    from dali_imagenet.inference.gradcam import grad_cam

    cnn = archs.build("timm:test_resnet", 4).eval()
    heat = grad_cam(cnn, torch.randn(1, 3, 64, 64), 2)
    assert heat.shape == (64, 64) and 0 <= float(heat.min()) and float(heat.max()) <= 1
    vit = archs.build("timm:test_vit", 4).eval()
    size = vit.pretrained_cfg["input_size"][-1]
    with pytest.raises(archs.ArchError, match="Grad-CAM needs a stage with a feature map"):
        grad_cam(vit, torch.randn(1, 3, size, size), 1)


def test_a_plain_timm_state_dict_is_read_with_its_archs_own_input(tmp_path):
    """A timm model's plain state dict (no run config) is preprocessed with that model's mean/std,
    not ImageNet's (what our ResNets and torchvision's use)."""
    from dali_imagenet.inference.predictor import load_model

    torch.save(archs.build("timm:test_resnet", 4).state_dict(), tmp_path / "plain.pth")
    loaded = load_model(tmp_path / "plain.pth", arch="timm:test_resnet")
    assert loaded.config.network == "timm:test_resnet" and loaded.num_classes == 4
    assert loaded.config.normalization() == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
