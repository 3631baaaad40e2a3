"""Top-k classes of image files with a trained checkpoint.

    python predict.py photo.jpg photos/ --checkpoint runs/r50/best.pt [--top 5] [--json]

JPEG and PNG files of any mode (RGB, grayscale, CMYK); folders are searched for image files.
Preprocessing is the validation preprocessing the checkpoint was evaluated with (the run's
val_image_size and val_crop_fraction). A file that cannot be read gets one line on stderr; the
others are still predicted, and the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dali_imagenet.errors import UsageError, one_line_errors
from dali_imagenet.inference import WEIGHT_CHOICES, ImageError, Predictor, load_image, load_model
from dali_imagenet.model import LAYOUTS

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
    from dali_imagenet.shardformat import parse_classes_tsv

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UsageError(f"{path}: cannot read the class names ({error.strerror})") from None
    return parse_classes_tsv(text, path) if text.startswith("index\t") else [l for l in text.splitlines() if l]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=sorted(LAYOUTS), help="for plain state dicts (default resnet50)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help="raw weights or their EMA")
    parser.add_argument("--classes", help="class names: a classes.tsv or one name per line (default: the checkpoint's)")
    parser.add_argument("--image-size", type=int, help="crop size in px (default: the run's val_image_size)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    loaded = load_model(args.checkpoint, arch=args.arch, which=args.weights, device=args.device)
    predictor = Predictor(loaded, image_size=args.image_size, device=args.device,
                          class_names=read_classes(args.classes) if args.classes else None)
    files = image_files(args.images)
    failed = 0
    if not files:
        raise UsageError(f"no image files in {' '.join(args.images)}")
    for start in range(0, len(files), args.batch_size):
        batch = []
        for path in files[start:start + args.batch_size]:
            try:
                batch.append((path, load_image(path)))
            except (ImageError, OSError) as error:  # a missing file is one line too
                failed += 1
                print(f"{path}: {error}", file=sys.stderr, flush=True)
        if not batch:
            continue
        tops = predictor.top(predictor.probabilities([image for _, image in batch]), args.top)
        for (path, _), top in zip(batch, tops):
            if args.json:
                print(json.dumps({"path": str(path), "top": [{"index": i, "name": n, "probability": p}
                                                              for i, n, p in top]}), flush=True)
            else:
                print(f"{path}:\n" + "".join(f"  {p:7.2%}  {n}\n" for _, n, p in top), end="", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    with one_line_errors():
        main()
