"""The bad-input sweep, kept: each row is a command a user who makes mistakes (or someone feeding
hostile input) would run, the exit code it must end with, the words its one line must hold, and
the promise that nothing outside the named output was created, changed or deleted. The commands
run for real (in this process where the process boundary is not the point: seconds of imports
saved per row) against copies of the shared fixtures in the row's own folder.

Placeholders in a row: {run} a finished run, {shards} its shard set, {images} an ImageFolder tree,
{published} a published folder, {tmp} the row's folder. A row's `setup` damages its copies first."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, TRAIN_BASE, built_once, run_in_process, script

sys.path.insert(0, str(REPO))


def click_main(module: str):
    def main():
        import importlib

        return importlib.import_module(module).main(prog_name=module.rsplit(".", 1)[-1])
    return main


COMMANDS = {"train": lambda: script("train"), "publish": lambda: script("publish"),
            "predict": lambda: script("predict"), "evaluate": lambda: script("evaluate"), "app": lambda: script("app"),
            "shard-imagenet": lambda: click_main("shard_tools.cli"),
            "verify-shards": lambda: click_main("shard_tools.verify"),
            "stage-shards": lambda: click_main("shard_tools.stage")}


@dataclass
class Case:
    id: str
    command: str  # a key of COMMANDS
    args: list[str]
    exit: int
    words: list[str]  # all on one line of the output
    setup: Callable[[Path], None] | None = None
    changes: list[str] = field(default_factory=list)  # paths (placeholders allowed) that may change
    slow: bool = False
    env: dict = field(default_factory=dict)


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (its pixel data is cut short: only a decode sees it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write(path: str, text: str = "x"):
    def setup(tmp: Path) -> None:
        target = tmp / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return setup


def edit_json(path: str, change: Callable):
    def setup(tmp: Path) -> None:
        target = tmp / path
        target.write_text(json.dumps(change(json.loads(target.read_text()))))
    return setup


def truncate(path: str, keep: float):
    def setup(tmp: Path) -> None:
        target = tmp / path
        target.write_bytes(target.read_bytes()[: int(target.stat().st_size * keep)])
    return setup


def first_tar(tmp: Path) -> Path:
    manifest = json.loads((tmp / "shards" / "manifest.json").read_text())
    return tmp / "shards" / manifest["splits"]["train"]["shards"][0]["name"]


def truncate_first_tar(tmp: Path) -> None:
    tar = first_tar(tmp)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])


def damage_json_of_first_tar(tmp: Path) -> None:
    """One byte of a sample's .json changed (same size): every JPEG still decodes."""
    from dali_imagenet.data.shardformat import parse_index

    tar = first_tar(tmp)
    sample = parse_index(tar.with_suffix(".idx").read_text())[0]
    _, offset, _, _ = next(c for c in sample if c[0] == "json")
    data = bytearray(tar.read_bytes())
    data[offset + 1] ^= 0x20
    tar.write_bytes(bytes(data))


def escaping_manifest(tmp: Path) -> None:
    edit_json("shards/manifest.json", lambda m: {**m, "splits": {**m["splits"], "train": {
        **m["splits"]["train"], "shards": [{**m["splits"]["train"]["shards"][0], "name": "../../outside.tar"}]}}})(tmp)


def pickle_with_code(tmp: Path) -> None:
    import torch

    torch.save({"model": {}, "run": os.system}, tmp / "evil.pt")  # unpickling it would import os.system


def image_folder(root: Path) -> None:
    """A small ImageFolder tree: 2 classes x 3 train and 2 val JPEGs."""
    from PIL import Image

    for split, count in (("train", 3), ("val", 2)):
        for c, synset in enumerate(("n01440764", "n02102040")):
            folder = root / split / synset
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 32), (60 * c, 20 * i, 90)).save(folder / f"{synset}_{i}.JPEG", quality=90)


def huge_image(tmp: Path) -> None:
    png_header(tmp / "huge.png", 12000, 12000)  # 144 megapixels: between PIL's warning and error limits


def huge_image_in_images(tmp: Path) -> None:
    folder = next(p for p in sorted((tmp / "images" / "train").iterdir()) if p.is_dir())
    png_header(folder / "huge.png", 12000, 12000)
    (folder / "notes.txt").write_text("not an image")


