"""A run's page, several runs' curves side by side, or an index of runs: self-contained HTML
(plots and images embedded, nothing fetched when it is viewed).

    python report.py runs/r50                        # the run's page: runs/r50/report.html
    python report.py runs/r50 runs/r50-ema -o compare.html
    python report.py runs/                           # an index of the runs in runs/: runs/index.html
    python report.py s3://my-bucket/runs/ --s3 s3://my-bucket/runs/   # an index of the runs under a prefix, put
                                                     # back as its index.html (text/html: an S3 static website)
    python report.py --checkpoint hf://USER/NAME     # the page a published model was published with
    python report.py --checkpoint runs/r50/best.pt   # the page of the run a checkpoint belongs to

A run's page: the curves, the final numbers, per-class accuracy, the most confused classes, example
val images with Grad-CAM heat maps, the machine and the config. train.py writes RUN/report.html at
the end of every run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.errors import UsageError, one_line_errors
from dali_imagenet.report.html_report import write_page, write_report
from dali_imagenet.report.run_index import render_index, runs_in
from dali_imagenet.run.run_folder import METRICS, REPORT


def is_index(sources: list[str]) -> bool:
    """One source that is an s3:// prefix, or a folder that holds run folders but is none itself."""
    if len(sources) != 1:
        return False
    source = sources[0]
    return s3.is_s3(source) or (Path(source).is_dir() and not (Path(source) / METRICS).is_file()
                                and any((p / METRICS).is_file() for p in Path(source).iterdir()))


def page_of(checkpoint: str, output: str | None) -> Path:
    """The run page behind a checkpoint: its run folder's (written again), or a published model's."""
    from dali_imagenet.run import published

    if published.is_published(checkpoint):
        page = published.fetch(checkpoint, (REPORT,)) / REPORT
        if not page.is_file():
            raise UsageError(f"{checkpoint}: holds no {REPORT} (publish.py puts the run's page there)")
        return write_page(page.read_text(), output or REPORT)
    run = Path(checkpoint).parent
    if not (run / METRICS).is_file():
        raise UsageError(f"{checkpoint}: no {METRICS} beside it: not in a run folder")
    return write_report([run], output or run / REPORT)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("runs", nargs="*", help="run folders; or one folder of runs, or an s3://bucket/prefix/ of runs")
    parser.add_argument("--checkpoint", help="instead: a checkpoint (its run's page), a published folder or "
                                             "hf://USER/NAME[@REVISION] (the page published with it)")
    parser.add_argument("-o", "--output", help="the page (default: RUN/report.html for one run, FOLDER/index.html "
                                               "for a folder of runs, else report.html or index.html here)")
    parser.add_argument("--s3", help="also upload it as s3://bucket/prefix/index.html (text/html), a static site")
    args = parser.parse_args()
    if bool(args.runs) == bool(args.checkpoint):
        raise UsageError("give run folders (or one folder or prefix of runs), or --checkpoint SOURCE")
    if args.checkpoint:
        path = page_of(args.checkpoint, args.output)
    elif is_index(args.runs):
        source = args.runs[0]
        default = Path("index.html") if s3.is_s3(source) else Path(source) / "index.html"
        path = write_page(render_index(runs_in(source), source.rstrip("/") + "/"), args.output or default)
    else:
        default = Path(args.runs[0]) / REPORT if len(args.runs) == 1 else Path(REPORT)
        path = write_report(args.runs, args.output or default)
    print(f"page: {path.resolve()}  (open file://{path.resolve()})")
    if args.s3:
        print(f"uploaded: {s3.upload_page(path, args.s3)}")


if __name__ == "__main__":
    with one_line_errors():
        main()
