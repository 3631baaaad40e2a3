"""`make_loader` over the sample's shards: DALI on CPU (the GPU graph defined and serialised),
the torchvision baseline, distributed sharding, S3, the timm layout and bad shards."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_imagenet import make_loader
from dali_imagenet.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, val_resize_size
from dali_imagenet.data.shardformat import ShardWriter
from dali_imagenet.data.shards import ShardError
from dali_imagenet.errors import UsageError

SIZE = 64  # small images keep the CPU tests fast; the geometry is the same as at 224


def shard_samples(shards_dir: Path, split: str) -> list[dict]:
    import webdataset as wds

    manifest = json.loads((shards_dir / "manifest.json").read_text())
    urls = [str(shards_dir / s["name"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised N×3×H×W -> uint8-scale float N×H×W×3."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() * std + mean).permute(0, 2, 3, 1).numpy()


def torchvision_val(jpeg: bytes, size: int) -> np.ndarray:
    from torchvision.transforms import v2

    image = v2.functional.pil_to_tensor(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    image = v2.CenterCrop(size)(v2.Resize(val_resize_size(size), antialias=True)(image))
    return image.permute(1, 2, 0).float().numpy()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_train_batches_shape_dtype_channels_last(sample_shards, dtype):
    loader = make_loader(sample_shards, "train", 16, device="cpu", image_size=SIZE, dtype=dtype)
    assert len(loader) == 96 // 16
    batches = list(loader)
    assert len(batches) == len(loader)
    images, labels = batches[0]
    assert images.shape == (16, 3, SIZE, SIZE) and images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last)
    if dtype != torch.bfloat16:  # DALI's own NHWC buffer, viewed as NCHW: no transpose copy was made
        assert images.permute(0, 2, 3, 1).is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    assert 0 <= labels.min() and labels.max() < 8
    assert -3 < images.float().mean() < 3


def test_epochs_reshuffle(sample_shards):
    loader = make_loader(sample_shards, "train", 16, device="cpu", image_size=SIZE, seed=1)
    first = torch.cat([labels for _, labels in loader])
    second = torch.cat([labels for _, labels in loader])
    assert len(first) == len(second) == 96
    assert not torch.equal(first, second)


def test_val_labels_match_each_key_and_pixels_match_torchvision(sample_shards):
    samples = shard_samples(sample_shards, "validation")
    loader = make_loader(sample_shards, "validation", 16, device="cpu", image_size=SIZE, dtype=torch.float32)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == len(samples) == 40
    assert labels.tolist() == [int(s["cls"]) for s in samples]
    pixels = to_pixels(images)
    differences = []
    for i, sample in enumerate(samples):
        reference = torchvision_val(sample["jpg"], SIZE)
        differences.append(np.abs(pixels[i] - reference).mean())
        # The output belongs to this key: it is far closer to its own image than to the next one.
        other = torchvision_val(samples[(i + 1) % len(samples)]["jpg"], SIZE)
        assert differences[-1] < np.abs(pixels[i] - other).mean() / 2
    print(f"val mean |DALI - torchvision Resize+CenterCrop| = {np.median(differences):.2f} / 255")
    assert np.median(differences) < 1.0 and max(differences) < 3.0


@pytest.mark.parametrize("interpolation,crop_mode", [("bicubic", "center"), ("bilinear", "squash")])
def test_val_resize_and_crop_of_a_timm_model_match_torchvision(sample_shards, interpolation, crop_mode):
    """A timm model's val preprocessing (its interpolation and crop mode): DALI's graph against the
    torchvision transform predict.py and app.py use; "border" is the torchvision loader's only."""
    from dali_imagenet.data.preprocess import val_geometry

    samples = shard_samples(sample_shards, "validation")[:16]
    loader = make_loader(sample_shards, "validation", 16, device="cpu", image_size=SIZE, dtype=torch.float32,
                         interpolation=interpolation, crop_mode=crop_mode)
    pixels = to_pixels(next(iter(loader))[0])
    geometry = val_geometry(SIZE, interpolation=interpolation, crop_mode=crop_mode)
    differences, bilinear = [], []
    for i, sample in enumerate(samples):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        for transform, found in ((geometry, differences), (val_geometry(SIZE), bilinear)):
            reference = image
            for step in transform:
                reference = step(reference)
            found.append(np.abs(pixels[i] - reference.permute(1, 2, 0).float().numpy()).mean())
    print(f"val {interpolation}/{crop_mode}: |DALI - torchvision| = {np.median(differences):.2f} / 255, "
          f"vs bilinear/center {np.median(bilinear):.2f}")
    assert np.median(differences) < 1.5 and np.median(differences) < np.median(bilinear)
    with pytest.raises(UsageError, match="border: the torchvision one only"):
        make_loader(sample_shards, "validation", 16, device="cpu", image_size=SIZE, crop_mode="border")


