"""The whole GPU product on one lent GPU, within --budget-s, from shards it makes there; one table.

    bash benchmarks/gpu_check.sh                          # on the GPU machine (DALI importable)
    python -m benchmarks.gpu_check --smoke --device cpu   # the CPU self-check of the same plumbing

Every row is written to $OUT (gpu_check.json and gpu_check.md, whole and valid after each row) as
soon as it is measured: a check cut short (SIGTERM, a timeout) keeps what it finished and says
where it stopped. Each section has a time box (`SECTION_BOX_S`) inside the budget; a command
still running when its box ends is stopped (a row says so) and the next section starts; a section
whose box no longer fits is skipped with a row saying so. Sections, most important first:
1. train.py with configs/l4-16h.yaml as people launch it (compile on, the 160 -> 192 px ramp,
   batch 256): per size the first step's seconds (the compile), steps/s after it and peak GPU
   memory; stopped mid-epoch and resumed with --resume auto, judged against the straight run by
   `resume_verdict` (exact where the run is deterministic eager; a stated bound otherwise); and
   the device's used memory (NVML: DALI, PyTorch and the CUDA context together) at its peak
   through the straight run's epochs at 160 and 192 px and its validation, against an L4's 22.5 GiB
2. the L4 host (benchmarks.l4_host): the loader feeding the l4-16h step at 160 and 192 px with the
   hardware decoder off, pinned to 2 cores and their SMT siblings, at 4, 3 and 2 loader threads and
   two `hybrid_huffman_threshold` values; the verdict: the loader or the step sets an L4's pace
3. the same ramp with `cuda_graph: true`: peak memory per size (NVML), and whether it fits an L4
4. `pytest -m gpu`
5. DALI GPU loaders: all cores, and 4 cores with 3 threads with the hardware JPEG decoder and with
   `hw_decoder_load=0` (nvJPEG's hybrid path)
6. the synthetic step and the real loader -> step at the ramp's sizes
7. eager vs `cuda_graph` at b128 on 4 cores and b256 on all cores
8. serve.py over HTTP (benchmarks.serve): ResNet-50 at 224 px, 1/8/32 clients, batching off and on
   (needs fastapi and uvicorn: `pip install '.[serve]'`; a row says so without them)
$OUT (the results folder a lent machine sends back) gets only gpu_check.json, gpu_check.md and
gpu_check.log; shards and runs go to --work (default: a new folder under /tmp), removed at the end
unless --keep.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, machine
from benchmarks.l4_host import host_cpus, machine_siblings
from dali_imagenet.atomic import write_atomic
from dali_imagenet.run.run_folder import FINAL, METRICS

L4_MEMORY_GIB = 22.5  # an L4's memory as NVML reports it (23,034 MiB): what DALI, PyTorch and the context share
LOSS_WINDOWS = 3  # log windows after the resume point whose losses are compared
LOSS_RTOL = 2e-2  # their relative difference allowed where kernels are not bitwise reproducible
# Section -> its time box in seconds on an H100/H200 (measured there or estimated: cold compiles
# included); a section starts only while half its box still fits the budget, and gets at most its box.
SECTION_BOX_S = {"train.py": 240, "L4 host": 170, "cuda_graph memory": 60, "pytest -m gpu": 40, "loader": 30,
                 "step": 60, "eager/graph": 45, "serve": 90}
MARGIN_S = 10.0  # kept after the last box: the results written, the work folder removed
MEMORY_POLL_MS = 200  # NVML's used memory, sampled by nvidia-smi this often


class Stopped(Exception):
    """SIGTERM (a `timeout`, a machine being taken back): the check ends with the rows it has."""


class TimedOut(Exception):
    """A command ran past its section's box."""


