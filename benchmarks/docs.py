"""The measured numbers in README.md and docs/*.md, written from the benchmarks' result files.

    python -m benchmarks.docs            # rewrite every generated block from docs/results/
    python -m benchmarks.docs --check    # exit 1 naming each block that differs (the tests run this)

A block is `<!-- generated: KIND [FILE] -->` ... `<!-- end -->`; KIND is `status` (the README's
status table), `s3` (`benchmarks.s3`'s table of FILE), `accuracy` (`benchmarks.accuracy`'s) or `serve`
(`benchmarks.serve`'s). A
new measurement is a new result file (the benchmark's `--out`), copied into docs/results/, then
this command: no number in those tables is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: (\w+)(?: ([\w.-]+))? -->\n)(.*?)(<!-- end -->)", re.S)
S3_LATENCY_MS = 10  # the status row's latency: a real bucket's time to the first byte is ~10-20 ms
STATUS_TRANSFER = ("imagenette-cpu", "imagenette-finetune")  # the status row's runs: scratch, fine-tuned


def results(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]


def when(records: list[dict]) -> str:
    """The measurement's date and commit, from the records' environment (`run.logger.machine`)."""
    env = max((r.get("env") or {} for r in records), key=lambda e: e.get("time") or "")
    return f"{(env.get('time') or 'date not recorded')[:10]}, commit {env.get('git_commit') or '?'}"


def status() -> str:
    s3_runs = results("s3.jsonl")
    at = [r for r in s3_runs if r["latency_ms"] == S3_LATENCY_MS]
    staged, streamed = (next(r for r in at if r["name"].startswith(kind)) for kind in ("staged", "streamed"))
    transfer = {r["config"]: r for r in results("transfer.jsonl")}
    scratch, finetuned = (transfer[name] for name in STATUS_TRANSFER)
    rows = [
        ("the product's paths: conversion, loaders, exact resume, spot notice → exit 75 → relaunch, S3 on every "
         "exit, pages in a browser", "CPU, 2 cores, every commit", "`make test` passes",
         "[contributing](docs/contributing.md#tests)"),
        (f"data read from a local disk vs streamed from S3, {S3_LATENCY_MS} ms to the first byte",
         f"CPU, 2 cores ({when(s3_runs)})",
         f"staged {staged['images_per_s']:,.0f} img/s; streamed {streamed['images_per_s']:,.0f} img/s "
         f"({streamed['images_per_s'] / staged['images_per_s']:.2f}x), {streamed['gets_per_sample']:.1f} GETs a "
         f"sample each epoch", "[`s3.jsonl`](docs/results/s3.jsonl)"),
        ("accuracy on real photos: Imagenette, 5 classes, 8-minute budget",
         f"CPU, 2 cores ({when(list(transfer.values()))})",
         f"ResNet-18 {scratch['top1']:.2f} % top-1 from scratch, {finetuned['top1']:.2f} % fine-tuned",
         "[`transfer.jsonl`](docs/results/transfer.jsonl)"),
        ("the GPU path (DALI `mixed` decode, bf16, CUDA graphs, NCCL)", "H100 / H200",
         "not run since it was rebuilt", "[the GPU check](docs/contributing.md#the-gpu-check-benchmarksgpu_checksh)"),
        ("76.8 % in ≤ 16 h on one L4 (`configs/l4-16h.yaml`)", "L4 (g6.xlarge)", "not yet run",
         "[budget configs](docs/benchmarks.md#budget-configs-for-imagenet-on-one-l4)"),
    ]
    return "\n".join(["| what | where | result | source |", "| --- | --- | --- | --- |",
                      *(f"| {' | '.join(row)} |" for row in rows)])


def render(kind: str, name: str | None) -> str:
    if kind == "status":
        return status()
    if kind == "s3":
        from benchmarks.s3 import table

        return table(results(name))
    if kind == "accuracy":
        from benchmarks.accuracy import markdown_table

        return markdown_table(results(name))
    if kind == "serve":
        from benchmarks.serve import table

        return table(results(name))
    raise ValueError(f"unknown generated block {kind!r}")


def rewritten(text: str) -> str:
    return BLOCK.sub(lambda m: f"{m.group(1)}{render(m.group(2), m.group(3))}\n{m.group(5)}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which blocks differ (exit 1 if any)")
    args = parser.parse_args()
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = rewritten(text)
        if new != text:
            stale.append(str(page.relative_to(REPO)))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        sys.exit(f"generated tables differ from docs/results/ in {', '.join(stale)}: run python -m benchmarks.docs")
    print(("stale: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))


if __name__ == "__main__":
    main()