def test_val_is_deterministic(sample_shards):
    runs = [torch.cat([x for x, _ in make_loader(sample_shards, "validation", 16, device="cpu", image_size=SIZE)])
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def fingerprints(images: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
    sums = images.float().sum(dim=(1, 2, 3))
    return [(int(label), round(float(s), 1)) for label, s in zip(labels, sums)]


@pytest.mark.parametrize("batch_size", [8, 7])
def test_two_ranks_cover_validation_exactly_once(sample_shards, batch_size):
    single = make_loader(sample_shards, "validation", batch_size, device="cpu", image_size=SIZE)
    expected = sorted(fingerprints(torch.cat([x for x, _ in single]), torch.cat([y for _, y in single])))
    per_rank, batches = [], []
    for rank in range(2):
        loader = make_loader(sample_shards, "validation", batch_size, device="cpu", image_size=SIZE,
                             rank=rank, world_size=2)
        out = list(loader)
        batches.append(len(out))
        assert len(out) == len(loader)
        per_rank += fingerprints(torch.cat([x for x, _ in out]), torch.cat([y for _, y in out]))
    assert batches[0] == batches[1]
    assert sorted(per_rank) == expected and len(per_rank) == 40


def test_two_ranks_train_same_batch_count(sample_shards):
    lengths = [len(list(make_loader(sample_shards, "train", 10, device="cpu", image_size=SIZE, rank=r, world_size=2)))
               for r in range(2)]
    assert lengths[0] == lengths[1] == 48 // 10


def test_label_parsing_in_graph():
    from nvidia.dali import fn, pipeline_def

    from dali_imagenet.data.pipelines import label_from_ascii

    values = [b"0", b"7", b"42", b"999", b"123456"]

    @pipeline_def(batch_size=len(values), num_threads=1, device_id=None)
    def parse():
        cls = fn.external_source(source=lambda: [np.frombuffer(v, np.uint8) for v in values], batch=True)
        return label_from_ascii(cls)

    pipe = parse()
    pipe.build()
    (out,) = pipe.run()
    assert [int(np.asarray(out.at(i))) for i in range(len(values))] == [0, 7, 42, 999, 123456]
    assert np.asarray(out.at(0)).shape == ()


@pytest.mark.parametrize("train", [True, False])
def test_gpu_graph_is_well_formed_without_a_gpu(sample_shards, train):
    from nvidia.dali import types

    from dali_imagenet.data.pipelines import imagenet_pipeline
    from dali_imagenet.data.shards import find_shards

    shards = find_shards(sample_shards, "train")
    pipe = imagenet_pipeline(shards.tars, shards.indices, device="gpu", train=train, image_size=224,
                             dtype=types.FLOAT16, shard_id=0, num_shards=1, shuffle_buffer=64,
                             batch_size=8, num_threads=2, device_id=None)
    graph = pipe.serialize()
    assert b"decoders__ImageRandomCrop" in graph or b"decoders__Image" in graph
    assert b"mixed" in graph
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            pipe.build()


def test_torchvision_baseline_same_interface(sample_shards):
    loader = make_loader(sample_shards, "train", 16, device="cpu", image_size=SIZE, backend="torchvision",
                         num_threads=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    images, labels = batches[0]
    assert images.shape == (16, 3, SIZE, SIZE) and images.dtype == torch.float32  # the CPU's fastest: the default
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
    val = make_loader(sample_shards, "validation", 16, device="cpu", image_size=SIZE, backend="torchvision",
                      num_threads=2, dtype=torch.float32)
    val_labels = torch.cat([y for _, y in val])
    assert sorted(val_labels.tolist()) == sorted(int(s["cls"]) for s in shard_samples(sample_shards, "validation"))


def test_reads_from_s3(sample_shards, s3_bucket):
    from dali_imagenet.s3 import client

    s3 = client()
    for path in sample_shards.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"shards/{path.relative_to(sample_shards)}")
    local = torch.cat([x for x, _ in make_loader(sample_shards, "validation", 16, device="cpu", image_size=SIZE)])
    remote = make_loader(f"s3://{s3_bucket}/shards", "validation", 16, device="cpu", image_size=SIZE)
    assert torch.equal(torch.cat([x for x, _ in remote]), local)


def test_timm_layout_builds_indices_once(sample_shards, tmp_path):
    folder, cache = tmp_path / "timm", tmp_path / "cache"
    folder.mkdir()
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    for split in ("train", "validation"):
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            shutil.copy(sample_shards / shard["name"], folder / f"imagenet1k-{split}-{i:04d}.tar")
    loader = make_loader(folder, "validation", 8, device="cpu", image_size=SIZE, cache_dir=cache)
    assert loader.num_samples == 40 and sum(len(y) for _, y in loader) == 40
    made = sorted(cache.glob("*.idx"))
    assert len(made) == len(manifest["splits"]["validation"]["shards"])
    stamps = [p.stat().st_mtime_ns for p in made]
    make_loader(folder, "validation", 8, device="cpu", image_size=SIZE, cache_dir=cache)
    assert [p.stat().st_mtime_ns for p in made] == stamps
    assert make_loader(folder, "train", 8, device="cpu", image_size=SIZE, cache_dir=cache).num_samples == 96


def copy_shards(sample_shards, tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "shards"
    shutil.copytree(sample_shards, out)
    return out, json.loads((out / "manifest.json").read_text())


def test_truncated_shard_is_named(sample_shards, tmp_path):
    out, manifest = copy_shards(sample_shards, tmp_path)
    tar = out / manifest["splits"]["validation"]["shards"][1]["name"]
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(ShardError, match=tar.name):
        make_loader(out, "validation", 8, device="cpu", image_size=SIZE)


def test_missing_index_is_named(sample_shards, tmp_path):
    out, manifest = copy_shards(sample_shards, tmp_path)
    idx = (out / manifest["splits"]["validation"]["shards"][0]["name"]).with_suffix(".idx")
    idx.unlink()
    with pytest.raises(ShardError, match=idx.name):
        make_loader(out, "validation", 8, device="cpu", image_size=SIZE)


def test_corrupt_jpeg_is_named_not_a_hang(sample_shards, tmp_path):
    out, manifest = copy_shards(sample_shards, tmp_path)
    entry = manifest["splits"]["validation"]["shards"][1]
    tar = out / entry["name"]
    samples = shard_samples(out, "validation")[:3]
    with ShardWriter(tar, tar.with_suffix(".idx")) as writer:
        for i, sample in enumerate(samples):
            jpeg = sample["jpg"][:200] + b"\x00" * 300 if i == 1 else sample["jpg"]
            writer.add(f"bad{i}", {"jpg": jpeg, "cls": sample["cls"]})
    entry["bytes"], entry["samples"] = tar.stat().st_size, 3
    (out / "manifest.json").write_text(json.dumps(manifest))
    script = textwrap.dedent(f"""
        from dali_imagenet import make_loader
        for _ in make_loader({str(out)!r}, "validation", 8, device="cpu", image_size={SIZE}):
            pass
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ShardError" in result.stderr and f"{tar.name}: sample bad1.jpg" in result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("split, decoding", [("train", {}), ("validation", {}),
                                             ("validation", {"hw_decoder_load": 0.0, "hybrid_huffman_threshold": 0})])
def test_gpu_mixed_decoding(sample_shards, split, decoding):
    """The hybrid path with every image on nvJPEG's GPU-assisted Huffman decoder (the L4 host's
    other setting) decodes the same images too."""
    loader = make_loader(sample_shards, split, 16, device="cuda", image_size=SIZE, **decoding)
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last)
    if split == "validation":  # GPU and CPU decoders agree to within rounding on the same images
        cpu_images, cpu_labels = next(iter(make_loader(sample_shards, split, 16, device="cpu", image_size=SIZE)))
        assert torch.equal(labels.cpu(), cpu_labels)
        assert (images.float().cpu() - cpu_images.float()).abs().mean() < 0.05


BACKENDS = ["dali", "torchvision"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_runs_the_same_steps_and_reads_each_sample_once(uneven_shards, backend, world):
    from collections import Counter

    counts = json.loads((uneven_shards / "manifest.json").read_text())["splits"]["validation"]["shards"]
    assert len({s["samples"] for s in counts}) > 1  # shards of unequal sizes
    options = dict(device="cpu", image_size=16, backend=backend, num_threads=2, world_size=world)
    single = make_loader(uneven_shards, "validation", 5, **options | {"world_size": 1})
    expected = sorted(fingerprints(torch.cat([x for x, _ in single]), torch.cat([y for _, y in single])))
    val_lengths, seen, train_labels = [], [], Counter()
    for rank in range(world):
        val = make_loader(uneven_shards, "validation", 5, rank=rank, **options)
        batches = list(val)
        val_lengths += [len(val), len(batches)]
        seen += fingerprints(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        # batch 1: at most the larger ranks' last sample is dropped
        train = make_loader(uneven_shards, "validation", 1, rank=rank, train=True, seed=5, **options)
        train_batches = list(train)
        assert len(train_batches) == len(train) == 40 // world
        train_labels.update(int(y) for _, labels in train_batches for y in labels)
    assert len(set(val_lengths)) == 1, val_lengths
    assert sorted(seen) == expected and len(seen) == 40  # every val image once across the ranks
    split_labels = Counter(label for label, _ in expected)
    assert not train_labels - split_labels and sum(train_labels.values()) == world * (40 // world)


def test_rank_pieces_cover_each_sample_once():
    from dali_imagenet.data.partition import rank_pieces
    from dali_imagenet.data.shards import SplitShards

    counts = (7, 7, 6, 6, 6, 4, 4)
    shards = SplitShards(tuple(f"s{i}.tar" for i in range(7)), tuple(f"s{i}.idx" for i in range(7)), counts, ("a",))
    for world in (1, 2, 3, 7, 40):
        samples = [(tar, first + i) for rank in range(world) for tar, first, count in rank_pieces(shards, world, rank)
                   for i in range(count)]
        per_rank = [sum(c for *_, c in rank_pieces(shards, world, rank)) for rank in range(world)]
        assert max(per_rank) - min(per_rank) <= 1
        assert sorted(samples) == sorted((f"s{i}.tar", j) for i, c in enumerate(counts) for j in range(c))


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_epoch_reads_the_shards_in_a_new_order(sample_shards, backend):
    import webdataset as wds

    from dali_imagenet.data.partition import epoch_shards
    from dali_imagenet.data.shards import find_shards

    shards = find_shards(sample_shards, "train")
    labels = {tar: [int(s["cls"]) for s in wds.WebDataset([tar], shardshuffle=False, empty_check=False)]
              for tar in shards.tars}
    orders = []
    for epoch in (0, 1):
        order = epoch_shards(shards, 3, epoch).tars
        assert sorted(order) == sorted(shards.tars)
        orders.append(order)
        # A one-sample shuffle buffer leaves only the shard order: the loader must follow the epoch's.
        loader = make_loader(shards, "train", 8, device="cpu", image_size=16, seed=3, epoch=epoch, shuffle_buffer=1,
                             backend=backend, num_threads=1)
        assert torch.cat([y for _, y in loader]).tolist() == [label for tar in order for label in labels[tar]]
    assert orders[0] != orders[1]


def test_consecutive_epochs_are_unalike_at_imagenet_scale():
    """1,025 shards of 1,250: where a sample lands in epoch 0 says ~nothing about epoch 1."""
    from dali_imagenet.data.partition import epoch_shards
    from dali_imagenet.data.shards import SplitShards

    n_shards, per_shard = 1025, 1250
    shards = SplitShards(tuple(range(n_shards)), tuple(range(n_shards)), (per_shard,) * n_shards, ("a",))

    def positions(epoch):  # the epoch position of every sample, by sample id
        order = np.asarray(epoch_shards(shards, 0, epoch).tars)
        rank_of_shard = np.empty(n_shards, np.int64)
        rank_of_shard[order] = np.arange(n_shards)
        return (rank_of_shard[:, None] * per_shard + np.arange(per_shard)[None, :]).ravel()

    a, b = positions(0), positions(1)
    spearman = np.corrcoef(a, b)[0, 1]  # positions are already ranks
    assert abs(spearman) < 0.1, spearman


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch(sample_shards, backend):
    """DALI restores its reader: the resumed loader decodes only the batches after the stop point
    and they equal an uninterrupted epoch's. The baseline gives the same batches by replaying."""
    options = dict(device="cpu", image_size=16, seed=7, epoch=2, backend=backend, num_threads=1, shuffle_buffer=32)
    straight = list(make_loader(sample_shards, "train", 8, **options))
    first = make_loader(sample_shards, "train", 8, **options)
    batches = iter(first)
    for _ in range(5):
        next(batches)
    state = first.state_dict()
    assert state["batch"] == 5
    resumed = make_loader(sample_shards, "train", 8, resume=state, **options)
    rest = list(resumed)
    assert len(rest) == len(straight) - 5 == len(resumed) - 5
    for (x, y), (x0, y0) in zip(rest, straight[5:]):
        assert torch.equal(y, y0) and torch.equal(x, x0)
    assert resumed.batches_read == (len(straight) - 5 if backend == "dali" else len(straight))
    assert len(list(resumed)) == len(straight)  # the next epoch is whole again


def test_a_spec_is_checked_once_and_each_epoch_is_its_own(sample_shards):
    """`LoaderSpec` refuses a bad argument where it is made, before any loader is built; `for_epoch`
    keys the shard order and the seed on the epoch, leaving the spec it came from as it was."""
    from dali_imagenet.data.loader import build_loader
    from dali_imagenet.data.loader_spec import LoaderSpec
    from dali_imagenet.data.shards import find_shards

    shards = find_shards(sample_shards, "train")
    for bad, words in ((dict(batch_size=97), "batch size 97 is larger than the 96 train samples each of 1 rank"),
                       (dict(backend="ffcv"), "backend must be one of dali, torchvision, not 'ffcv'"),
                       (dict(dtype=torch.int8), "dtype must be float16, bfloat16 or float32"),
                       (dict(crop_mode="border"), "border: the torchvision one only")):
        with pytest.raises(UsageError, match=words):
            LoaderSpec(shards, **{"batch_size": 8, "train": True, "device": "cpu", **bad})
    spec = LoaderSpec(shards, 8, train=True, device="cpu", image_size=16, seed=7, threads=1, shuffle_buffer=10**6)
    assert (spec.shuffle_buffer, spec.dtype) == (96, torch.float32)  # at most the rank's share; a CPU's dtype
    epoch = spec.for_epoch(2, 16)
    assert (spec.epoch, epoch.epoch) == (0, 2) and epoch.loader_seed != spec.loader_seed
    assert epoch.ordered_shards().tars != spec.ordered_shards().tars
    by_keywords = make_loader(sample_shards, "train", 8, device="cpu", image_size=16, seed=7, epoch=2, num_threads=1)
    assert torch.equal(torch.cat([y for _, y in build_loader(epoch)]), torch.cat([y for _, y in by_keywords]))


def test_the_run_describes_its_loaders_from_its_config(sample_shards):
    from dali_imagenet import distributed
    from dali_imagenet.config import load_config
    from dali_imagenet.data.shards import find_shards
    from dali_imagenet.run.loaders import run_loaders
    from dali_imagenet.training.precision import Precision

    cfg = load_config(None, ["batch_size=8", "seed=3", "shuffle_buffer=20", "crop_min_area=0.3", "val_image_size=40",
                             "val_crop_fraction=0.9", "val_interpolation=bicubic", "val_crop_mode=squash",
                             "loader_threads=2"])
    procs = distributed.Processes(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    precision = Precision.for_device("float32", procs.device)
    shards, val_shards = find_shards(sample_shards, "train"), find_shards(sample_shards, "validation")
    loaders = run_loaders(cfg, procs, precision, "dali", None, shards, val_shards)
    train = loaders.train.for_epoch(1, 24)
    assert (train.shards, train.train, train.seed, train.epoch, train.image_size) == (shards, True, 3, 1, 24)
    assert (train.shuffle_buffer, train.crop_min_area, train.threads, train.batch_size) == (20, 0.3, 2, 8)
    val = loaders.val
    assert (val.shards, val.train, val.image_size, val.crop_fraction) == (val_shards, False, 40, 0.9)
    assert (val.interpolation, val.crop_mode, val.backend, val.threads) == ("bicubic", "squash", "dali", 2)
    border = load_config(None, ["batch_size=8", "val_crop_mode=border"])
    with pytest.raises(UsageError, match="border: the torchvision one only"):  # refused once, before any epoch
        run_loaders(border, procs, precision, "dali", None, shards, val_shards)


def test_the_decoder_is_said_aloud_without_a_gpu():
    from dali_imagenet.data import decoder

    cpu = decoder.describe("dali", torch.device("cpu"), 0.7)
    assert cpu["jpeg_decoder"] == "DALI on the CPU (libjpeg-turbo)" and cpu["jpeg_hardware_decoder"] is False
    assert cpu["hw_decoder_load"] is None and decoder.short(cpu) == "CPU"
    baseline = decoder.describe("torchvision", torch.device("cpu"), 0.7)
    assert "torchvision.io.decode_jpeg" in baseline["jpeg_decoder"]
    forced = decoder.describe("dali", torch.device("cuda", 0), 0.0)  # hw_decoder_load 0: no probe is made
    assert "hybrid" in forced["jpeg_decoder"] and decoder.short(forced) == "hybrid"
    assert decoder.line(cpu).startswith("JPEG decoder: DALI on the CPU")


@pytest.mark.gpu
def test_the_hardware_decoder_probe_on_a_gpu():
    """On an A100/H100-class card the probe decodes (NVJPG engines); printed for any other card."""
    from dali_imagenet.data import decoder

    found = decoder.describe("dali", torch.device("cuda", 0), 0.7)
    print(decoder.line(found))
    name = torch.cuda.get_device_name(0)
    if any(chip in name for chip in ("A100", "A30", "H100", "H200")):
        assert found["jpeg_hardware_decoder"] is True, found
    assert found["jpeg_decoder_found_by"].startswith("a probe decode: nvImageCodec's hardware-only backend")
