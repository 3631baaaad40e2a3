"""The whole GPU product on one lent GPU, in at most 8 minutes, from shards it makes there; one table.

    bash benchmarks/gpu_check.sh                          # on the GPU machine (DALI importable)
    python -m benchmarks.gpu_check --smoke --device cpu   # the CPU self-check of the same plumbing

Sections, most important first; each row says its seconds, and a section that would no longer fit
`--budget-s` is skipped with a row saying so:
1. train.py with configs/l4-16h.yaml as people launch it (compile on, the 160 -> 192 px ramp,
   batch 256): per size the first step's seconds (the compile), steps/s after it and peak GPU
   memory; stopped mid-epoch and resumed with --resume auto, judged against the straight run by
   `resume_verdict` (exact where the run is deterministic eager; a stated bound otherwise)
2. the same ramp with `cuda_graph: true`: peak memory per size, and whether it fits an L4
3. `pytest -m gpu`
4. DALI GPU loaders: all cores, and 4 cores with 3 threads (a g6.xlarge) with the hardware JPEG
   decoder and with `hw_decoder_load=0` (nvJPEG's hybrid path, which an L4 may get)
5. the synthetic step and the real loader -> step at the ramp's sizes
6. eager vs `cuda_graph` at b128 on 4 cores and b256 on all cores
$OUT (the results folder a lent machine sends back) gets only gpu_check.json, gpu_check.md and
gpu_check.log; shards and runs go to --work (default: a new folder under /tmp), removed at the end
unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, machine, run_isolated

L4_MEMORY_GIB = 22.0  # an L4's 24 GB, less the CUDA context and headroom
LOSS_WINDOWS = 3  # log windows after the resume point whose losses are compared
LOSS_RTOL = 2e-2  # their relative difference allowed where kernels are not bitwise reproducible
# Section -> seconds it takes on an H100/H200 (measured there or estimated), to skip what would not fit.
ESTIMATE_S = {"train.py": 240, "cuda_graph memory": 70, "pytest -m gpu": 40, "loader": 40, "step": 80,
              "eager/graph": 60}


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


def resume_verdict(straight: list[float], resumed: list[float], max_abs_diff: float, exact: bool) -> dict:
    """Straight vs stopped + resumed, as a number and the tolerance it is judged by.

    `straight` / `resumed`: the runs' window losses from the resume point on (the same steps);
    `max_abs_diff`: the largest difference of their final weights. A deterministic eager run must
    give identical weights: any difference is a bug. Compiled kernels (Triton's, and cuDNN's
    autotuned algorithms with `deterministic: false`) are not bitwise reproducible, so weights drift
    by round-off from the first step on; what a wrong resume breaks (the batch order, the LR, the
    momentum, the EMA) changes the loss of the very first windows by far more than round-off does:
    their losses must agree within LOSS_RTOL."""
    if exact:
        ok = max_abs_diff == 0
        return {"result": "identical weights" if ok else f"weights differ by {max_abs_diff:.3g}", "passed": ok,
                "difference": max_abs_diff, "tolerance": 0.0,
                "judged_by": "final weights, exactly (deterministic eager)"}
    pairs = list(zip(straight, resumed))[:LOSS_WINDOWS]
    if not pairs:
        return {"result": "no loss windows after the resume point to compare", "passed": False, "difference": None,
                "tolerance": LOSS_RTOL, "judged_by": "loss windows after the resume"}
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    ok = worst <= LOSS_RTOL
    return {"result": f"losses within {worst:.2%} (bound {LOSS_RTOL:.0%}){'' if ok else ': FAILED'}", "passed": ok,
            "difference": worst, "tolerance": LOSS_RTOL, "weights_max_abs_diff": max_abs_diff,
            "judged_by": f"the first {len(pairs)} loss windows after the resume, relative (compiled kernels are "
                         f"not bitwise reproducible)"}


class Check:
    """Rows of the table, a time budget, a log, and the isolated processes that measure."""

    def __init__(self, device: str, smoke: bool, budget_s: float, log: Path | None, skip: tuple[str, ...] = ()):
        self.device, self.smoke, self.skip = device, smoke, set(skip)
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.rows: list[dict] = []
        self.log = open(log, "a") if log else None

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def fits(self, section: str, also: tuple[str, ...] = ()) -> bool:
        """Whether `section` is asked for and still fits the budget (on a CPU, --smoke: only the
        deadline counts); if not, a row says why (for `also`, the sections it brings, too)."""
        if section in self.skip:
            for name in (section, *also):
                self.rows.append({"section": name, "what": "skipped", "seconds": 0, "result": "not asked for (--skip)"})
            self.say(f"[{section}] skipped: --skip")
            return False
        left = self.deadline - time.monotonic()
        need = 0 if self.smoke else ESTIMATE_S.get(section, 0)
        if left > need:
            return True
        self.rows.append({"section": section, "what": "skipped", "seconds": 0,
                          "result": f"would not fit --budget-s: {max(left, 0):.0f} s left, it takes ~{need} s"})
        self.say(f"[{section}] skipped: {max(left, 0):.0f} s left of the budget")
        return False

    def measure(self, section: str, what: str, module: str, args: list[str], prefix: list[str] = ()) -> dict:
        self.say(f"[{section}] {what}")
        started = time.monotonic()
        try:
            result = run_isolated(module, args, prefix=list(prefix))
        except RuntimeError as error:
            self.say(str(error)[-2000:])
            result = {"error": str(error).strip().splitlines()[-1][:200]}
        self.rows.append({"section": section, "what": what, **result, "seconds": time.monotonic() - started})
        return result

    def run(self, section: str, what: str, command: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
        """A command whose output goes to the log (a train.py run)."""
        self.say(f"[{section}] {what}")
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        if self.log:
            self.log.write(result.stdout[-20000:] + result.stderr[-20000:])
        return result


def make_shards(work: Path, smoke: bool) -> Path:
    """The bundled sample generator's photos-like JPEGs (~500x375, ~100 KB), sharded; the train
    shards listed 4 times over (copies under new names), so a batch of 256 has 8 steps an epoch."""
    from shard_tools.convert import Options, convert
    from shard_tools.sample import make_sample

    sample, shards = work / "sample", work / "shards"
    make_sample(sample, *((4, 2) if smoke else (64, 32)))
    convert(sample, str(shards), ("train", "validation"), Options(shard_size=64), overwrite=True, progress=False,
            workers=os.cpu_count() or 1)
    if not smoke:
        manifest = json.loads((shards / "manifest.json").read_text())
        train = manifest["splits"]["train"]
        copies = []
        for copy in range(1, 4):
            for entry in train["shards"]:
                name = entry["name"].replace(".tar", f"-copy{copy}.tar")
                shutil.copy(shards / entry["name"], shards / name)
                shutil.copy(shards / entry["name"].replace(".tar", ".idx"), shards / name.replace(".tar", ".idx"))
                copies.append({**entry, "name": name})
        train["shards"] += copies
        train["samples"] *= 4
        (shards / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return shards


def train_py(check: Check, shards: Path, config: str, sets: list[str], out: Path,
             extra: list[str] = ()) -> tuple[subprocess.CompletedProcess, list[dict]]:
    command = [sys.executable, str(REPO / "train.py"), "--dali", "--data", str(shards), "--out", str(out), "--config",
               str(REPO / "configs" / f"{config}.yaml"), "--device", check.device, "--no-wandb", "--spot", "off",
               *[f"--set={item}" for item in sets], *extra]
    result = check.run("train.py", f"{out.name}: {' '.join(sets[-3:])} {' '.join(extra)}", command)
    records = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
               if (out / "metrics.jsonl").exists() else [])
    return result, records


def per_size(records: list[dict], batch: int) -> list[dict]:
    """One row per epoch of a run: its size, the first step's seconds, steps/s after it, peak memory."""
    rows = []
    for r in (r for r in records if "first_step_s" in r):
        warm = r.get("warm_images_per_s")
        rows.append(
            {
                "epoch": r["epoch"],
                "image_size": r["image_size"],
                "first_step_s": r["first_step_s"],
                "steps_per_s": warm / batch if warm else None,
                "images_per_s": warm,
                "peak_gpu_mem_gb": r.get("peak_gpu_mem_gb"),
                "peak_gpu_reserved_gb": r.get("peak_gpu_reserved_gb"),
            }
        )
    return rows


