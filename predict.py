"""Top-k classes of image files with a trained checkpoint.

    python predict.py photo.jpg photos/ --checkpoint runs/r50/best.pt [--top 5] [--json]
    python predict.py --data SHARDS --split test --checkpoint runs/r50/best.pt --json   # a shard split

JPEG and PNG files of any mode (RGB, grayscale, CMYK); folders are searched for image files.
Preprocessing is the validation preprocessing the checkpoint was evaluated with (the run's
val_image_size and val_crop_fraction). A file that cannot be read gets one line on stderr; the
others are still predicted, and the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from dali_imagenet.data.pixels import MAX_PIXELS
from dali_imagenet.errors import UsageError, one_line_errors
from dali_imagenet.inference.predictor import WEIGHT_CHOICES, ImageError, Predictor, load_image, load_model, top_json
from dali_imagenet.training.model import LAYOUTS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".jpe", ".jfif"}


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)  # named on the command line: tried whatever its suffix
    return files


def read_classes(path: str) -> list[str]:
    """A `classes.tsv` (index, synset, names) as shard-imagenet writes it, or one name per line."""
    from dali_imagenet.data.shardformat import parse_classes_tsv

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UsageError(f"{path}: cannot read the class names ({error.strerror})") from None
    return parse_classes_tsv(text, path) if text.startswith("index\t") else [line for line in text.splitlines() if line]


def shard_images(data: str, split: str):
    """(name, image bytes) of every sample of a shard split, read through the indices (local
    shards, or each s3:// shard fetched once): e.g. ImageNet's unlabelled test split."""
    import io
    import tempfile

    from dali_imagenet import s3
    from dali_imagenet.data.shardformat import iter_components
    from dali_imagenet.data.shards import find_shards

    shards = find_shards(data, split)
    for tar, idx in zip(shards.tars, shards.indices):
        with tempfile.TemporaryDirectory(prefix="predict-") as folder:
            local = {}
            for remote, name in ((tar, "shard.tar"), (idx, "shard.idx")):
                local[name] = remote
                if s3.is_s3(remote):
                    local[name] = f"{folder}/{name}"
                    s3.download(*remote.rsplit("/", 1), local[name])
            for name, jpeg in iter_components(local["shard.tar"], local["shard.idx"], "jpg"):
                yield f"{tar}:{name[: -len('.jpg')]}", io.BytesIO(jpeg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--data", help="a shard folder or s3:// prefix: predict every sample of --split instead")
    parser.add_argument("--split", default="test", help="with --data: the split (default: test, unlabelled)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", help=f"for plain state dicts: one of {', '.join(sorted(LAYOUTS))} (default resnet50) "
                        "or timm:NAME; a run's checkpoint names its own")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help="raw weights or their EMA")
    parser.add_argument("--classes", help="class names: a classes.tsv or one name per line (default: the checkpoint's)")
    parser.add_argument("--image-size", type=int, help="crop size in px (default: the run's val_image_size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse an image with more pixels (width x "
                        f"height) than this, before decoding it (default {MAX_PIXELS:,}: PIL's warning limit)")
    args = parser.parse_args()
    if bool(args.images) == bool(args.data):
        raise UsageError("give image files or folders, or --data SHARDS [--split SPLIT], not both or neither")
    for flag, value in (("--top", args.top), ("--batch-size", args.batch_size), ("--image-size", args.image_size),
                        ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")

    loaded = load_model(args.checkpoint, arch=args.arch, which=args.weights, device=args.device)
    predictor = Predictor(loaded, image_size=args.image_size, device=args.device,
                          class_names=read_classes(args.classes) if args.classes else None)
    items = shard_images(args.data, args.split) if args.data else ((str(p), p) for p in image_files(args.images))
    failed = seen = 0
    while chunk := list(itertools.islice(items, args.batch_size)):
        seen += len(chunk)
        batch = []
        for name, source in chunk:
            try:
                batch.append((name, load_image(source, args.max_pixels)))
            except (ImageError, OSError) as error:  # a missing file is one line too
                failed += 1
                print(f"{name}: {error}", file=sys.stderr, flush=True)
        if not batch:
            continue
        tops = predictor.top(predictor.probabilities([image for _, image in batch]), args.top)
        for (name, _), top in zip(batch, tops):
            if args.json:
                print(json.dumps({"path": name, "top": top_json(top)}), flush=True)
            else:
                print(f"{name}:\n" + "".join(f"  {p:7.2%}  {n}\n" for _, n, p in top), end="", flush=True)
    if not seen:
        raise UsageError(f"no image files in {' '.join(args.images) or args.data}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    with one_line_errors():
        main()
