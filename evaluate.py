"""Top-1 / top-5 accuracy and loss of a checkpoint on the validation shards.

    python evaluate.py --checkpoint runs/r50/best.pt --data SHARDS [--dali] [--json]

Loads this project's checkpoints (`last.pt`, `best.pt`, `final_weights.pt`) and plain torchvision
`resnet*` state dicts (`--arch` says which, default resnet50).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from dali_imagenet import make_loader
from dali_imagenet.checkpoint import load
from dali_imagenet.metrics import evaluate
from dali_imagenet.model import LAYOUTS, build_model
from dali_imagenet.shards import ShardError
from dali_imagenet.step import AMP_DTYPES, input_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="shard folder or s3://bucket/prefix")
    parser.add_argument("--dali", action="store_true", help="DALI loader; without it the torchvision baseline")
    parser.add_argument("--arch", choices=sorted(LAYOUTS), default=None, help="for plain state dicts (default resnet50)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image-size", type=int, default=None, help="val crop (default: the checkpoint's, else 224)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bfloat16", "float16", "float32"], default=None,
                        help="autocast dtype (default: the checkpoint's, else float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    try:
        state = load(args.checkpoint)
    except Exception as error:
        sys.exit(f"error: {args.checkpoint}: cannot load ({str(error).splitlines()[0]})")
    config = state.get("config", {}) if isinstance(state.get("config"), dict) else {}
    weights = state["model"] if "model" in state else state
    if "fc.weight" not in weights:
        sys.exit(f"error: {args.checkpoint}: neither a dali-imagenet checkpoint nor a ResNet state dict")
    arch = args.arch or state.get("arch") or "resnet50"
    model = build_model(arch, num_classes=weights["fc.weight"].shape[0])
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        sys.exit(f"error: {args.checkpoint}: does not fit {arch} ({str(error).splitlines()[0]}); pass --arch")

    device = torch.device(args.device)
    amp = args.amp or config.get("amp_dtype", "float32")
    if amp == "float16" and device.type != "cuda":
        amp = "bfloat16"
    amp_dtype = AMP_DTYPES[amp]
    image_size = args.image_size or config.get("val_image_size", 224)
    model = model.to(device, memory_format=torch.channels_last)
    try:
        loader = make_loader(args.data, args.split, args.batch_size, device=device, image_size=image_size,
                             dtype=input_dtype(amp_dtype, device),
                             backend="dali" if args.dali else "torchvision", train=False)
    except (ShardError, ValueError) as error:
        sys.exit(f"error: {error}")
    metrics = evaluate(model, loader, device, amp_dtype)
    metrics.update(checkpoint=args.checkpoint, arch=arch, image_size=image_size)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.checkpoint} ({arch}, {metrics['images']} images at {image_size} px): "
              f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
