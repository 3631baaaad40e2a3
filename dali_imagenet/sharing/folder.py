"""A run as a published folder: `model.safetensors` + `config.json` in timm's format
(`run/published.py`), the model card `README.md`, `curves.png` and the run's `report.html`.
The weights are the ones the run's page calls best: best.pt's raw weights or their EMA, whichever
scored higher at its last validation. A run under an `s3://` prefix is fetched first (its small
files and best.pt, or last.pt where there is no best.pt). Nothing of the publisher's machine goes
into it: the data is named by the publisher (`data_name`) or by the dataset its shards' manifest
says they were converted from (a Hub dataset's id), never by its path."""
from __future__ import annotations

import base64
import html
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.data.folders import check_output_folder, refuse_overlap
from dali_imagenet.data.shardformat import MANIFEST
from dali_imagenet.errors import DaliImagenetError, UsageError
from dali_imagenet.inference.predictor import load_model
from dali_imagenet.report.html_report import RunRecords, read_run, validation_curves, write_report
from dali_imagenet.run import published
from dali_imagenet.run.run_folder import BEST, CONFIG, LAST, METRICS, PREDICTIONS, REPORT
from dali_imagenet.sharing.model_card import card

CURVES = "curves.png"
RUN_FILES = (METRICS, CONFIG, PREDICTIONS, REPORT)  # and one checkpoint: best.pt, else last.pt
FOLDER_FILES = {published.WEIGHTS, published.CONFIG, "README.md", CURVES, REPORT}  # what `build` writes, all of it


class PublishError(DaliImagenetError):
    """The run cannot be published as asked; the message is one line."""


@dataclass
class Built:
    folder: Path
    stock: bool  # timm builds it as it is
    run: RunRecords
    weights: str  # raw | ema
    class_names: list[str] | None

    def sizes(self) -> list[tuple[str, int]]:
        return sorted((p.name, p.stat().st_size) for p in self.folder.iterdir() if p.is_file())


def local_run(source: str, scratch: Path) -> Path:
    """The run folder itself, or an s3:// run's files fetched into `scratch`."""
    if not s3.is_s3(source):
        if not (Path(source) / METRICS).is_file():
            raise PublishError(f"{source}: not a run folder (no {METRICS})")
        return Path(source)
    scratch.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        s3.download(source.rstrip("/"), name, scratch / name, timeout_s=30)
    for name in (BEST, LAST):  # a checkpoint holds the optimizer too: fetch only the one published
        if s3.download(source.rstrip("/"), name, scratch / name, timeout_s=30):
            break
    if not (scratch / METRICS).is_file():
        raise PublishError(f"{source}: not a run (no {METRICS} under it)")
    return scratch


def checkpoint_of(run_folder: Path) -> Path:
    for name in (BEST, LAST):
        if (run_folder / name).is_file():
            return run_folder / name
    raise PublishError(f"{run_folder}: no {BEST} or {LAST}: nothing to publish")


def data_source_name(run: RunRecords, scratch: Path) -> str | None:
    """The Hub dataset the run's shards were converted from, as their manifest names it (where the
    run's data can still be read: a local folder or s3://); None otherwise."""
    data = str(run.started.get("data") or "")
    try:
        if s3.is_s3(data):
            manifest = scratch / MANIFEST
            found = s3.download(data.rstrip("/"), MANIFEST, manifest, timeout_s=10)
        else:
            manifest = Path(data) / MANIFEST
            found = bool(data) and manifest.is_file()
        source = json.loads(manifest.read_text()).get("source", {}) if found else {}
    except (DaliImagenetError, OSError, ValueError):
        return None
    return source.get("repo") if source.get("kind") == "hub" else None


def not_published(run: RunRecords, source: str) -> list[str]:
    """What the run recorded of the machine it ran on and of its storage: the run's and the data's
    paths or s3:// URIs, a config file's, a local --init source's; and the host's name."""
    started = run.started
    values = [source, str(Path(source).resolve()) if not s3.is_s3(source) else "", started.get("data"),
              started.get("staged_to"), started.get("config_file")]
    init = str((started.get("init") or {}).get("source") or "")
    if not init.startswith("hf://") and not init.endswith(" pretrained"):  # a Hub repo, timm's own: public names
        values.append(init)
    return sorted({str(v) for v in values if v}, key=len, reverse=True)


def scrubbed_page(text: str, run: RunRecords, source: str) -> str:
    """The run's page without `not_published`'s values (and its host's name in the machine table)."""
    for value in not_published(run, source):
        text = text.replace(html.escape(value), "(not published)").replace(value, "(not published)")
    host = (run.started.get("machine") or {}).get("machine")
    if host:
        text = text.replace(f"<th>machine</th><td>{html.escape(str(host))}</td>",
                            "<th>machine</th><td>(not published)</td>")
    return text


def check_destination(source: str, out_dir: Path, *, overwrite: bool) -> None:
    """Before any work: the folder is not the run, inside it or around it, and `--overwrite`
    replaces only a folder this tool wrote (its files alone, its config.json naming dali_imagenet)."""
    if not s3.is_s3(source):
        refuse_overlap(out_dir, source, output_name="OUT_DIR", source_name="the run")
    check_output_folder(out_dir, lambda name: name in FOLDER_FILES, what="a published folder", marker=published.CONFIG)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(f"{out_dir}: holds a published folder; pass --overwrite to replace it (the Hub keeps "
                             f"every revision it had)")
        if not wrote_it(out_dir):
            raise UsageError(f"{out_dir}: its {published.CONFIG} is not one publish.py wrote (no dali_imagenet "
                             f"section): not replaced")


def wrote_it(folder: Path) -> bool:
    """Whether `folder`'s config.json is one publish.py wrote (it has the dali_imagenet section)."""
    try:
        written = json.loads((folder / published.CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and published.SECTION in written


def build(source: str, out_dir: str | Path, *, overwrite: bool, hub_repo: str | None = None,
          license: str = "apache-2.0", data_name: str | None = None) -> Built:
    """Writes the folder (whole, then renamed into place: a failed build leaves no half folder)."""
    out_dir = Path(out_dir)
    check_destination(source, out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=out_dir.parent) as scratch:
        run_folder = local_run(source, Path(scratch) / "run")
        run = read_run(run_folder, name=Path(source.rstrip("/")).name)
        loaded = load_model(checkpoint_of(run_folder), which="auto")
        staging = Path(scratch) / "out"
        staging.mkdir()
        state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
        summary = {**loaded.summary, "run": run.name}
        data_name = data_name or data_source_name(run, Path(scratch))
        written = published.write(staging, state, arch=loaded.arch, num_classes=loaded.num_classes,
                                  config=loaded.config, class_names=loaded.class_names, weights=loaded.weights,
                                  summary=summary, license=license)
        (staging / CURVES).write_bytes(base64.b64decode(validation_curves([run]).split(",", 1)[1]))
        page = run_folder / REPORT if (run_folder / REPORT).is_file() else write_report([run_folder], staging / REPORT)
        (staging / REPORT).write_text(scrubbed_page(page.read_text(), run, source))
        (staging / "README.md").write_text(card(run, loaded, stock=written.stock, timm_name=written.architecture,
                                                hub_repo=hub_repo, folder_name=out_dir.name, license=license,
                                                predictions=run_folder / PREDICTIONS, data_name=data_name))
        for path in staging.iterdir():
            path.chmod(0o644)  # files to share (a temporary folder's files are the owner's only)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return Built(out_dir, written.stock, run, loaded.weights, loaded.class_names)
