"""The whole GPU product on one lent GPU, in a few minutes, from shards it makes there; one table.

    bash benchmarks/gpu_check.sh                     # on the GPU machine (DALI importable)
    python -m benchmarks.gpu_check --smoke --device cpu   # the CPU self-check of the same plumbing

1. DALI GPU train/val loaders: all cores; and pinned to 4 cores with 3 threads (a g6.xlarge),
   with the hardware JPEG decoder and with `hw_decoder_load=0` (nvJPEG's hybrid path, which an
   L4 may get)
2. the synthetic train step and the real loader -> step at 128/160/192/224 px, BlurPool on/off
3. eager vs torch.compile vs `cuda_graph`, at b128 on 4 cores and b256 on all cores
4. train.py with configs/g6-l4.yaml and configs/l4-16h.yaml for a few hundred steps, stopped
   mid-epoch and resumed with --resume auto: its weights against a straight run's, and its
   rate against the synthetic step's
5. `pytest -m gpu`
Each measurement runs in a process of its own. Sections that no longer fit `--budget-s` are
skipped with a line saying so. With $OUT set, the rows also go to $OUT/gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, machine, run_isolated

SIZES = (128, 160, 192, 224)


def missing(device: str) -> str | None:
    """What the check needs and does not have, in one line; None when all is there."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible to this Python (run it on the GPU machine, or --smoke --device cpu)"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return ("DALI is not importable (pip install nvidia-dali-cuda120==2.4.0, or on the lent machine: "
                "source .device/dali-device-unpack and PYTHONPATH=/tmp/site:$PWD)")
    return None


def four_cores() -> list[str]:
    """The `taskset` prefix that pins a command to 4 cores, as on a g6.xlarge (none if absent)."""
    return ["taskset", "-c", "0-3"] if shutil.which("taskset") and (os.cpu_count() or 1) > 4 else []


def make_shards(work: Path, smoke: bool) -> Path:
    from shard_tools.convert import Options, convert
    from shard_tools.sample import make_sample

    sample, shards = work / "sample", work / "shards"
    if not (shards / "manifest.json").is_file():
        make_sample(sample, *((4, 2) if smoke else (128, 32)))
        convert(sample, str(shards), ("train", "validation"), Options(shard_size=64), overwrite=True, progress=False,
                workers=os.cpu_count() or 1)
    return shards


class Check:
    """Rows of the table, a time budget, and the isolated processes that measure."""

    def __init__(self, device: str, smoke: bool, budget_s: float):
        self.device, self.smoke, self.deadline = device, smoke, time.monotonic() + budget_s
        self.rows: list[dict] = []

    def over_budget(self, section: str) -> bool:
        if time.monotonic() < self.deadline:
            return False
        self.rows.append({"section": section, "what": "skipped", "result": "out of time (--budget-s)"})
        return True

    def measure(self, section: str, what: str, module: str, args: list[str], prefix: list[str] = ()) -> dict | None:
        print(f"[{section}] {what}", flush=True)
        try:
            result = run_isolated(module, args, prefix=list(prefix))
        except RuntimeError as error:
            result = {"error": str(error).strip().splitlines()[-1][:200]}
        self.rows.append({"section": section, "what": what, **result})
        return result