T = TRAIN_BASE
TRAIN = ["--dali", "--data", "{shards}", "--out", "{tmp}/newrun", "--device", "cpu", "--no-wandb",
         *[a for item in T for a in ("--set", item)]]


def train_case(id, sets, exit, words, **kw) -> Case:
    return Case(id, "train", [*TRAIN, *[a for item in sets for a in ("--set", item)]], exit, words, **kw)


CASES = [
    # 1. publish never writes into the run it reads, nor over someone's folder
    Case("publish-into-the-run", "publish", ["{run}", "{run}", "--overwrite"], 1, ["OUT_DIR", "is the run"]),
    Case("publish-over-the-runs-parent", "publish", ["{run}", "{tmp}", "--overwrite"], 1, ["contains the run"]),
    Case("publish-inside-the-run", "publish", ["{run}", "{run}/published"], 1, ["lies inside the run"]),
    Case("publish-to-a-file", "publish", ["{run}", "{tmp}/file.txt"], 1, ["file.txt", "exists and is not a folder"],
         setup=write("file.txt")),
    Case("publish-over-a-foreign-folder", "publish", ["{run}", "{tmp}/mine", "--overwrite"], 1,
         ["mine", "notes.txt", "not a published folder"], setup=write("mine/notes.txt")),
    Case("publish-over-a-foreign-config", "publish", ["{run}", "{tmp}/mine", "--overwrite"], 1,
         ["config.json", "not one publish.py wrote"], setup=write("mine/config.json", "{}")),
    Case("publish-space-without-slash", "publish", ["{run}", "--space", "noslash"], 1, ["noslash", "USER/NAME"]),
    Case("publish-hub-two-slashes", "publish", ["{run}", "--hub", "a/b/c"], 1, ["a/b/c", "USER/NAME"]),
    Case("publish-private-without-hub", "publish", ["{run}", "{tmp}/out", "--private"], 1, ["--private", "--hub"]),
    Case("publish-license-nonsense", "publish", ["{run}", "{tmp}/out", "--license", "nonsense"], 1,
         ["nonsense", "licence"]),
    Case("publish-not-a-run", "publish", ["{images}", "{tmp}/out"], 1, ["not a run folder"]),
    Case("publish-again-without-overwrite", "publish", ["{run}", "{published}"], 1, ["--overwrite"]),
    Case("publish-own-folder-overwritten", "publish", ["{run}", "{published}", "--overwrite"], 0, ["published"],
         changes=["{published}"], slow=True),
    # 2. shard-imagenet and stage-shards never write into what they read or merge into a foreign folder
    Case("shard-into-its-source", "shard-imagenet", ["{images}", "{images}"], 1, ["OUTPUT", "is SOURCE"]),
    Case("shard-inside-its-source", "shard-imagenet", ["{images}", "{images}/train", "--overwrite"], 1,
         ["lies inside SOURCE"]),
    Case("shard-around-its-source", "shard-imagenet", ["{images}", "{tmp}", "--overwrite"], 1, ["contains SOURCE"]),
    Case("shard-into-a-foreign-folder", "shard-imagenet", ["{images}", "{tmp}/mine", "--overwrite"], 1,
         ["notes.txt", "not shard-imagenet's output"], setup=write("mine/notes.txt")),
    Case("shard-into-a-file", "shard-imagenet", ["{images}", "{tmp}/file.txt"], 1, ["exists and is not a folder"],
         setup=write("file.txt")),
    Case("shard-over-a-finished-set", "shard-imagenet", ["{images}", "{shards}"], 1, ["--resume", "--overwrite"]),
    Case("shard-max-pixels-zero", "shard-imagenet", ["{images}", "{tmp}/out", "--max-pixels", "0"], 2,
         ["--max-pixels"]),
    Case("shard-rejects-a-huge-image-by-name", "shard-imagenet",
         ["{images}", "{tmp}/out", "--workers", "1", "--quiet", "--shard-size", "64"], 0,
         ["huge.png", "12000x12000 = 144,000,000 pixels, over the limit of 89,478,485"], setup=huge_image_in_images,
         changes=["{tmp}/out"],
         slow=True),
    Case("stage-not-an-s3-url", "stage-shards", ["notaurl", "{tmp}/dest"], 1, ["notaurl", "not an S3 URL"]),
    Case("stage-into-a-foreign-folder", "stage-shards", ["s3://bucket/prefix", "{tmp}/mine"], 1,
         ["notes.txt", "not a staged copy of shards"], setup=write("mine/notes.txt")),
    Case("stage-into-a-file", "stage-shards", ["s3://bucket/prefix", "{tmp}/file.txt"], 1,
         ["exists and is not a folder"], setup=write("file.txt")),
    Case("stage-under-proc", "stage-shards", ["s3://bucket/prefix", "/proc/dali-imagenet-staged"], 1,
         ["/proc/dali-imagenet-staged", "cannot make the staging folder"]),
    Case("stage-unreachable-leaves-nothing", "stage-shards", ["s3://bucket/prefix", "{tmp}/new/dest", "--quiet"], 1,
         ["s3://bucket"], env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                               "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1",
                               "AWS_DEFAULT_REGION": "us-east-1"}),
    # 4. verify-shards on damaged tars
    Case("verify-truncated-tar", "verify-shards", ["{shards}", "--workers", "1", "--quiet"], 1,
         ["imagenet1k-train-000000.tar", "truncated", "of the manifest's"], setup=truncate_first_tar),
    Case("verify-same-size-damage-no-sample-bad", "verify-shards", ["{shards}", "--workers", "1", "--quiet"], 1,
         ["sha256", "cannot be repaired", "--resume"], setup=damage_json_of_first_tar),
    Case("verify-missing-tar", "verify-shards", ["{shards}", "--workers", "1", "--quiet", "--repair"], 1,
         ["tar is missing", "cannot be repaired"], setup=lambda tmp: first_tar(tmp).unlink()),
    Case("verify-manifest-escaping-the-set", "verify-shards", ["{shards}", "--repair", "--quiet"], 1,
         ["../../outside.tar", "not a .tar under the set's folder"], setup=escaping_manifest),
    # 3. and 5. train.py refuses before anything is built or written
    train_case("train-width-1000", ["arch=resnet50", "width=1000", "image_size=224", "batch_size=128"], 1,
               ["does not fit", "GiB needed", "host RAM"]),
    train_case("train-vit-at-64-px", ["arch=timm:vit_tiny_patch16_224", "width=64", "image_size=64",
                                      "val_image_size=64"], 1, ["timm:vit_tiny_patch16_224", "cannot take 64 px"]),
    Case("train-out-inside-data", "train", [*TRAIN[:3], "--out", "{shards}/run", *TRAIN[5:]], 1,
         ["--out", "lies inside --data"]),
    Case("train-out-around-data", "train", [*TRAIN[:3], "--out", "{tmp}", *TRAIN[5:]], 1,
         ["--out", "contains --data"]),
    Case("train-spot-on-off-ec2", "train", [*TRAIN, "--spot", "on"], 1, ["--spot on", "no instance metadata service"],
         env={"AWS_EC2_METADATA_DISABLED": "true"}),
    train_case("train-lr-reference-batch-0", ["lr_reference_batch=0"], 1, ["lr_reference_batch must be > 0"]),
    train_case("train-momentum-negative", ["momentum=-5"], 1, ["momentum must be in [0, 1)"]),
    train_case("train-max-steps-negative", ["max_steps=-1"], 1, ["max_steps must be >= 0"]),
    train_case("train-val-every-negative", ["val_every=-1"], 1, ["val_every"]),
    train_case("train-checkpoint-minutes-negative", ["checkpoint_minutes=-1"], 1, ["checkpoint_minutes"]),
    train_case("train-shuffle-buffer-negative", ["shuffle_buffer=-1"], 1, ["shuffle_buffer must be >= 1"]),
    Case("train-stage-dir-a-file", "train", [*TRAIN[:1], "--data", "s3://bucket/prefix", *TRAIN[3:],
                                             "--stage-dir", "{tmp}/file.txt"], 1, ["file.txt", "not a folder"],
         setup=write("file.txt")),
    Case("train-stage-dir-under-proc", "train", [*TRAIN[:1], "--data", "s3://bucket/prefix", *TRAIN[3:],
                                                 "--stage-dir", "/proc/dali-staged"], 1,
         ["/proc/dali-staged", "cannot make the staging folder"]),
    train_case("train-init-truncated-safetensors", [], 1, ["model.safetensors", "not readable safetensors"],
               setup=truncate("published/model.safetensors", 0.5)),
    # 5.-7. and 9. predict, evaluate, app
    Case("predict-top-0", "predict", ["{images}", "--checkpoint", "{run}/best.pt", "--top", "0"], 1, ["--top 0"]),
    Case("predict-top-negative", "predict", ["{images}", "--checkpoint", "{run}/best.pt", "--top", "-3"], 1,
         ["--top -3"]),
    Case("predict-batch-size-0", "predict", ["{images}", "--checkpoint", "{run}/best.pt", "--batch-size", "0"], 1,
         ["--batch-size 0"]),
    Case("predict-image-size-0", "predict", ["{images}", "--checkpoint", "{run}/best.pt", "--image-size", "0"], 1,
         ["--image-size 0"]),
    Case("predict-144-megapixels", "predict", ["{tmp}/huge.png", "--checkpoint", "{run}/best.pt", "--device", "cpu"],
         1, ["huge.png", "12000x12000 = 144,000,000 pixels, over the limit of 89,478,485"], setup=huge_image),
    Case("predict-config-json-a-list", "predict", ["{images}", "--checkpoint", "{published}"], 1,
         ["config.json", "a JSON list"], setup=write("published/config.json", "[1, 2]")),
    Case("predict-config-json-without-our-section", "predict", ["{images}", "--checkpoint", "{published}"], 0,
         [".JPEG:"], setup=edit_json("published/config.json", lambda c: {k: v for k, v in c.items()
                                                                            if k != "dali_imagenet"})),
    Case("predict-truncated-safetensors", "predict", ["{images}", "--checkpoint", "{published}"], 1,
         ["model.safetensors", "not readable safetensors"], setup=truncate("published/model.safetensors", 0.5)),
    Case("predict-num-classes-disagrees", "predict", ["{images}", "--checkpoint", "{published}"], 1,
         ["num_classes 5", "8 outputs"], setup=edit_json("published/config.json", lambda c: {**c, "num_classes": 5})),
    Case("predict-label-names-disagree", "predict", ["{images}", "--checkpoint", "{published}"], 1,
         ["3 label_names", "8 outputs"],
         setup=edit_json("published/config.json", lambda c: {**c, "label_names": ["a", "b", "c"]})),
    Case("predict-pickle-with-code", "predict", ["{images}", "--checkpoint", "{tmp}/evil.pt"], 1,
         ["evil.pt", "refused: it names posix.system", "loading could run", "weights_only=True)"],
         setup=pickle_with_code),
    Case("predict-folder-without-config", "predict", ["{images}", "--checkpoint", "{tmp}/mine"], 1,
         ["mine", "a folder, and not a published model (no config.json"], setup=write("mine/notes.txt")),
    Case("evaluate-batch-size-0", "evaluate", ["--checkpoint", "{run}/best.pt", "--data", "{shards}",
                                               "--batch-size", "0"], 1, ["--batch-size 0"]),
    Case("evaluate-image-size-0", "evaluate", ["--checkpoint", "{run}/best.pt", "--data", "{shards}",
                                               "--image-size", "0"], 1, ["--image-size 0"]),
    Case("evaluate-dali-image-size-0", "evaluate", ["--checkpoint", "{run}/best.pt", "--data", "{shards}", "--dali",
                                                    "--image-size", "0"], 1, ["--image-size 0"]),
    Case("evaluate-crop-fraction-5", "evaluate", ["--checkpoint", "{run}/best.pt", "--data", "{shards}", "--dali",
                                                  "--crop-fraction", "5"], 1, ["--crop-fraction 5"]),
    Case("app-port-99999", "app", ["--checkpoint", "{run}/best.pt", "--port", "99999"], 1, ["--port 99999"]),
]