def window_losses(records: list[dict], after_step: int) -> list[float]:
    return [r["loss"] for r in records if "loss" in r and r["step"] > after_step]


def production_config(check: Check, shards: Path, work: Path) -> None:
    """l4-16h as it runs: straight, and stopped mid-epoch after the size change + --resume auto."""
    section = "train.py"
    if not check.fits(section):
        return
    started = time.monotonic()
    batch, log_every = (8, 2) if check.smoke else (256, 4)
    per_epoch = _steps_per_epoch(shards, batch)
    epochs = 3  # epoch 1 at the ramp's first size, 2 and 3 at its last: two compiles, and a warm epoch
    # --smoke on a CPU: a small model and sizes, compile off (a CPU compile takes minutes), deterministic
    sets = (["arch=resnet10", "width=16", f"batch_size={batch}", "min_image_size=32", "image_size=48",
             "image_size_step=16", "val_image_size=32", "compile=false", "deterministic=true", "loader_threads=2"]
            if check.smoke else [])
    sets += [f"epochs={epochs}", "ramp_start_epoch=0", "ramp_end_epoch=1", "warmup_epochs=1", f"log_every={log_every}",
             "val_every=0"]
    stop_at = per_epoch + per_epoch // 2 // log_every * log_every  # mid epoch 2, after the size change
    exact = check.smoke  # deterministic eager only in --smoke; the GPU run compiles, as people run it
    runs = {}
    for name, extra_sets, extra in (("straight", [], []), ("split", [f"max_steps={stop_at}"], []),
                                    ("resumed", [], ["--resume", "auto"])):
        out = work / f"l4-16h-{'split' if name == 'resumed' else name}"
        result, records = train_py(check, shards, "l4-16h", [*sets, *extra_sets], out, extra)
        runs[name] = (result, records, out)
        if result.returncode != 0:
            check.rows.append(
                {
                    "section": section,
                    "what": f"l4-16h {name}",
                    "result": f"failed (exit {result.returncode})",
                    "error": (result.stderr.strip().splitlines() or [""])[-1][:200],
                    "seconds": time.monotonic() - started,
                }
            )
            return
    size_before = None
    first_step_is = " (a new size)" if check.smoke else " (a new size: compiles)"  # --smoke runs eager
    for row in per_size(runs["straight"][1], batch):
        new_size = row["image_size"] != size_before
        size_before = row["image_size"]
        memory = f", peak {row['peak_gpu_mem_gb']:.1f} GiB" if row["peak_gpu_mem_gb"] is not None else ""
        check.rows.append(
            {
                "section": section,
                "what": f"l4-16h straight, epoch {row['epoch']} at {row['image_size']} px",
                **row,
                "new_size": new_size,
                "result": f"first step {row['first_step_s']:.1f} s{first_step_is if new_size else ''}, "
                f"then {row['steps_per_s'] or 0:.2f} steps/s{memory}",
            }
        )
    resumed_first = per_size(runs["resumed"][1], batch)
    if resumed_first:
        check.rows.append(
            {
                "section": section,
                "what": "l4-16h resumed: its first step" + ("" if check.smoke else " (recompile, warm cache)"),
                "first_step_s": resumed_first[0]["first_step_s"],
                "result": f"first step {resumed_first[0]['first_step_s']:.1f} s",
            }
        )
    verdict = resume_verdict(window_losses(runs["straight"][1], stop_at), window_losses(runs["resumed"][1], stop_at),
                             _max_abs_diff(runs["straight"][2], runs["split"][2]), exact)
    check.rows.append({"section": section, "what": f"l4-16h: straight vs stopped at step {stop_at} + resume",
                       **verdict, "seconds": time.monotonic() - started})


