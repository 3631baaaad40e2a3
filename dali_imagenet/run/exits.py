"""train.py's exit codes: the interface schedulers act on (SkyPilot's `job_recovery`, Slurm, a
shell loop). 0 means the job is done and nothing remains to do; a reclaim is not success.

SkyPilot ends a managed job that exits 0 as SUCCEEDED and relaunches one that exits with a code
listed in `job_recovery.recover_on_exit_codes` however often it happens; other non-zero codes
are retried `max_restarts_on_errors` times. Under torchrun a worker's code is not torchrun's (its
agent exits 1 whenever a worker fails), so each process also writes its code to the file named by
`$DALI_IMAGENET_EXIT_CODE_FILE`, which the cloud tasks' `run:` passes on (cloud/train-multinode.yaml).
"""
from __future__ import annotations

import os
from pathlib import Path

from dali_imagenet.atomic import write_atomic

COMPLETE = 0  # every epoch trained (or the max_steps / max_minutes asked for) and every file in S3
ERROR = 1  # bad input, a data error, a NaN loss, a bug (with its traceback)
USAGE = 2  # a flag argparse refuses
# sysexits' EX_IOERR: the run ended, but files were still not in S3 at the deadline (or not written)
UPLOADS_PENDING = 74
RECLAIM = 75  # sysexits' EX_TEMPFAIL: stopped for a spot reclaim or SIGTERM, checkpointed: relaunch, --resume auto
INTERRUPTED = 130  # Ctrl-C (SIGINT), checkpointed: a person stopped it, nothing should relaunch it

EXIT_CODE_FILE = "DALI_IMAGENET_EXIT_CODE_FILE"

TABLE = f"""exit codes:
  {COMPLETE:<4} complete: every epoch (or max_steps / max_minutes) trained, every file in S3
  {ERROR:<4} an error: bad input, a data error, a NaN loss, a bug
  {USAGE:<4} a bad command line
  {UPLOADS_PENDING:<4} ended, but uploads to --s3 were still pending at the deadline (s3_flush_timeout_s), or a
       file of the run's end (final_weights.pt) could not be written
  {RECLAIM:<4} stopped with a checkpoint for a spot reclaim (EC2's notice) or SIGTERM: relaunch with --resume auto
  {INTERRUPTED:<4} stopped with a checkpoint by Ctrl-C (SIGINT)
"""

# What each stop request means; the strongest wins when ranks heard different ones (a reclaim
# must be relaunched even if another rank also saw a Ctrl-C).
_STOP_CODES = {"SIGTERM": RECLAIM, "SIGINT": INTERRUPTED}


def for_stop(reason: str | None) -> int:
    """The exit code of a run that stopped for `reason` (None: it trained every epoch). A spot
    notice and SIGTERM ask for a relaunch; a limit the config sets (max_steps, max_minutes) is
    what was asked, so the job is complete."""
    if reason is None or reason.startswith(("max_steps=", "max_minutes=")):
        return COMPLETE
    return _STOP_CODES.get(reason.split(" on rank ")[0], RECLAIM)


def with_uploads(code: int, pending: list[str]) -> int:
    """A run whose files are not all in S3 never claims success, nor a clean reclaim: on a spot
    instance the disk that holds them is about to be deleted."""
    return UPLOADS_PENDING if pending and code in (COMPLETE, RECLAIM) else code


def record(code: int) -> None:
    """Writes `code` where `$DALI_IMAGENET_EXIT_CODE_FILE` says, from the first process on each
    machine (torchrun's LOCAL_RANK 0; every rank exits with the same code)."""
    path = os.environ.get(EXIT_CODE_FILE)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, f"{code}\n")