@pytest.fixture(scope="session")
def published_run(trained_run, tmp_path_factory, worker_id) -> Path:
    def build(folder: Path) -> None:
        result = run_in_process(script("publish"), ["publish.py", str(trained_run), str(folder / "published")])
        assert result.returncode == 0, result.stderr

    return built_once(tmp_path_factory, worker_id, "published", build) / "published"


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root`: its content's hash (files) or "dir"."""
    found = {}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = (
            "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest())
    return found


def fill(arg: str, places: dict[str, Path]) -> str:
    for name, path in places.items():
        arg = arg.replace("{" + name + "}", str(path))
    return arg


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input(case: Case, request, tmp_path: Path):
    places = {"tmp": tmp_path}
    needs = " ".join(case.args + case.changes)
    if "{images}" in needs:
        places["images"] = tmp_path / "images"
        image_folder(places["images"])
    sources = {"run": "trained_run", "shards": "sample_shards", "published": "published_run"}
    for name, fixture in sources.items():
        if "{" + name + "}" in needs or (name == "published" and "train-init" in case.id):
            source = request.getfixturevalue(fixture)
            places[name] = tmp_path / name
            shutil.copytree(source, places[name], ignore=shutil.ignore_patterns("wandb"))
    args = [fill(a, places) for a in case.args]
    if case.id.startswith("train-init"):
        args += ["--init", str(places["published"])]
    if case.setup:
        case.setup(tmp_path)
    before = tree(tmp_path)
    result = run_in_process(COMMANDS[case.command](), [case.command, *args], {**os.environ, **case.env})
    output = result.stdout + result.stderr
    assert result.returncode == case.exit, output[-3000:]
    assert "Traceback" not in output and "Warning" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if all(w.lower() in line.lower() for w in case.words)]
    assert lines, f"no line holds {case.words}:\n{output[-3000:]}"
    if case.exit == 1 and case.command != "verify-shards":  # (2: a usage error, in argparse's or click's form)
        said = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(said) == 1 or (case.command == "predict" and all(": " in s for s in said)), result.stderr
    allowed = [Path(fill(c, places)).relative_to(tmp_path).as_posix() for c in case.changes]
    after = tree(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not any(k == a or k.startswith(a + "/") for a in allowed))
    assert changed == [], changed
    if "{tmp}/newrun" in case.args:  # a refused run made no run folder
        assert not (tmp_path / "newrun").exists()


# ---- a test per defect, beyond the table's refusals


def test_a_truncated_tar_is_repaired_into_a_set_the_loaders_take(sample_shards, tmp_path):
    """The most common damage: verify-shards names it, --repair drops the samples the cut took and
    records the tar's size now, and the set then verifies clean and passes train.py's checks."""
    from dali_imagenet.data.shards import find_shards

    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    truncate_first_tar(tmp_path)
    verify = click_main("shard_tools.verify")
    repaired = run_in_process(verify, ["verify-shards", str(shards), "--repair", "--workers", "1", "--quiet"])
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    assert entry["bytes"] == first_tar(tmp_path).stat().st_size
    dropped = [e for e in manifest["splits"]["train"]["rejected"] if e["shard"] == entry["name"]]
    assert any("truncated" in e["reason"] for e in dropped) and entry["samples"] < 16
    train = find_shards(str(shards), "train")  # the size and index checks train.py makes
    assert train.samples == 96 - (16 - entry["samples"])
    again = run_in_process(verify, ["verify-shards", str(shards), "--workers", "1", "--quiet"])
    assert again.returncode == 0 and "bad 0" in again.stdout, again.stdout + again.stderr


def test_a_stop_during_the_model_build_stops_it_at_once():
    """SIGTERM while a model is being built (minutes for a large one, one tensor at a time): the
    build raises `Interrupted` within a fraction of a second instead of running to its end."""
    import signal
    import threading
    import time

    from dali_imagenet.errors import Interrupted
    from dali_imagenet.run.interrupts import StopRequest
    from dali_imagenet.training import archs

    request = StopRequest(announce=False)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        started = time.monotonic()
        with pytest.raises(Interrupted, match="SIGTERM"), request.at_once():
            timer.start()
            while time.monotonic() - started < 30:  # ResNet-50s, one after another: far longer than the stop takes
                archs.build("resnet50", 1000)
        assert time.monotonic() - started < 0.3 + 3
    finally:
        request.restore()


def test_the_memory_estimate_counts_what_a_resnet_50_holds():
    """25,557,032 weights (torchvision's ResNet-50); activations grow with the batch and the pixels."""
    from dali_imagenet.training import memory

    small = memory.estimate("resnet50", 64, 1000, image_size=112, batch_size=32, amp_dtype="bfloat16", ema=False)
    assert small.parameters == 25_557_032 and small.state_bytes == 25_557_032 * 4 * 3
    doubled = memory.estimate("resnet50", 64, 1000, image_size=224, batch_size=64, amp_dtype="bfloat16", ema=True)
    assert doubled.state_bytes == 25_557_032 * 4 * 4
    assert 7.5 < doubled.activation_bytes / small.activation_bytes < 8.5  # 2 x the batch, ~4 x the pixels
    float32 = memory.estimate("resnet50", 64, 1000, image_size=112, batch_size=32, amp_dtype="float32", ema=False)
    assert float32.activation_bytes == 2 * small.activation_bytes


def test_the_pixel_limit_is_checked_from_the_header_and_says_the_size(tmp_path):
    from dali_imagenet.data.pixels import MAX_PIXELS, TooManyPixels, open_image
    from shard_tools.images import Rejected, prepare_image

    png_header(tmp_path / "wide.png", 20000, 10000)  # 200 megapixels: over PIL's own error limit too
    png_header(tmp_path / "ok.png", 100, 50)
    with pytest.raises(TooManyPixels, match="^200,000,000 pixels, over the limit of 89,478,485"):
        open_image(tmp_path / "wide.png")
    assert open_image(tmp_path / "ok.png").size == (100, 50)
    with pytest.raises(TooManyPixels, match="^100x50 = 5,000 pixels, over the limit of 4,999"):
        open_image(tmp_path / "ok.png", limit=4999)
    assert open_image(tmp_path / "ok.png", limit=None).size == (100, 50) and MAX_PIXELS == 89_478_485
    with pytest.raises(TooManyPixels, match=r"^200,000,000 pixels, over PIL's limit of 178,956,970 \(a higher"):
        open_image(tmp_path / "wide.png", limit=300_000_000)  # PIL refuses first: its limit is the one named
    with pytest.raises(Rejected) as why:
        prepare_image(b"not an image at all")
    assert "BytesIO" not in str(why.value) and "cannot identify image file" in str(why.value)


def test_init_from_an_unnamed_state_dict_says_its_class_count(tmp_path):
    import torch

    from dali_imagenet.run.initial import initialise
    from dali_imagenet.training import archs

    torch.save(archs.build("resnet10", 5, width=16).state_dict(), tmp_path / "five.pt")
    started = initialise(str(tmp_path / "five.pt"), archs.build("resnet10", 8, width=16), "resnet10",
                         [f"c{i}" for i in range(8)], 16)
    assert "a new classifier for 8 classes (5 there)" in started.line(8)


def test_the_staging_lock_goes_with_its_holder_and_a_waiter_takes_a_live_one(tmp_path):
    import threading
    import time

    from dali_imagenet.data.staging import LOCK, _locked

    path = tmp_path / LOCK
    order = []
    first = _locked(path, None).__enter__()

    def wait():
        with _locked(path, None):
            order.append("second has it")
            assert path.exists()  # its own file, not the one the first holder removed
            time.sleep(0.1)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    assert order == []  # held
    first.__exit__(None, None, None)
    waiter.join(5)
    assert order == ["second has it"] and not path.exists()


def test_s3_outputs_overlap_by_whole_key_components():
    """A re-encoded set beside its source (`...-q90`) is allowed; the source itself, a prefix inside
    it or one around it are refused."""
    from dali_imagenet.data.folders import url_overlap

    assert url_overlap("s3://b/imagenet-shards-q90", "s3://b/imagenet-shards") is None
    assert url_overlap("s3://b/imagenet-shards/", "s3://b/imagenet-shards") == "is"
    assert url_overlap("s3://b/imagenet-shards/q90", "s3://b/imagenet-shards") == "lies inside"
    assert url_overlap("s3://b", "s3://b/imagenet-shards") == "contains"
    assert url_overlap("s3://other/imagenet-shards", "s3://b/imagenet-shards") is None