def graph_memory(check: Check, shards: Path, work: Path) -> None:
    """The ramp with cuda_graph on, at the L4 config's batch: each size's graph keeps a memory pool;
    the trainer drops a finished size's graph, so the peak is the largest size's."""
    section = "cuda_graph memory"
    if check.device != "cuda":
        check.rows.append(
            {"section": section, "what": "l4-16h ramp, cuda_graph", "result": "needs a GPU", "seconds": 0}
        )
        return
    if not check.fits(section):
        return
    started = time.monotonic()
    sets = ["epochs=2", "ramp_start_epoch=0", "ramp_end_epoch=1", "val_every=0", "cuda_graph=true",
            "compile=false", "log_every=4"]  # eager capture: the graphs' pools are the question, not a compile
    result, records = train_py(check, shards, "l4-16h", sets, work / "l4-16h-graph")
    if result.returncode != 0:
        check.rows.append({"section": section, "what": "l4-16h ramp, cuda_graph", "result": "failed",
                           "error": (result.stderr.strip().splitlines() or [""])[-1][:200],
                           "seconds": time.monotonic() - started})
        return
    sizes = per_size(records, 256)
    peak = max((r["peak_gpu_reserved_gb"] or r["peak_gpu_mem_gb"] or 0) for r in sizes) if sizes else 0
    for row in sizes:
        check.rows.append({"section": section, "what": f"cuda_graph, {row['image_size']} px, b256", **row,
                           "result": f"peak {row['peak_gpu_mem_gb']:.1f} GiB allocated, "
                                     f"{row['peak_gpu_reserved_gb']:.1f} GiB reserved"})
    check.rows.append(
        {
            "section": section,
            "what": f"fits an L4 ({L4_MEMORY_GIB:g} GiB usable)?",
            "peak_gpu_reserved_gb": peak,
            "fits_l4": peak <= L4_MEMORY_GIB,
            "result": f"{'yes' if peak <= L4_MEMORY_GIB else 'NO'}: peak {peak:.1f} GiB reserved over the ramp",
            "seconds": time.monotonic() - started,
        }
    )


