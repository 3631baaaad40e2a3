"""Share what a run trained: a folder timm loads as it is, on the Hugging Face Hub, and a Space.

    python publish.py runs/r50 published/r50                        # the folder
    python publish.py runs/r50 published/r50 --hub USER/NAME        # ... uploaded as one commit
    python publish.py s3://bucket/runs/r50 --hub USER/NAME --space USER/NAME-demo

The folder: model.safetensors (the weights the run's page calls best: raw or EMA), config.json in
timm's format (the run's classes and validation preprocessing), README.md (the model card),
curves.png and the run's report.html. `timm.create_model("local-dir:FOLDER", pretrained=True)` or
`"hf-hub:USER/NAME"` loads a model timm builds as it is; a BlurPool ResNet (not timm's network) is
said so in the card and loads through predict.py, app.py, evaluate.py and train.py --init, which
all take `--checkpoint FOLDER` or `hf://USER/NAME[@REVISION]`. Publishing again adds a commit:
every earlier one stays loadable as hf://USER/NAME@COMMIT. The token: HF_TOKEN or `hf auth login`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dali_imagenet.errors import UsageError, one_line_errors
from dali_imagenet.sharing import hub
from dali_imagenet.sharing.folder import build

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run", help="a run folder or its s3://bucket/prefix")
    parser.add_argument("out_dir", nargs="?", help="the folder to write (default: a temporary one, with --hub/--space)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR when it holds files")
    parser.add_argument("--hub", metavar="USER/NAME", help="upload the folder to this model repo")
    parser.add_argument("--private", action="store_true", help="with --hub: create the repo private")
    parser.add_argument("--space", metavar="USER/NAME", help="create or update a Gradio Space serving the demo on it")
    parser.add_argument("--license", default="apache-2.0", help="the card's licence (default apache-2.0)")
    args = parser.parse_args()
    if not (args.out_dir or args.hub or args.space):
        raise UsageError("give OUT_DIR, --hub USER/NAME or --space USER/NAME (or several)")

    if args.hub or args.space:
        hub.check_token()
    with tempfile.TemporaryDirectory(prefix="publish-") as scratch:
        out_dir = Path(args.out_dir) if args.out_dir else Path(scratch) / Path(args.run.rstrip("/")).name
        built = build(args.run, out_dir, overwrite=args.overwrite, hub_repo=args.hub, license=args.license)
        timm_line = "timm loads it as it is" if built.stock else "BlurPool: not a timm network (dali-imagenet loads it)"
        print(f"published {built.run.name} ({built.weights} weights; {timm_line}) to {built.folder}")
        for name, size in built.sizes():
            print(f"  {size:>12,} B  {name}")
        message = f"{built.run.name}: {built.weights} weights, step {built.run.ended.get('step', '?')}"
        if args.hub:
            pushed = hub.push(built.folder, args.hub, private=args.private, message=message)
            print(f"uploaded: {pushed.url} (commit {pushed.commit}; load it as hf://{args.hub}@{pushed.commit})")
        if args.space:
            folder = hub.space_folder(
                Path(scratch) / "space",
                built.folder,
                HERE / "app.py",
                title=args.space.split("/")[1],
                model_repo=args.hub,
            )
            pushed = hub.push(folder, args.space, kind="space", message=message, space_sdk="gradio")
            print(f"space: {pushed.url} (commit {pushed.commit})")


if __name__ == "__main__":
    with one_line_errors():
        main()