class MemoryPeak:
    """The device's used memory (NVML, through `nvidia-smi -lms`: every process on the GPU, DALI's
    pools, PyTorch's and the CUDA contexts), its peak while the block runs; `peak_gib` None without
    nvidia-smi."""

    def __init__(self, device_index: int = 0):
        self.peak_mib: float | None = None
        self.total_mib: float | None = None
        smi = shutil.which("nvidia-smi")
        self.process = subprocess.Popen(
            [smi, "-i", str(device_index), "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits",
             "-lms", str(MEMORY_POLL_MS)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True) if smi else None
        if self.process:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                used, total = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.peak_mib, self.total_mib = max(self.peak_mib or 0.0, used), total

    def stop(self) -> float | None:
        if self.process:
            time.sleep(MEMORY_POLL_MS / 1000 * 2)  # the last samples
            self.process.terminate()
            self.process.wait(10)
        return self.peak_gib

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_mib is None else self.peak_mib / 1024


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


class Box:
    """A section's time: it ends at `ends_at` (monotonic seconds)."""

    def __init__(self, section: str, seconds: float):
        self.section, self.seconds = section, seconds
        self.ends_at = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.ends_at - time.monotonic())


class Check:
    """Rows of the table (each written to $OUT at once), a time budget cut into section boxes, a
    log, and the processes that measure (each in a session of its own: a box or a SIGTERM that
    ends one ends its children too)."""

    def __init__(self, device: str, smoke: bool, budget_s: float, out: Path | None, skip: tuple[str, ...] = (),
                 card: str = "", info: dict | None = None):
        self.device, self.smoke, self.skip = device, smoke, set(skip)
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.deadline = self.started + budget_s
        self.rows: list[dict] = []
        self.out, self.card, self.info = out, card, info or {}
        self.log = open(out / "gpu_check.log", "a") if out else None
        self.current: subprocess.Popen | None = None

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def add(self, row: dict) -> dict:
        """One more row, written to $OUT (JSON and table) at once."""
        self.rows.append(row)
        self.write()
        return row

    def write(self) -> None:
        if self.out is None:
            return
        for name, text in (("gpu_check.json", json.dumps({"machine": self.info, "rows": self.rows}, indent=1)),
                           ("gpu_check.md", table(self, self.card) + "\n")):
            write_atomic(self.out / name, text)  # whole files only, whenever the check is stopped

    def fits(self, section: str, also: tuple[str, ...] = ()) -> Box | None:
        """The box of `section` if it is asked for and still fits the budget (on a CPU, --smoke:
        whatever is left); if not, a row says why (for `also`, the sections it brings, too)."""
        if section in self.skip:
            for name in (section, *also):
                self.add({"section": name, "what": "skipped", "seconds": 0, "result": "not asked for (--skip)"})
            self.say(f"[{section}] skipped: --skip")
            return None
        left = self.deadline - time.monotonic() - MARGIN_S
        box = left if self.smoke else min(SECTION_BOX_S[section], left)
        need = 1 if self.smoke else SECTION_BOX_S[section] / 2
        if left >= need:
            return Box(section, box)
        self.add({"section": section, "what": "skipped", "seconds": 0,
                  "result": f"would not fit --budget-s: {max(left, 0):.0f} s left, its box is "
                            f"{SECTION_BOX_S[section]} s"})
        self.say(f"[{section}] skipped: {max(left, 0):.0f} s left of the budget")
        return None

    def spawn(self, command: list[str], box: Box, on_line=None) -> subprocess.CompletedProcess:
        """Runs `command` in a session of its own until it ends or `box` does (then its whole
        session is stopped and `TimedOut` raised); `on_line(line)` sees each stdout line as it comes."""
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        self.current = process
        lines: queue.Queue = queue.Queue()
        errors: list[str] = []
        readers = [threading.Thread(target=lambda: [lines.put(x) for x in process.stdout] and None, daemon=True),
                   threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)]
        for reader in readers:
            reader.start()
        out: list[str] = []
        try:
            while True:
                if box.left() <= 0:  # checked on every line too: a child that prints steadily is no exception
                    raise TimedOut(f"stopped when its box of {box.seconds:.0f} s ran out")
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    if process.poll() is not None and not readers[0].is_alive() and lines.empty():
                        break
                    continue
                out.append(line)
                if on_line:
                    on_line(line)
            readers[1].join(5)
        except BaseException:
            stop_session(process)
            raise
        finally:
            self.current = None
            if self.log:
                self.log.write("".join(out)[-20000:] + "".join(errors)[-20000:])
                self.log.flush()
        return subprocess.CompletedProcess(command, process.returncode, "".join(out), "".join(errors))

    def measure(self, section: str, what: str, module: str, args: list[str], box: Box, prefix: list[str] = ()) -> dict:
        """One row from `python -m module args`: the JSON object it prints last."""
        self.say(f"[{section}] {what}")
        started = time.monotonic()
        try:
            result = self.spawn([*prefix, sys.executable, "-m", module, *args], box)
            if result.returncode != 0:
                self.say(result.stderr[-2000:])
                found = {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1][:200]}
            elif rows := [x for x in result.stdout.splitlines() if x.startswith("{")]:
                found = json.loads(rows[-1])
            else:  # a module that ended well but printed no row: an error row, the check goes on
                found = {"error": f"{module} printed no result (exit 0)"}
        except TimedOut as why:
            found = {"result": str(why), "timed_out": True}
        self.add({"section": section, "what": what, **found, "seconds": time.monotonic() - started})
        return found

    def stream(self, section: str, module: str, args: list[str], box: Box, prefix: list[str] = ()) -> None:
        """Rows from a module that prints `{"row": {...}}` lines as it measures: each kept at once."""
        self.say(f"[{section}] python -m {module}")
        started = time.monotonic()

        def on_line(line: str) -> None:
            if line.startswith('{"row"'):
                row = json.loads(line)["row"]
                self.add({"section": section, **row, "seconds": row.get("seconds", time.monotonic() - started)})
                self.say(f"[{section}] {row['what']}: {row.get('result') or _rate(row)}")

        try:
            result = self.spawn([*prefix, sys.executable, "-m", module, *args], box, on_line)
            if result.returncode != 0:
                self.add({"section": section, "what": f"python -m {module}", "seconds": time.monotonic() - started,
                          "error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1][:200]})
        except TimedOut as why:
            self.add({"section": section, "what": f"python -m {module}", "result": f"{why}: the rows above finished",
                      "timed_out": True, "seconds": time.monotonic() - started})

    def run(self, section: str, what: str, command: list[str], box: Box) -> subprocess.CompletedProcess:
        """A command whose output goes to the log (a train.py run); `TimedOut` past the box."""
        self.say(f"[{section}] {what}")
        return self.spawn(command, box)


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM to the process's whole session, SIGKILL if it is still there 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _rate(row: dict) -> str:
    if "images_per_s" not in row:
        return ""
    wait = f", data wait {row['data_wait']:.0%}" if "data_wait" in row else ""
    return f"{row['images_per_s']:,.0f} img/s{wait}"


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


def train_py(check: Check, shards: Path, config: str, sets: list[str], out: Path, box: Box,
             extra: list[str] = ()) -> tuple[subprocess.CompletedProcess, list[dict]]:
    command = [sys.executable, str(REPO / "train.py"), "--dali", "--data", str(shards), "--out", str(out), "--config",
               str(REPO / "configs" / f"{config}.yaml"), "--device", check.device, "--no-wandb", "--spot", "off",
               *[f"--set={item}" for item in sets], *extra]
    result = check.run("train.py", f"{out.name}: {' '.join(sets[-3:])} {' '.join(extra)}", command, box)
    records = ([json.loads(line) for line in (out / METRICS).read_text().splitlines()]
               if (out / METRICS).exists() else [])
    return result, records


def since_resumed(records: list[dict]) -> list[dict]:
    """A resumed run's records after its last `resumed` event (its log also holds the split run's)."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "resumed"]
    return records[starts[-1] + 1:] if starts else records


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


def memory_row(section: str, what: str, peak_gib: float | None, seconds: float) -> dict:
    """The device's used memory at its peak (NVML) against an L4's."""
    if peak_gib is None:
        return {"section": section, "what": what, "result": "needs a GPU (nvidia-smi, NVML)", "seconds": seconds}
    fits = peak_gib <= L4_MEMORY_GIB
    return {"section": section, "what": what, "peak_used_gib": peak_gib, "fits_l4": fits, "seconds": seconds,
            "result": f"{'fits' if fits else 'does NOT fit'} an L4: peak {peak_gib:.1f} GiB used (NVML: DALI, "
                      f"PyTorch, the CUDA context) of {L4_MEMORY_GIB:g} GiB"}


def production_config(check: Check, shards: Path, work: Path) -> None:
    """l4-16h as it runs: straight (its device memory watched), and stopped mid-epoch after the
    size change + --resume auto."""
    section = "train.py"
    box = check.fits(section)
    if not box:
        return
    started = time.monotonic()
    batch, log_every = (8, 2) if check.smoke else (256, 4)
    per_epoch = _steps_per_epoch(shards, batch)
    epochs = 3  # epoch 1 at the ramp's first size, 2 and 3 at its last: two compiles, and a warm epoch
    # --smoke on a CPU: a small model and sizes, compile off (a CPU compile takes minutes), deterministic
    sets = (["arch=resnet10", "width=16", f"batch_size={batch}", "min_image_size=32", "image_size=48",
             "image_size_step=16", "val_image_size=32", "compile=false", "deterministic=true", "loader_threads=2"]
            if check.smoke else [])
    # val_every 0: one validation, at the end (at l4-16h's 256 px): the memory peak covers it
    sets += [f"epochs={epochs}", "ramp_start_epoch=0", "ramp_end_epoch=1", "warmup_epochs=1", f"log_every={log_every}",
             "val_every=0"]
    stop_at = per_epoch + per_epoch // 2 // log_every * log_every  # mid epoch 2, after the size change
    exact = check.smoke  # deterministic eager only in --smoke; the GPU run compiles, as people run it
    runs = {}
    for name, extra_sets, extra in (("straight", [], []), ("split", [f"max_steps={stop_at}"], []),
                                    ("resumed", [], ["--resume", "auto"])):
        out = work / f"l4-16h-{'split' if name == 'resumed' else name}"
        memory = MemoryPeak() if name == "straight" and check.device == "cuda" else None
        try:
            result, records = train_py(check, shards, "l4-16h", [*sets, *extra_sets], out, box, extra)
        except TimedOut as why:
            check.add({"section": section, "what": f"l4-16h {name}", "result": str(why), "timed_out": True,
                       "seconds": time.monotonic() - started})
            return
        finally:
            peak = memory.stop() if memory else None
        if name == "straight":
            check.add(memory_row("memory", "peak device memory, l4-16h b256: epochs at 160 and 192 px + a validation "
                                           "at 256 px", peak, time.monotonic() - started))
        runs[name] = (result, records, out)
        if result.returncode != 0:
            check.add(
                {
                    "section": section,
                    "what": f"l4-16h {name}",
                    "result": f"failed (exit {result.returncode})",
                    "error": (result.stderr.strip().splitlines() or [""])[-1][:200],
                    "seconds": time.monotonic() - started,
                }
            )
            return
        if name == "straight":
            size_before = None
            first_step_is = " (a new size)" if check.smoke else " (a new size: compiles)"  # --smoke runs eager
            for row in per_size(records, batch):
                new_size = row["image_size"] != size_before
                size_before = row["image_size"]
                memory_text = f", peak {row['peak_gpu_mem_gb']:.1f} GiB" if row["peak_gpu_mem_gb"] is not None else ""
                check.add(
                    {
                        "section": section,
                        "what": f"l4-16h straight, epoch {row['epoch']} at {row['image_size']} px",
                        **row,
                        "new_size": new_size,
                        "result": f"first step {row['first_step_s']:.1f} s{first_step_is if new_size else ''}, "
                        f"then {row['steps_per_s'] or 0:.2f} steps/s{memory_text}",
                    }
                )
    resumed_first = per_size(since_resumed(runs["resumed"][1]), batch)
    if resumed_first:
        check.add(
            {
                "section": section,
                "what": "l4-16h resumed: its first step" + ("" if check.smoke else " (recompile, warm cache)"),
                "first_step_s": resumed_first[0]["first_step_s"],
                "result": f"first step {resumed_first[0]['first_step_s']:.1f} s",
            }
        )
    verdict = resume_verdict(window_losses(runs["straight"][1], stop_at), window_losses(runs["resumed"][1], stop_at),
                             _max_abs_diff(runs["straight"][2], runs["split"][2]), exact)
    check.add({"section": section, "what": f"l4-16h: straight vs stopped at step {stop_at} + resume",
               **verdict, "seconds": time.monotonic() - started})


def l4_host(check: Check, shards: Path) -> None:
    """benchmarks.l4_host pinned to 2 cores and their SMT siblings: its rows as they come."""
    section = "L4 host"
    box = check.fits(section)
    if not box:
        return
    cpus, words = host_cpus(machine_siblings())
    prefix = (["taskset", "-c", ",".join(map(str, cpus))]
              if shutil.which("taskset") and len(cpus) < (os.cpu_count() or 1) else [])
    check.add({"section": section, "what": "the host's CPUs", "seconds": 0,
               "result": words if prefix else f"{words}; not pinned (no taskset, or no other CPUs here)"})
    args = ["--data", str(shards), "--config", str(REPO / "configs" / "l4-16h.yaml"), "--device", check.device,
            "--host", words]
    if check.smoke:  # a CPU: a small model at small sizes, eager, two thread counts
        args += ["--set", "arch=resnet10", "--set", "width=16", "--set", "batch_size=8", "--set", "compile=false",
                 "--set", "amp_dtype=float32", "--sizes", "32", "48", "--threads", "2", "1", "--warmup-steps", "1",
                 "--steps", "2", "--repeats", "2"]
    check.stream(section, "benchmarks.l4_host", args, box, prefix)


def graph_memory(check: Check, shards: Path, work: Path) -> None:
    """The ramp with cuda_graph on, at the L4 config's batch: each size's graph keeps a memory pool;
    the trainer drops a finished size's graph, so the peak is the largest size's."""
    section = "cuda_graph memory"
    if check.device != "cuda":
        check.add({"section": section, "what": "l4-16h ramp, cuda_graph", "result": "needs a GPU", "seconds": 0})
        return
    box = check.fits(section)
    if not box:
        return
    started = time.monotonic()
    sets = ["epochs=2", "ramp_start_epoch=0", "ramp_end_epoch=1", "val_every=0", "cuda_graph=true",
            "compile=false", "log_every=4"]  # eager capture: the graphs' pools are the question, not a compile
    memory = MemoryPeak()
    try:
        result, records = train_py(check, shards, "l4-16h", sets, work / "l4-16h-graph", box)
    except TimedOut as why:
        check.add({"section": section, "what": "l4-16h ramp, cuda_graph", "result": str(why), "timed_out": True,
                   "seconds": time.monotonic() - started})
        return
    finally:
        peak = memory.stop()
    if result.returncode != 0:
        check.add({"section": section, "what": "l4-16h ramp, cuda_graph", "result": "failed",
                   "error": (result.stderr.strip().splitlines() or [""])[-1][:200],
                   "seconds": time.monotonic() - started})
        return
    for row in per_size(records, 256):
        check.add({"section": section, "what": f"cuda_graph, {row['image_size']} px, b256", **row,
                   "result": f"peak {row['peak_gpu_mem_gb']:.1f} GiB allocated, "
                             f"{row['peak_gpu_reserved_gb']:.1f} GiB reserved (PyTorch's counters)"})
    check.add(memory_row(section, "cuda_graph ramp 160 -> 192 px + a validation: fits an L4?", peak,
                         time.monotonic() - started))


def loaders(check: Check, shards: Path) -> None:
    box = check.fits("loader")
    if not box:
        return
    batch, size = (8, 64) if check.smoke else (256, 224)
    timing = ["--warmup-batches", "1", "--batches", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-batches", "5", "--batches", "20", "--repeats", "3"]
    common = ["--data", str(shards), "--backend", "dali", "--device", check.device, "--batch-size", str(batch),
              "--image-size", str(size), *timing]
    check.measure("loader", f"DALI train, all {os.cpu_count()} cores", "benchmarks.loaders",
                  [*common, "--split", "train", "--threads", str(min(os.cpu_count() or 1, 8))], box)
    if check.device != "cuda":  # on a CPU, hw_decoder_load changes nothing: the row above says it all
        check.add({"section": "loader", "what": "DALI train, 4 cores, hw_decoder_load=0.7 and 0",
                   "result": "needs a GPU", "seconds": 0})
        return
    for load in (0.7, 0.0):
        cores = "4 cores" if four_cores() else f"all {os.cpu_count()} cores"
        check.measure("loader", f"DALI train, {cores}, 3 threads, hw_decoder_load={load}", "benchmarks.loaders",
                      [*common, "--split", "train", "--threads", "3", "--hw-decoder-load", str(load)], box,
                      four_cores())


def steps(check: Check, shards: Path) -> None:
    box = check.fits("step", also=("loader -> step",))
    if not box:
        return
    arch, batch = ("resnet18", 4) if check.smoke else ("resnet50", 256)
    sizes = (32,) if check.smoke else (160, 192, 224)
    timing = ["--warmup-steps", "1", "--steps", "2", "--repeats", "3"] if check.smoke else \
             ["--warmup-steps", "5", "--steps", "15", "--repeats", "3"]
    common = ["--arch", arch, "--device", check.device, "--dtype", "bfloat16", "--batch-size", str(batch), "--blurpool",
              *timing]
    for size in sizes:
        check.measure("step", f"synthetic, {size} px, BlurPool, b{batch}", "benchmarks.steps",
                      ["synthetic", *common, "--image-size", str(size)], box)
        if size in ((32,) if check.smoke else (160, 192)):
            check.measure("loader -> step", f"DALI -> step, {size} px, BlurPool, b{batch}", "benchmarks.steps",
                          ["end-to-end", *common, "--image-size", str(size), "--data", str(shards)], box)


def graphs(check: Check) -> None:
    box = check.fits("eager/graph")
    if not box:
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
                check.add({"section": "eager/graph", "what": f"{mode}, b{batch}, {cores}", "seconds": 0,
                           "result": "--smoke: the step section's synthetic row (the same step)"})
                continue
            if mode == "cuda_graph" and check.device != "cuda":
                check.add({"section": "eager/graph", "what": f"{mode}, b{batch}, {cores}",
                           "result": "needs a GPU", "seconds": 0})
                continue
            check.measure("eager/graph", f"{mode}, b{batch}, {cores}", "benchmarks.steps",
                          ["synthetic", "--arch", arch, "--device", check.device, "--dtype", "bfloat16",
                           "--batch-size", str(batch), "--image-size", "224" if not check.smoke else "32",
                           "--blurpool", *(["--cuda-graph"] if mode == "cuda_graph" else []), *timing], box, prefix)


def serve(check: Check, work: Path) -> None:
    """serve.py over HTTP on this device (benchmarks.serve): img/s and p50/p99 at 1/8/32 clients,
    batching off and on, a row each. Last: the product's inference path, not its training."""
    section = "serve"
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        check.add({"section": section, "what": "serve.py", "seconds": 0,
                   "result": "not run: fastapi/uvicorn not installed here (pip install '.[serve]')"})
        return
    box = check.fits(section)
    if not box:
        return
    results = work / "serve.jsonl"
    args = ["-m", "benchmarks.serve", "--device", check.device, "--work", str(work), "--out", str(results)]
    args += ["--smoke"] if check.smoke else ["--models", "resnet50", "--seconds", "2"]
    started = time.monotonic()
    try:
        result = check.run(section, "serve.py over HTTP", [sys.executable, *args], box)
    except TimedOut as why:
        check.add({"section": section, "what": "serve.py over HTTP", "result": str(why), "timed_out": True,
                   "seconds": time.monotonic() - started})
        return
    if result.returncode != 0:
        check.add({"section": section, "what": "serve.py over HTTP", "seconds": time.monotonic() - started,
                   "error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1][:200]})
        return
    for row in map(json.loads, results.read_text().splitlines()):
        batching = f"batching ≤ {row['max_batch']}" if row["batching"] else "no batching"
        check.add({"section": section, "what": f"{row['model']}, {row['clients']} clients, {batching}",
                   "images_per_s": row["images_per_s"], "seconds": 0,
                   "result": f"{row['images_per_s']:,.0f} img/s, p50 {row['p50_ms']:,.0f} ms, "
                             f"p99 {row['p99_ms']:,.0f} ms"})


def gpu_tests(check: Check) -> None:
    if check.device != "cuda":
        check.add({"section": "pytest -m gpu", "what": "the GPU tests", "result": "needs a GPU", "seconds": 0})
        return
    box = check.fits("pytest -m gpu")
    if not box:
        return
    started = time.monotonic()
    try:
        result = check.run("pytest -m gpu", "the GPU tests",
                           [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], box)
    except TimedOut as why:
        check.add({"section": "pytest -m gpu", "what": "the GPU tests", "result": str(why), "timed_out": True,
                   "seconds": time.monotonic() - started})
        return
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-200:]
    check.add({"section": "pytest -m gpu", "what": "the GPU tests", "result": last,
               "seconds": time.monotonic() - started})


def _steps_per_epoch(shards: Path, batch: int) -> int:
    return json.loads((shards / "manifest.json").read_text())["splits"]["train"]["samples"] // batch


def _max_abs_diff(a: Path, b: Path) -> float:
    first = torch.load(a / FINAL, weights_only=True)
    second = torch.load(b / FINAL, weights_only=True)
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
    parser.add_argument("--budget-s", type=float, default=500.0,
                        help="the whole check's seconds: sections get their boxes inside it, or are skipped")
    parser.add_argument("--work", default=None, help="shards and runs (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep --work at the end")
    parser.add_argument("--skip", nargs="+", default=[], choices=sorted(SECTION_BOX_S),
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
    info = machine()
    card = info["gpu"] or f"CPU ({info['cpu_count']} cores)"
    check = Check(args.device, args.smoke, args.budget_s, out, tuple(args.skip), card, info)

    def stopped(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stopped)
    check.say(f"device: {card}; torch {info['torch']}; DALI {info['nvidia-dali-cuda120']}; work {work}")
    try:
        shards = make_shards(work, args.smoke)
        check.add({"section": "setup", "what": "sample and shards", "seconds": time.monotonic() - check.started,
                   "result": f"{_steps_per_epoch(shards, 1)} train images"})
        production_config(check, shards, work)
        l4_host(check, shards)
        graph_memory(check, shards, work)
        gpu_tests(check)
        loaders(check, shards)
        steps(check, shards)
        graphs(check)
        serve(check, work)
    except Stopped as why:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough: the rest is writing what we have
        if check.current is not None:
            stop_session(check.current)
        check.add({"section": "stopped", "what": f"{why} after {time.monotonic() - check.started:.0f} s",
                   "result": "the check was stopped: every row above finished; the sections after it did not run",
                   "stopped": True, "seconds": time.monotonic() - check.started})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - check.started
    check.add({"section": "total", "what": "the whole check", "seconds": total,
               "result": f"{total / 60:.1f} min of the {args.budget_s / 60:.1f} min budget"})
    check.say("\n" + table(check, card))
    failed = [r for r in check.rows if r.get("passed") is False or "error" in r or r.get("stopped")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
