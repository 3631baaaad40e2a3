"""publish.py: a run as a folder timm loads (identical logits) under timm's own names, a BlurPool
run's folder that timm refuses by name and loads in one line once dali_imagenet is imported (its
registered network), the upload to a stand-in Hub that speaks the commit API (preupload, LFS
batch, commit) and keeps every revision, and the one-line token errors. Reading back:
predict.py/evaluate.py/train.py --init take FOLDER and hf://, with a timm model's own preprocessing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXACT, child_env, run_in_process, script, train, train_command
from test_show import val_images

from standins.hub_commits import StandInModelHub


def publish(*args, env=None) -> subprocess.CompletedProcess:
    return run_in_process(script("publish"), ["publish.py", *map(str, args)], env)


def logits(model: torch.nn.Module, size: int) -> torch.Tensor:
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.to(memory_format=torch.contiguous_format).eval()(images)


def predictions_of(checkpoint, images: Path, env=None) -> list[dict]:
    result = run_in_process(script("predict"), ["predict.py", str(images), "--checkpoint", str(checkpoint),
                                                "--json", "--device", "cpu"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_stock_folder_loads_in_timm_with_identical_logits(trained_run, sample_shards, tmp_path):
    import timm

    from dali_imagenet.inference.predictor import load_model

    out = tmp_path / "published"
    result = publish(trained_run, out)
    assert result.returncode == 0, result.stderr
    assert "timm loads it as it is" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "curves.png", "model.safetensors",
                                                     "report.html"]
    config = json.loads((out / "config.json").read_text())
    source = load_model(trained_run / "best.pt", which="auto")
    assert config["architecture"] == "resnet18" and config["model_args"]["layers"] == [1, 1, 1, 1]  # our ResNet-10
    assert config["model_args"]["channels"] == [16, 32, 64, 128]  # at the test runs' width
    assert config["label_names"] == source.class_names and config["num_classes"] == 8  # the sample's: unique
    assert config["label_descriptions"] == dict(zip(source.class_names, source.class_names))
    assert config["pretrained_cfg"]["input_size"] == [3, 40, 40] and config["pretrained_cfg"]["crop_pct"] == 0.875
    assert "tag" not in config["pretrained_cfg"]  # not timm's own weights
    assert config["dali_imagenet"]["weights"] == source.weights

    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == source.class_names
    assert torch.equal(logits(model, 40), logits(source.model, 40))

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "## Results" in card
    assert f'"local-dir:{out.name}"' in card and "![validation curves](curves.png)" in card
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    images = tmp_path / "val"
    val_images(sample_shards, images)
    assert predictions_of(out, images) == predictions_of(trained_run / "best.pt", images)
    scores = [json.loads(run_in_process(script("evaluate"), ["evaluate.py", "--checkpoint", str(source), "--data",
                                                             str(sample_shards), "--device", "cpu", "--json"]).stdout)
              for source in (out, trained_run / "best.pt")]
    assert scores[0]["top1"] == scores[1]["top1"] and scores[0]["loss"] == pytest.approx(scores[1]["loss"])

    again = publish(trained_run, out)  # never replaced without being asked
    assert again.returncode == 1 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_blurpool_loads_in_timm_once_dali_imagenet_is_imported(straight_run, tmp_path):
    """timm has no FFCV-placed BlurPool: the folder names `resnet10_ffcvblur`, which timm refuses
    (never silently its own resnetblur) unless `import dali_imagenet` registered it; then one line
    gives the run's network and logits."""
    import timm

    import dali_imagenet  # noqa: F401 - what the card says to import: it registers the network
    from dali_imagenet.inference.predictor import load_model

    out = tmp_path / "blur"
    result = publish(straight_run, out)
    assert result.returncode == 0, result.stderr
    assert "once dali_imagenet is imported" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet10_ffcvblur" and config["model_args"]["width"] == 16
    without = subprocess.run([sys.executable, "-c", f"import timm; timm.create_model('local-dir:{out}', "
                              "pretrained=True)"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                             env={**child_env(), "PYTHONPATH": ""})
    assert without.returncode != 0 and "Unknown model (resnet10_ffcvblur)" in without.stderr
    card = (out / "README.md").read_text()
    assert "import dali_imagenet  # registers resnet10_ffcvblur" in card and "pip install git+" in card
    source = load_model(straight_run / "best.pt", which="auto")
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(logits(model, 40), logits(source.model, 40))
    assert model.pretrained_cfg["crop_pct"] == 0.875 and tuple(model.pretrained_cfg["input_size"]) == (3, 40, 40)
    loaded = load_model(out)
    assert loaded.config.blurpool and loaded.arch == source.arch and loaded.weights == source.weights
    assert torch.equal(logits(loaded.model, 40), logits(source.model, 40))


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_a_resnet_publishes_under_timms_own_name(arch, tmp_path):
    """A ResNet-34 is timm's `resnet34` (not resnet18 with other layers): the name the Hub, search
    and config.json readers see; timm builds it from that name alone, with the same logits."""
    import timm

    from dali_imagenet.config import TrainConfig
    from dali_imagenet.run import published
    from dali_imagenet.training.model import build_model

    ours = build_model(arch, 5).eval()
    with torch.no_grad():
        for module in ours.modules():  # not the zero-initialised last BN: every block counts in the logits
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    names = ["tench, Tinca tinca", "crane", "crane", "goldfish", "great white shark"]
    written = published.write(tmp_path, ours.state_dict(), arch=arch, num_classes=5, config=TrainConfig(arch=arch),
                              class_names=names, weights="raw", summary={})
    config = json.loads((tmp_path / "config.json").read_text())
    assert written.stock and written.architecture == arch and config["architecture"] == arch
    assert config["label_names"] == ["tench", "crane (1)", "crane (2)", "goldfish", "great white shark"]
    assert config["label_descriptions"]["tench"] == "tench, Tinca tinca"
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert type(model).__name__ == "ResNet" and len(model.layer3) == 6
    assert torch.equal(logits(model, 64), logits(ours, 64))
    assert published.load(tmp_path).class_names == names


def test_imagenet_classes_are_named_by_synset():
    from dali_imagenet.data.classes import imagenet1k
    from dali_imagenet.run.published import class_names_of, label_config

    names = [names for _, names in imagenet1k()]
    labels = label_config(names)
    assert labels["label_names"][134] == "n02012849" and labels["label_names"][517] == "n03126707"  # both "crane"
    assert len(set(labels["label_names"])) == 1000 and class_names_of(labels) == names


@pytest.fixture
def model_hub(tmp_path, monkeypatch):
    """The stand-in Hub, and the environment that points huggingface_hub at it. In this process
    too: the library reads HF_ENDPOINT when it calls; what huggingface_hub read at its import
    (Xet on, its cache) is set here as the same variables would have set it."""
    from huggingface_hub import constants

    hub = StandInModelHub({"hf_alice_write": "alice", "hf_bob_write": "bob"})
    env = child_env(HF_ENDPOINT=hub.url, HF_TOKEN="hf_alice_write", HF_HUB_DISABLE_XET="1",
                    HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    yield hub, env
    hub.close()


def run_publish(env, *args) -> subprocess.CompletedProcess:
    return run_in_process(script("publish"), ["publish.py", *map(str, args)], env)


@pytest.mark.slow
def test_hub_upload_keeps_every_revision(trained_run, straight_run, sample_shards, model_hub,
                                          tmp_path):
    hub, env = model_hub
    first = run_publish(env, trained_run, tmp_path / "one", "--hub", "alice/tiny")
    assert first.returncode == 0, first.stderr[-2000:]
    received = hub.files("alice/tiny")
    assert received == {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}  # the folder, byte for byte
    posted = [path.split("?")[0] for method, path, status in hub.requests if method in ("POST", "PUT")]
    assert "/api/models/alice/tiny/preupload/main" in posted and "/alice/tiny.git/info/lfs/objects/batch" in posted
    assert any(p.startswith("/lfs-upload/") for p in posted) and "/api/models/alice/tiny/commit/main" in posted
    first_commit = hub.commits("alice/tiny")[-1].oid
    assert f"hf://alice/tiny@{first_commit}" in first.stdout

    # Published again (another run): a new commit; the first stays loadable by its revision.
    second = run_publish(env, straight_run, tmp_path / "two", "--hub", "alice/tiny")
    assert second.returncode == 0, second.stderr[-2000:]
    assert [c.oid for c in hub.commits("alice/tiny")][-2] == first_commit
    images = tmp_path / "val"
    val_images(sample_shards, images)
    ours = predictions_of(trained_run / "best.pt", images)
    assert predictions_of(f"hf://alice/tiny@{first_commit}", images, env) == ours
    assert predictions_of("hf://alice/tiny", images, env) == predictions_of(straight_run / "best.pt", images)
    page = run_in_process(script("report"), ["report.py", "--checkpoint", f"hf://alice/tiny@{first_commit}", "-o",
                                             str(tmp_path / "page.html")], env)
    assert page.returncode == 0
    assert (tmp_path / "page.html").read_bytes() == hub.files("alice/tiny", revision=first_commit)["report.html"]
    started = train(sample_shards, tmp_path / "init", *EXACT, "max_steps=1", extra=["--init", "hf://alice/tiny"],
                    env=env)
    assert "initialised from hf://alice/tiny: every weight loaded" in started.stdout


def test_token_errors_are_one_line(trained_run, model_hub, tmp_path):
    hub, env = model_hub
    for token, said in (("hf_unknown", "the Hub refused the token (401: "), ("", "no Hugging Face token")):
        result = run_publish({**env, "HF_TOKEN": token}, trained_run, tmp_path / "out", "--hub", "alice/tiny")
        assert result.returncode == 1 and said in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()  # checked before anything was built
    other = run_publish({**env, "HF_TOKEN": "hf_bob_write"}, trained_run, "--hub", "alice/tiny")
    assert other.returncode == 1 and "alice/tiny: the token may not do this (403: " in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_init_from_a_published_folder_starts_at_its_accuracy(trained_run, sample_shards, tmp_path):
    from conftest import records, train

    assert publish(trained_run, tmp_path / "published").returncode == 0
    out = tmp_path / "again"
    result = train(sample_shards, out, "epochs=1", "max_steps=1", "val_image_size=40",
                   extra=["--init", str(tmp_path / "published")])
    assert "every weight loaded (the same classes)" in result.stdout
    before = next(r for r in records(out) if r.get("event") == "init_validation")
    published = json.loads((tmp_path / "published" / "config.json").read_text())["dali_imagenet"]["run"]["val"]
    assert before["val_top1"] == max(published["top1"], published.get("ema_top1", -1.0))
    wrong = train(sample_shards, tmp_path / "other", "arch=resnet18", extra=["--init", str(tmp_path / "published")],
                  check=False)
    assert wrong.returncode != 0 and "holds resnet10 (width 16)'s weights; this run trains resnet18" in wrong.stderr


def test_init_timm_fetches_timms_pretrained_weights(sample_shards, model_hub, tmp_path):
    """`--init timm` through timm's own download path, from a stand-in Hub holding timm's repo for
    the arch's default tag (the real one needs the network)."""
    import timm
    from timm.models import get_pretrained_cfg, save_for_hf

    hub, env = model_hub
    repo = get_pretrained_cfg("test_resnet").hf_hub_id  # timm/test_resnet.r160_in1k
    save_for_hf(timm.create_model("test_resnet", num_classes=1000), str(tmp_path / "weights"), safe_serialization=True)
    hub.seed(repo, {p.name: p.read_bytes() for p in (tmp_path / "weights").iterdir()})
    started = subprocess.run(train_command(sample_shards, tmp_path / "run", "arch=timm:test_resnet", "width=64",
                                           "image_size=32", "val_image_size=32", "drop_path=0", "max_steps=1",
                                           extra=["--init", "timm"]),
                             capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    assert ("initialised from timm:test_resnet pretrained: a new classifier for 8 classes (1000 there)"
            in started.stdout)
    assert any(path.endswith(f"/{repo}/resolve/main/model.safetensors") or "model.safetensors" in path
               for method, path, status in hub.requests if method == "GET" and status == 200)


def test_a_timm_models_own_preprocessing_is_used_whole(sample_shards, model_hub, tmp_path):
    """Anyone's timm model with a bicubic config (crop 0.95, each of timm's crop modes), from the
    Hub: predict.py's and app.py's transform is timm's own eval transform (PIL's bicubic against
    torchvision's antialiased one: a rounding apart), not a bilinear resize of it."""
    import timm
    from conftest import environment
    from PIL import Image
    from timm.models import save_for_hf

    from dali_imagenet.data.preprocess import val_transform
    from dali_imagenet.inference.predictor import Predictor, image_tensor, load_model

    hub, env = model_hub
    image = Image.open(next(iter(val_images(sample_shards, tmp_path / "val")))).convert("RGB")
    for mode in ("center", "squash", "border"):
        folder = tmp_path / mode
        save_for_hf(timm.create_model("test_resnet", num_classes=1000), str(folder), safe_serialization=True,
                    data_config={"interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": mode})
        hub.seed(f"someone/bicubic-{mode}", {p.name: p.read_bytes() for p in folder.iterdir()})
        with environment(env):
            loaded = load_model(f"hf://someone/bicubic-{mode}")
        config = loaded.config
        assert (config.val_interpolation, config.val_crop_mode, config.val_crop_fraction) == ("bicubic", mode, 0.95)
        theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=loaded.model))(image)
        ours = Predictor(loaded).transform(image_tensor(image))
        bilinear = val_transform(160, 0.95, normalization=config.normalization(), crop_mode=mode)(image_tensor(image))
        assert ours.shape == theirs.shape == (3, 160, 160)
        off, off_bilinear = (ours - theirs).abs().mean().item(), (bilinear - theirs).abs().mean().item()
        assert off < 0.01 and off < off_bilinear / 2, (mode, off, off_bilinear)


def test_a_run_is_published_from_its_s3_prefix(trained_run, s3_bucket, tmp_path):
    from conftest import upload_folder

    upload_folder(trained_run, s3_bucket, "runs/tiny")
    result = publish(f"s3://{s3_bucket}/runs/tiny", tmp_path / "from-s3")
    assert result.returncode == 0, result.stderr
    assert "published tiny (" in result.stdout
    assert publish(trained_run, tmp_path / "local").returncode == 0
    for name in ("model.safetensors", "curves.png"):
        assert (tmp_path / "from-s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert (tmp_path / "from-s3" / "report.html").read_bytes() == (tmp_path / "local" / "report.html").read_bytes()
    missing = publish(f"s3://{s3_bucket}/runs/none", tmp_path / "none")
    assert missing.returncode == 1 and "not a run (no metrics.jsonl under it)" in missing.stderr
