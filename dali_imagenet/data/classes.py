"""Class names: the ImageNet-1K list that ships with the package, and names fit for display."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from dali_imagenet.errors import DaliImagenetError

IMAGENET1K_TSV = Path(__file__).with_name("imagenet1k_classes.tsv")


class ClassListError(DaliImagenetError):
    """The shipped class list is damaged (a broken install)."""


@lru_cache(maxsize=1)
def imagenet1k() -> tuple[tuple[str, str], ...]:
    """(synset, names) for the 1000 classes, by index (sorted synset order, as the hub, torchvision
    and timm number them)."""
    rows = []
    for line in IMAGENET1K_TSV.read_text().splitlines()[1:]:
        index, synset, names = line.split("\t")
        if int(index) != len(rows):
            raise ClassListError(f"{IMAGENET1K_TSV}: row {index} is out of order (expected {len(rows)})")
        rows.append((synset, names))
    return tuple(rows)


def display_names(names: list[str], synsets: list[str | None] | None = None) -> list[str]:
    """Short, unique labels: the first name of each class ("tench, Tinca tinca" -> "tench"); a
    name two classes share gets its synset (ImageNet has two "crane"s: the bird and the machine)."""
    short = [name.split(",")[0].strip() or f"class {i}" for i, name in enumerate(names)]
    synsets = synsets or [None] * len(names)
    seen: dict[str, int] = {}
    for name in short:
        seen[name] = seen.get(name, 0) + 1
    return [f"{name} ({synsets[i] or i})" if seen[name] > 1 else name for i, name in enumerate(short)]
