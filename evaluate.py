"""Top-1 / top-5 accuracy and loss of a checkpoint on the validation shards, at one or more sizes.

    python evaluate.py --checkpoint runs/r50/best.pt --data SHARDS [--dali] [--image-size 224 256 288] [--flip]

Loads this project's checkpoints (`last.pt`, `best.pt`, `final_weights.pt`; raw or EMA weights)
and plain torchvision `resnet*` state dicts (`--arch` says which, default resnet50). Without
--image-size it uses the run's `val_image_size` and `val_crop_fraction`; the resize's interpolation
and crop mode are always the model's (a timm model's own: bicubic for most).
"""
from __future__ import annotations

import argparse
import json

import torch

from dali_imagenet import make_loader
from dali_imagenet.data.shards import find_shards
from dali_imagenet.errors import UsageError, one_line_errors
from dali_imagenet.inference.predictor import WEIGHT_CHOICES, load_model
from dali_imagenet.training.evaluation import evaluate
from dali_imagenet.training.model import LAYOUTS
from dali_imagenet.training.precision import AMP_DTYPES, Precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="shard folder or s3://bucket/prefix")
    parser.add_argument("--dali", action="store_true", help="DALI loader; without it the torchvision baseline")
    parser.add_argument(
        "--arch",
        default=None,
        help="for plain state dicts: one of "
        f"{', '.join(sorted(LAYOUTS))} (default resnet50) or timm:NAME; a run's checkpoint names its own",
    )
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="raw weights or their EMA (auto: whichever scored higher in the run)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image-size", type=int, nargs="+", default=None,
                        help="val crop size(s) in px, one row each (default: the run's val_image_size)")
    parser.add_argument("--crop-fraction", type=float, default=None,
                        help="crop / resized shorter side (default: the run's val_crop_fraction, 0.875)")
    parser.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirror image")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default=None,
                        help="autocast dtype (default: the run's, else float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per size")
    args = parser.parse_args()
    for flag, values in (("--batch-size", [args.batch_size]), ("--image-size", args.image_size or [])):
        for value in values:
            if value < 1:
                raise UsageError(f"{flag} {value}: must be at least 1")
    if args.crop_fraction is not None and not 0 < args.crop_fraction <= 1:
        raise UsageError(f"--crop-fraction {args.crop_fraction}: must be in (0, 1]")

    loaded = load_model(args.checkpoint, arch=args.arch, which=args.weights, device=args.device)
    precision = Precision.for_device(args.amp or loaded.config.amp_dtype, args.device, fallback=True)
    shards = find_shards(args.data, args.split)
    shards.require_labels("scoring")
    crop_fraction = args.crop_fraction or loaded.config.val_crop_fraction
    for image_size in args.image_size or [loaded.config.val_image_size]:
        loader = make_loader(shards, args.split, args.batch_size, device=args.device, image_size=image_size,
                             crop_fraction=crop_fraction, dtype=precision.loader_dtype,
                             backend="dali" if args.dali else "torchvision", train=False,
                             normalization=loaded.config.normalization(), interpolation=loaded.config.val_interpolation,
                             crop_mode=loaded.config.val_crop_mode)
        metrics = evaluate({"": loaded.model}, loader, precision, flip=args.flip)
        metrics.update(checkpoint=args.checkpoint, arch=loaded.arch, weights=loaded.weights, image_size=image_size,
                       crop_fraction=crop_fraction, interpolation=loaded.config.val_interpolation,
                       crop_mode=loaded.config.val_crop_mode, flip=args.flip)
        if args.json:
            print(json.dumps(metrics), flush=True)
        else:
            print(f"{args.checkpoint} ({loaded.arch}, {loaded.weights} weights, {metrics['images']} images at "
                  f"{image_size} px{', flip TTA' if args.flip else ''}): top-1 {metrics['top1']:.2f}%  "
                  f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}", flush=True)


if __name__ == "__main__":
    with one_line_errors():
        main()