def loaders(check: Check, shards: Path) -> None:
    if not check.fits("loader"):
        return
    batch, size = (8, 64) if check.smoke else (256, 224)
    timing = ["--warmup-batches", "1", "--batches", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-batches", "5", "--batches", "20", "--repeats", "3"]
    common = ["--data", str(shards), "--backend", "dali", "--device", check.device, "--batch-size", str(batch),
              "--image-size", str(size), *timing]
    check.measure("loader", f"DALI train, all {os.cpu_count()} cores", "benchmarks.loaders",
                  [*common, "--split", "train", "--threads", str(min(os.cpu_count() or 1, 8))])
    if check.device != "cuda":  # on a CPU, hw_decoder_load changes nothing: the row above says it all
        check.rows.append({"section": "loader", "what": "DALI train, 4 cores, hw_decoder_load=0.7 and 0",
                           "result": "needs a GPU", "seconds": 0})
        return
    for load in (0.7, 0.0):
        cores = "4 cores" if four_cores() else f"all {os.cpu_count()} cores"
        check.measure("loader", f"DALI train, {cores}, 3 threads, hw_decoder_load={load}", "benchmarks.loaders",
                      [*common, "--split", "train", "--threads", "3", "--hw-decoder-load", str(load)], four_cores())


def steps(check: Check, shards: Path) -> None:
    if not check.fits("step", also=("loader -> step",)):
        return
    arch, batch = ("resnet18", 4) if check.smoke else ("resnet50", 256)
    sizes = (32,) if check.smoke else (160, 192, 224)
    timing = ["--warmup-steps", "1", "--steps", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-steps", "5", "--steps", "15", "--repeats", "3"]
    common = ["--arch", arch, "--device", check.device, "--dtype", "bfloat16", "--batch-size", str(batch), "--blurpool",
              *timing]
    for size in sizes:
        check.measure("step", f"synthetic, {size} px, BlurPool, b{batch}", "benchmarks.steps",
                      ["synthetic", *common, "--image-size", str(size)])
        if size in ((32,) if check.smoke else (160, 192)):
            check.measure("loader -> step", f"DALI -> step, {size} px, BlurPool, b{batch}", "benchmarks.steps",
                          ["end-to-end", *common, "--image-size", str(size), "--data", str(shards)])


def graphs(check: Check) -> None:
    if not check.fits("eager/graph"):
        return
    arch, sizes = ("resnet18", (4, 8)) if check.smoke else ("resnet50", (128, 256))
    timing = ["--warmup-steps", "1", "--steps", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-steps", "8", "--steps", "20", "--repeats", "3"]
    pinned = four_cores()
    shapes = ((sizes[0], pinned, "4 cores" if pinned else f"all {os.cpu_count()} cores"),
              (sizes[1], [], f"all {os.cpu_count()} cores"))
    for batch, prefix, cores in shapes[:1] if check.smoke else shapes:
        for mode in ("eager", "cuda_graph"):
            if check.smoke and mode == "eager":  # at --smoke sizes the step section's synthetic row is this one
                check.rows.append({"section": "eager/graph", "what": f"{mode}, b{batch}, {cores}", "seconds": 0,
                                   "result": "--smoke: the step section's synthetic row (the same step)"})
                continue
            if mode == "cuda_graph" and check.device != "cuda":
                check.rows.append({"section": "eager/graph", "what": f"{mode}, b{batch}, {cores}",
                                   "result": "needs a GPU", "seconds": 0})
                continue
            check.measure("eager/graph", f"{mode}, b{batch}, {cores}", "benchmarks.steps",
                          ["synthetic", "--arch", arch, "--device", check.device, "--dtype", "bfloat16",
                           "--batch-size", str(batch), "--image-size", "224" if not check.smoke else "32",
                           "--blurpool", *(["--cuda-graph"] if mode == "cuda_graph" else []), *timing], prefix)


def gpu_tests(check: Check) -> None:
    if check.device != "cuda":
        check.rows.append({"section": "pytest -m gpu", "what": "the GPU tests", "result": "needs a GPU", "seconds": 0})
        return
    if not check.fits("pytest -m gpu"):
        return
    started = time.monotonic()
    result = check.run("pytest -m gpu", "the GPU tests",
                       [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"])
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-200:]
    check.rows.append({"section": "pytest -m gpu", "what": "the GPU tests", "result": last,
                       "seconds": time.monotonic() - started})


def _steps_per_epoch(shards: Path, batch: int) -> int:
    return json.loads((shards / "manifest.json").read_text())["splits"]["train"]["samples"] // batch


def _max_abs_diff(a: Path, b: Path) -> float:
    first = torch.load(a / "final_weights.pt", weights_only=True)
    second = torch.load(b / "final_weights.pt", weights_only=True)
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first if first[k].is_floating_point())


def table(check: Check, card: str) -> str:
    lines = [f"gpu_check on {card}", "", "| section | what | img/s (min-max) | s | notes |",
             "| --- | --- | ---: | ---: | --- |"]
    for row in check.rows:
        rate = (f"{row['images_per_s']:,.0f} ({row['images_per_s_min']:,.0f}-{row['images_per_s_max']:,.0f})"
                if "images_per_s_min" in row else (f"{row['images_per_s']:,.0f}" if row.get("images_per_s") else ""))
        notes = (
            row.get("error")
            or row.get("result")
            or (
                f"data wait {row['data_wait']:.0%}"
                if "data_wait" in row
                else (f"warm-up {row['warmup_s']:.0f} s" if "warmup_s" in row else "")
            )
        )
        if "jpeg_decoder" in row:
            notes = "; ".join(filter(None, [notes, f"JPEG decoder: {row['jpeg_decoder']['jpeg_decoder']}"]))
        seconds = f"{row['seconds']:.0f}" if row.get("seconds") is not None else ""
        lines.append(f"| {row['section']} | {row['what']} | {rate} | {seconds} | {notes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing (runs on a CPU)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip sections that no longer fit (seconds)")
    parser.add_argument("--work", default=None, help="shards and runs (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep --work at the end")
    parser.add_argument("--skip", nargs="+", default=[], choices=sorted(ESTIMATE_S),
                        help="sections not to run (each still gets a row saying so)")
    args = parser.parse_args()
    why = missing(args.device)
    if why:
        sys.exit(f"gpu_check: {why}")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if out is not None and work.resolve().is_relative_to(out.resolve()):
        sys.exit(f"gpu_check: --work {work} is inside $OUT ({out}), which must hold only the results")
    work.mkdir(parents=True, exist_ok=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)  # a folder that does not exist yet is where the results go, not an error
    check = Check(args.device, args.smoke, args.budget_s, out / "gpu_check.log" if out else None, tuple(args.skip))
    info = machine()
    card = info["gpu"] or f"CPU ({info['cpu_count']} cores)"
    check.say(f"device: {card}; torch {info['torch']}; DALI {info['nvidia-dali-cuda120']}; work {work}")
    try:
        shards = make_shards(work, args.smoke)
        check.rows.append({"section": "setup", "what": "sample and shards", "seconds": time.monotonic() - check.started,
                           "result": f"{_steps_per_epoch(shards, 1)} train images"})
        production_config(check, shards, work)
        graph_memory(check, shards, work)
        gpu_tests(check)
        loaders(check, shards)
        steps(check, shards)
        graphs(check)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - check.started
    check.rows.append({"section": "total", "what": "the whole check", "seconds": total,
                       "result": f"{total / 60:.1f} min of the {args.budget_s / 60:.1f} min budget"})
    text = table(check, card)
    check.say("\n" + text)
    if out is not None:
        (out / "gpu_check.json").write_text(json.dumps({"machine": info, "rows": check.rows}, indent=1))
        (out / "gpu_check.md").write_text(text + "\n")
    failed = [r for r in check.rows if r.get("passed") is False or "error" in r]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
