"""Share what a run trained: a folder timm loads as it is, on the Hugging Face Hub, and a Space.

    python publish.py runs/r50 published/r50                        # the folder
    python publish.py runs/r50 published/r50 --hub USER/NAME        # ... uploaded as one commit
    python publish.py s3://bucket/runs/r50 --hub USER/NAME --space USER/NAME-demo

The folder: model.safetensors (the weights the run's page calls best: raw or EMA), config.json in
timm's format (the run's classes and validation preprocessing), README.md (the model card),
curves.png and the run's report.html. `timm.create_model("local-dir:FOLDER", pretrained=True)` or
`"hf-hub:USER/NAME"` loads a model timm builds as it is; a BlurPool ResNet (not timm's network) is
said so in the card and loads through predict.py, app.py, evaluate.py and train.py --init, which
all take `--checkpoint FOLDER` or `hf://USER/NAME[@REVISION]`; `import dali_imagenet` also
registers them in timm (`resnet50_ffcvblur`, ...), after which timm loads them in one line.
Publishing again adds a commit: every earlier one stays loadable as hf://USER/NAME@COMMIT. The
token: HF_TOKEN or `hf auth login`.

Who sees it: a new repo gets its namespace's default (public for a user; an organisation may make
its repos private by default) unless --private; the Space is private whenever the model is (it
then holds the weights), and a public model's Space loads hf://USER/NAME@COMMIT, no copy. Nothing
of this machine is published: no path, no bucket, no host name; the data is named by --data-name
or the dataset the shards were converted from (e.g. ILSVRC/imagenet-1k).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dali_imagenet.errors import UsageError, one_line_errors
from dali_imagenet.sharing import hub
from dali_imagenet.sharing.folder import build, check_destination
from dali_imagenet.sharing.model_card import check_license
from dali_imagenet.sharing.space import EXAMPLE_SUFFIXES, space_folder

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run", help="a run folder or its s3://bucket/prefix")
    parser.add_argument("out_dir", nargs="?", help="the folder to write (default: a temporary one, with --hub/--space)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR when it holds files")
    parser.add_argument("--hub", metavar="USER/NAME", help="upload the folder to this model repo")
    parser.add_argument("--private", action="store_true",
                        help="the model repo and the Space private (default: the namespace's default, public for a "
                             "user); an existing public repo is refused")
    parser.add_argument("--make-private", action="store_true",
                        help="--private, and make an existing public repo private")
    parser.add_argument("--space", metavar="USER/NAME", help="create or update a Gradio Space serving the demo on it")
    parser.add_argument("--license", default="apache-2.0", help="the card's licence, one of the Hub's identifiers "
                                                                 "(default apache-2.0)")
    parser.add_argument("--data-name", help="the training data as the card names it, e.g. ILSVRC/imagenet-1k (default: "
                                            "the dataset the shards were converted from, when their manifest says)")
    parser.add_argument("--examples", nargs="+", metavar="IMAGE", help="with --space: its example photos (default: a "
                        "public-domain photo, or drawings of the bundled sample's classes for a model of them)")
    args = parser.parse_args()
    if not (args.out_dir or args.hub or args.space):
        raise UsageError("give OUT_DIR, --hub USER/NAME or --space USER/NAME (or several)")
    check_license(args.license)
    private = args.private or args.make_private
    if private and not (args.hub or args.space):
        raise UsageError(f"{'--private' if args.private else '--make-private'} is about a Hub repo: give --hub "
                         f"USER/NAME or --space USER/NAME (a local folder is as private as its disk)")
    for flag, repo in (("--hub", args.hub), ("--space", args.space)):
        if repo is not None and (repo.count("/") != 1 or not all(repo.split("/"))):
            raise UsageError(f"{flag} {repo}: a Hub repo is USER/NAME")
    if args.out_dir:  # before the Hub is asked or anything is built
        check_destination(args.run, Path(args.out_dir), overwrite=args.overwrite)
    examples = [Path(p) for p in args.examples or []]
    for path in examples:
        if not path.is_file() or path.suffix.lower() not in EXAMPLE_SUFFIXES:
            raise UsageError(f"--examples {path}: not a {'/'.join(EXAMPLE_SUFFIXES)} file")

    api = hub.connect() if args.hub or args.space else None
    for repo, kind in ((args.hub, "model"), (args.space, "space")):  # before anything is built: public stays public
        if repo and private:
            hub.check_private(repo, hub.visibility(api, repo, kind), make_private=args.make_private,
                              why="--private would not make it private")
    with tempfile.TemporaryDirectory(prefix="publish-") as scratch:
        out_dir = Path(args.out_dir) if args.out_dir else Path(scratch) / Path(args.run.rstrip("/")).name
        built = build(args.run, out_dir, overwrite=args.overwrite, hub_repo=args.hub, license=args.license,
                      data_name=args.data_name)
        timm_line = ("timm loads it as it is" if built.stock else
                     "BlurPool: timm loads it once dali_imagenet is imported, which registers its network")
        print(f"published {built.run.name} ({built.weights} weights; {timm_line}) to {built.folder}")
        for name, size in built.sizes():
            print(f"  {size:>12,} B  {name}")
        message = f"{built.run.name}: {built.weights} weights, step {built.run.ended.get('step', '?')}"
        model_private = private
        if args.hub:
            pushed = hub.push(api, built.folder, args.hub, private=private, make_private=args.make_private,
                              message=message)
            model_private = pushed.private
            print(f"uploaded: {pushed.url} ({seen(pushed)}; commit {pushed.commit}; load it as "
                  f"hf://{args.hub}@{pushed.commit})")
        if args.space:
            source = f"hf://{args.hub}@{pushed.commit}" if args.hub and not model_private else None
            folder = space_folder(Path(scratch) / "space", built.folder, HERE / "app.py",
                                  title=args.space.split("/")[1], model_repo=args.hub, model_source=source,
                                  examples=examples or default_examples(built, Path(scratch) / "examples"))
            space = hub.push(api, folder, args.space, kind="space", private=model_private,
                             make_private=args.make_private, message=message, space_sdk="gradio", replace=True)
            print(f"space: {space.url} ({seen(space)}; commit {space.commit}; "
                  f"{'loads ' + source if source else 'holds the weights'})")


def seen(pushed: hub.Pushed) -> str:
    return ("private" if pushed.private else "public") + (f": {pushed.note}" if pushed.note else "")


def default_examples(built, folder: Path) -> list[Path]:
    """Drawings of the bundled sample's classes for a model of them; else a public-domain photo
    that ships with matplotlib (Grace Hopper, US Navy)."""
    from app import sample_images
    from shard_tools.sample import CLASSES

    if built.class_names == [name for name, *_ in CLASSES]:  # a model of the bundled sample
        return sample_images(folder)
    import matplotlib

    return [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


if __name__ == "__main__":
    with one_line_errors():
        main()