def loaders(check: Check, shards: Path) -> None:
    batch, size = (8, 64) if check.smoke else (256, 224)
    timing = ["--warmup-batches", "1", "--batches", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-batches", "5", "--batches", "20", "--repeats", "3"]
    common = ["--data", str(shards), "--backend", "dali", "--device", check.device, "--batch-size", str(batch),
              "--image-size", str(size), *timing]
    for split in ("train",) if check.smoke else ("train", "validation"):  # --smoke: each section once
        check.measure("loader", f"DALI {split}, all {os.cpu_count()} cores", "benchmarks.loaders",
                      [*common, "--split", split, "--threads", str(min(os.cpu_count() or 1, 8))])
    for load in ((0.7, 0.0) if check.device == "cuda" else (0.7,)):
        cores = "4 cores" if four_cores() else f"all {os.cpu_count()} cores"
        check.measure("loader", f"DALI train, {cores}, 3 threads, hw_decoder_load={load}", "benchmarks.loaders",
                      [*common, "--split", "train", "--threads", "3", "--hw-decoder-load", str(load)], four_cores())


def steps(check: Check, shards: Path) -> None:
    arch, batch = ("resnet18", 4) if check.smoke else ("resnet50", 256)
    sizes = (32,) if check.smoke else SIZES
    timing = ["--warmup-steps", "1", "--steps", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-steps", "5", "--steps", "15", "--repeats", "3"]
    common = ["--arch", arch, "--device", check.device, "--dtype", "bfloat16", "--batch-size", str(batch), *timing]
    for size in sizes:
        for blurpool in (True,) if check.smoke else (True, False):
            flag = "--blurpool" if blurpool else "--no-blurpool"
            tag = f"{size} px, BlurPool {'on' if blurpool else 'off'}, b{batch}"
            check.measure("step", f"synthetic, {tag}", "benchmarks.steps",
                          ["synthetic", *common, "--image-size", str(size), flag])
            if check.over_budget("loader -> step"):
                return
            check.measure("loader -> step", f"DALI -> step, {tag}", "benchmarks.steps",
                          ["end-to-end", *common, "--image-size", str(size), flag, "--data", str(shards)])


def graphs(check: Check) -> None:
    arch, sizes = ("resnet18", (4, 8)) if check.smoke else ("resnet50", (128, 256))
    timing = ["--warmup-steps", "1", "--steps", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-steps", "8", "--steps", "20", "--repeats", "3"]
    pinned = four_cores()
    shapes = ((sizes[0], pinned, "4 cores" if pinned else f"all {os.cpu_count()} cores"),
              (sizes[1], [], f"all {os.cpu_count()} cores"))
    for batch, prefix, cores in shapes[:1] if check.smoke else shapes:
        for mode in ("eager", "compiled", "cuda_graph"):
            if check.over_budget("eager/compiled/graph"):
                return
            skip = ("needs a GPU" if mode == "cuda_graph" and check.device != "cuda" else
                    "not in --smoke (a compile takes a minute on a CPU)" if mode == "compiled" and check.smoke else None)
            if skip:
                check.rows.append({"section": "eager/compiled/graph", "what": f"{mode}, b{batch}, {cores}", "result": skip})
                continue
            flags = {"eager": [], "compiled": ["--compile"], "cuda_graph": ["--cuda-graph"]}[mode]
            check.measure("eager/compiled/graph", f"{mode}, b{batch}, {cores}", "benchmarks.steps",
                          ["synthetic", "--arch", arch, "--device", check.device, "--dtype", "bfloat16",
                           "--batch-size", str(batch), "--image-size", "224" if not check.smoke else "32",
                           "--blurpool", *flags, *timing], prefix)


def train_runs(check: Check, shards: Path, work: Path) -> None:
    """train.py straight vs stopped mid-epoch + --resume auto, per config; a few hundred steps."""
    small = ["arch=resnet18", "batch_size=8", "image_size=32", "min_image_size=0", "val_image_size=32",
             "compile=false", "loader_threads=2"] if check.smoke else ["val_every=0", "compile=false"]
    # g6-l4 as on a g6.xlarge (4 cores, 3 loader threads, b128), l4-16h on all cores (b256)
    configs = (("g6-l4", 8 if check.smoke else 240, four_cores()), ("l4-16h", 240, []))
    for config, steps, prefix in configs[:1] if check.smoke else configs:  # --smoke: the plumbing, once
        if check.over_budget("train.py"):
            return
        per_epoch = _steps_per_epoch(shards, 8 if check.smoke else (128 if config == "g6-l4" else 256))
        epochs = max(1, -(-steps // per_epoch))
        sets = [*small, f"epochs={epochs}", "deterministic=true", "log_every=10", "warmup_epochs=1",
                *(["min_image_size=160", f"ramp_start_epoch={epochs // 2}", f"ramp_end_epoch={epochs // 2 + 1}"]
                  if config == "l4-16h" and not check.smoke else [])]
        stop_at = per_epoch * (epochs // 2) + per_epoch // 2  # mid-epoch, after the size change
        print(f"[train.py] {config}: {epochs} epochs x {per_epoch} steps, stop at {stop_at}", flush=True)
        runs = {}
        for name, extra_sets, extra in (("straight", [], []), ("split", [f"max_steps={stop_at}"], []),
                                        ("resumed", [], ["--resume", "auto"])):
            out = work / f"train-{config}-{'split' if name == 'resumed' else name}"
            if name != "resumed":
                shutil.rmtree(out, ignore_errors=True)
            args = [sys.executable, str(REPO / "train.py"), "--dali", "--data", str(shards), "--out", str(out),
                    "--config", str(REPO / "configs" / f"{config}.yaml"), "--device", check.device, "--no-wandb", "--spot", "off",
                    *[f"--set={item}" for item in [*sets, *extra_sets]], *extra]
            started = time.monotonic()
            result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=600)
            runs[name] = (result, time.monotonic() - started, out)
            if result.returncode != 0:
                check.rows.append({"section": "train.py", "what": f"{config} {name}", "result": "failed",
                                   "error": result.stderr.strip().splitlines()[-1][:200] if result.stderr else ""})
                break
        else:
            check.rows.append({"section": "train.py", "what": f"{config}: straight vs stopped at {stop_at} + resume",
                               **_compare(runs["straight"][2], runs["split"][2]),
                               "images_per_s": _median_rate(runs["straight"][2])})


def _steps_per_epoch(shards: Path, batch: int) -> int:
    return json.loads((shards / "manifest.json").read_text())["splits"]["train"]["samples"] // batch


def _compare(a: Path, b: Path) -> dict:
    first = torch.load(a / "final_weights.pt", weights_only=True)
    second = torch.load(b / "final_weights.pt", weights_only=True)
    diff = max((first[k].float() - second[k].float()).abs().max().item() for k in first if first[k].is_floating_point())
    return {"result": "identical weights" if diff == 0 else f"max |difference| {diff:.3g}", "max_abs_diff": diff}


def _median_rate(run_dir: Path) -> float | None:
    rates = sorted(r["images_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "images_per_s" in (r := json.loads(line)))
    return rates[len(rates) // 2] if rates else None


def gpu_tests(check: Check) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-200:]
    check.rows.append({"section": "pytest -m gpu", "what": "the GPU tests", "result": last})


def table(check: Check, card: str) -> str:
    lines = [f"gpu_check on {card}", "", "| section | what | img/s (min-max) | notes |", "| --- | --- | ---: | --- |"]
    for row in check.rows:
        rate = (f"{row['images_per_s']:,.0f} ({row['images_per_s_min']:,.0f}-{row['images_per_s_max']:,.0f})"
                if "images_per_s_min" in row else (f"{row['images_per_s']:,.0f}" if row.get("images_per_s") else ""))
        notes = row.get("error") or row.get("result") or (f"data wait {row['data_wait']:.0%}" if "data_wait" in row
                                                          else (f"warm-up {row['warmup_s']:.0f} s" if "warmup_s" in row else ""))
        lines.append(f"| {row['section']} | {row['what']} | {rate} | {notes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing (runs on a CPU)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip what no longer fits (seconds)")
    parser.add_argument("--work", default=None, help="where the shards and runs go (default: a temporary folder)")
    args = parser.parse_args()
    why = missing(args.device)
    if why:
        sys.exit(f"gpu_check: {why}")
    work = Path(args.work or os.environ.get("OUT") or "build/gpu-check")
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args.device, args.smoke, args.budget_s)
    info = machine()
    card = info["gpu"] or f"CPU ({info['cpu_count']} cores)"
    print(f"device: {card}; torch {info['torch']}; DALI {info['nvidia-dali-cuda120']}", flush=True)
    shards = make_shards(work, args.smoke)
    loaders(check, shards)
    if not check.over_budget("step"):
        steps(check, shards)
    if not check.over_budget("eager/compiled/graph"):
        graphs(check)
    train_runs(check, shards, work)
    if args.device == "cuda" and not check.over_budget("pytest -m gpu"):
        gpu_tests(check)
    text = table(check, card)
    print("\n" + text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps({"machine": info, "rows": check.rows}, indent=1))
        Path(out, "gpu_check.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
