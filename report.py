"""One self-contained HTML page (plots embedded, no network needed to view it) from run folders.

    python report.py runs/r50 [runs/r50-ema ...] [-o report.html] [--s3 s3://bucket/prefix]

Train loss, LR, images/s and data wait against steps; val top-1/top-5/loss (raw and EMA)
against epochs; the config, the machine and the final numbers of each run. Several run folders:
their curves overlaid. train.py writes RUN/report.html at the end of every run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dali_imagenet.errors import one_line_errors
from dali_imagenet.html_report import write_report
from dali_imagenet.s3 import upload_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl and config.yaml)")
    parser.add_argument("-o", "--output", help="the page (default: RUN/report.html for one run, report.html for several)")
    parser.add_argument("--s3", help="also upload it as s3://bucket/prefix/index.html (text/html), a static site")
    args = parser.parse_args()
    output = Path(args.output or (Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else "report.html"))
    path = write_report(args.runs, output)
    print(f"report: {path.resolve()}  (open file://{path.resolve()})")
    if args.s3:
        print(f"uploaded: {upload_page(path, args.s3)}")


if __name__ == "__main__":
    with one_line_errors():
        main()
