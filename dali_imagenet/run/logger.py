"""What a run reports: a local metrics.jsonl (always) and Weights & Biases (when it is wanted), and
the machine it ran on."""
from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from dali_imagenet.atomic import write_atomic
from dali_imagenet.run.run_folder import METRICS


class RunLogger:
    """Rank 0 only: every record goes to `metrics.jsonl` (flushed per line) and, if on, to W&B."""

    def __init__(self, run_dir: str | Path, config: dict, use_wandb: bool, project: str, resume_id: str | None = None):
        self.path = Path(run_dir) / METRICS
        self._file = open(self.path, "a")
        self._wandb = None
        if use_wandb:
            import wandb

            # Only the config dataclass goes to W&B: no environment, so no AWS or W&B key.
            self._wandb = wandb.init(project=project, config=config, dir=str(run_dir), id=resume_id,
                                     resume="allow" if resume_id else None, name=Path(run_dir).name)

    @property
    def wandb_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    @property
    def closed(self) -> bool:
        return self._file.closed

    def amend_last(self, fields: dict) -> None:
        """Rewrites the log's last record with `fields` added (atomically: `atomic.write_atomic`)."""
        lines = self.path.read_text().splitlines()
        if not lines:
            return
        lines[-1] = json.dumps({**json.loads(lines[-1]), **fields}, sort_keys=True)
        write_atomic(self.path, "\n".join(lines) + "\n")

    @property
    def wandb_on(self) -> bool:
        return self._wandb is not None

    def close(self, summary: dict | None = None, media: dict | None = None, page: Path | None = None) -> None:
        """Ends the log; `summary` (numbers) goes to W&B's run summary too, `media` (Tables,
        Images) logged at the last step, and `page` (the run's report.html) as an artifact."""
        if not self._file.closed:
            self._file.close()
        if self._wandb is None:
            return
        run, self._wandb = self._wandb, None
        try:
            for key, value in (summary or {}).items():
                if isinstance(value, (int, float)):
                    run.summary[key] = value
            if media:
                run.log(media)
            if page is not None and Path(page).is_file():
                import wandb

                artifact = wandb.Artifact(f"report-{run.id}", type="report")
                artifact.add_file(str(page))
                run.log_artifact(artifact)
        finally:
            run.finish()


def wandb_wanted(flag: bool | None) -> bool:
    """--wandb / --no-wandb decide; without either, W&B is on only where it is set up."""
    if flag is not None:
        return flag
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def machine() -> dict:
    """What ran it: host, CPU count, GPU, Python and the versions that change the numbers."""
    import torch

    info = {"machine": platform.node(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for package in ("torch", "torchvision", "nvidia-dali-cuda120", "webdataset", "pillow"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info
