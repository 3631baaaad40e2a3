"""Which model, exactly, answered: a name and a revision for what `load_model` read, so that an
answer can be traced to the very weights (a server's clients, a log, a cache key)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from dali_imagenet.run import published


def model_identity(source: str | Path) -> dict:
    """`{"id", "revision"}`: `hf://USER/NAME[@REV]` -> USER/NAME and the commit its files came from
    (their snapshot's folder in the Hub's cache, which is named by the commit); a local checkpoint
    or published folder -> its folder/file name and `sha256:` + the first 16 hex digits of its
    weights file's hash (a file rewritten in place gets a new revision)."""
    text = str(source)
    if text.startswith(published.HF):
        folder = published.fetch(text)  # already in the cache: load_model fetched it
        return {"id": text[len(published.HF):].partition("@")[0], "revision": folder.name}
    path = Path(source)
    weights = path
    if path.is_dir():  # ours hold model.safetensors; anyone's timm folder may hold pytorch_model.bin instead
        weights = next((path / n for n in (published.WEIGHTS, "pytorch_model.bin") if (path / n).is_file()),
                       path / published.CONFIG)
    name = path.name if path.is_dir() else f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    digest = hashlib.sha256()
    with open(weights, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"id": name, "revision": f"sha256:{digest.hexdigest()[:16]}"}
