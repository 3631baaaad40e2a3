"""A small ImageNet-like dataset written in exactly the Hugging Face hub's parquet format.

Each class is a visibly different drawing (shape and palette) on a noisy textured background,
so a few epochs of training reach accuracy far above chance. Images are 300-500 px a side and
~50-150 KB, like ImageNet's, and a few of them are the odd files the real train split holds
(CMYK JPEG, grayscale JPEG, PNG bytes behind a .JPEG name).

    python -m shard_tools.sample OUTDIR [--train-per-class 60] [--val-per-class 20] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# (name, shape, foreground RGB, background RGB); the synset-like ids sort in label order.
CLASSES = [
    ("red disc", "disc", (220, 40, 40), (40, 60, 90)),
    ("green square", "square", (40, 200, 60), (90, 60, 40)),
    ("blue triangle", "triangle", (40, 80, 230), (200, 190, 120)),
    ("yellow ring", "ring", (235, 220, 40), (60, 40, 90)),
    ("magenta cross", "cross", (220, 40, 200), (40, 90, 60)),
    ("cyan stripes", "stripes", (40, 210, 220), (110, 30, 30)),
    ("orange star", "star", (245, 140, 30), (30, 50, 120)),
    ("white checker", "checker", (240, 240, 240), (70, 70, 70)),
]
ROWS_PER_ROW_GROUP = 32  # the hub's files have ~100 rows a group; smaller here so files have several


def synset_of(label: int) -> str:
    return f"s{label:08d}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(4, int(r / 4)))
    elif shape == "cross":
        w = max(4, int(r / 3))
        draw.rectangle((cx - w, y0, cx + w, y1), fill=color)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=color)
    elif shape == "stripes":
        step = max(6, int(r / 3))
        for x in range(x0, x1, 2 * step):
            draw.rectangle((x, y0, min(x + step, x1), y1), fill=color)
    elif shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        draw.polygon(points, fill=color)
    elif shape == "checker":
        step = max(6, int(r / 3))
        for i, x in enumerate(range(x0, x1, step)):
            for j, y in enumerate(range(y0, y1, step)):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, min(x + step, x1), min(y + step, y1)), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_image(label: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture of class `label`: a textured background and 1-3 copies of the class's shape."""
    _, shape, fg, bg = CLASSES[label]
    width, height = int(rng.integers(300, 501)), int(rng.integers(300, 501))
    # Smooth colour gradient plus per-pixel noise: the noise is what makes JPEGs ImageNet-sized.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tilt = rng.uniform(-40, 40, size=3)
    base = (
        np.asarray(bg, np.float32) + tilt * (xx[..., None] / width - 0.5) + tilt[::-1] * (yy[..., None] / height - 0.5)
    )
    noise = rng.normal(0, rng.uniform(14, 26), size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        size = int(rng.uniform(0.25, 0.6) * min(width, height))
        x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        jitter = rng.integers(-25, 26, size=3)
        color = tuple(int(c) for c in np.clip(np.asarray(fg) + jitter, 0, 255))
        _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), color)
    return image


def encode(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """JPEG bytes as the hub stores them; `kind` makes one of the real dataset's odd files."""
    out = io.BytesIO()
    quality = int(rng.integers(80, 96))
    if kind == "cmyk":
        image.convert("CMYK").save(out, "JPEG", quality=quality)
    elif kind == "gray":
        image.convert("L").save(out, "JPEG", quality=quality)
    elif kind == "png":
        image.save(out, "PNG", compress_level=1)
    else:
        image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def hf_schema(class_names: list[str]) -> pa.Schema:
    """The hub's arrow schema, with the `huggingface` metadata that carries the ClassLabel names."""
    features = {
        "image": {"_type": "Image"},
        "label": {"_type": "ClassLabel", "names": class_names},
    }
    schema = pa.schema([
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("label", pa.int64()),
    ])
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def write_split(outdir: Path, split: str, per_class: int, num_files: int, seed: int,
                odd_files: bool, unlabelled: bool = False) -> int:
    """Writes `data/{split}-NNNNN-of-MMMMM.parquet`; returns the number of rows. `unlabelled`:
    every label -1 and no synset in the path, as in ImageNet's test split."""
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    rng.shuffle(labels)  # the hub's files are not sorted by class
    # The real train split has CMYK, grayscale and PNG-named-JPEG files; so do we, at fixed rows.
    odd = {1: "cmyk", 7: "gray", 13: "png"} if odd_files else {}
    names = [name for name, *_ in CLASSES]
    schema = hf_schema(names)
    (outdir / "data").mkdir(parents=True, exist_ok=True)
    rows_per_file = math.ceil(len(labels) / num_files)
    for file_index in range(num_files):
        start, stop = file_index * rows_per_file, min(len(labels), (file_index + 1) * rows_per_file)
        images, row_labels = [], []
        for row in range(start, stop):
            label = int(labels[row])
            data = encode(draw_image(label, rng), odd.get(row, "jpeg"), rng)
            path = f"{split}_{row:06d}.JPEG" if unlabelled else f"{split}_{row:06d}_{synset_of(label)}.JPEG"
            images.append({"bytes": data, "path": path})
            row_labels.append(-1 if unlabelled else label)
        table = pa.Table.from_pydict({"image": images, "label": row_labels}, schema=schema)
        path = outdir / "data" / f"{split}-{file_index:05d}-of-{num_files:05d}.parquet"
        pq.write_table(table, path, row_group_size=ROWS_PER_ROW_GROUP)
    return len(labels)


def make_sample(outdir: str | Path, train_per_class: int = 60, val_per_class: int = 20,
                seed: int = 0, odd_files: bool = True, test_per_class: int = 0) -> dict[str, int]:
    """`test_per_class`: a test split too, unlabelled (label -1) like ImageNet's."""
    outdir = Path(outdir)
    counts = {
        "train": write_split(outdir, "train", train_per_class, 2, seed, odd_files),
        "validation": write_split(outdir, "validation", val_per_class, 1, seed, False),
    }
    if test_per_class:
        counts["test"] = write_split(outdir, "test", test_per_class, 1, seed, False, unlabelled=True)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="folder to write; parquet files go to OUTDIR/data/")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=0, help="an unlabelled test split too (label -1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-odd-files", dest="odd_files", action="store_false",
                        help="leave out the CMYK / grayscale / PNG rows")
    args = parser.parse_args(argv)
    counts = make_sample(args.outdir, args.train_per_class, args.val_per_class, args.seed, args.odd_files,
                         args.test_per_class)
    total = sum(p.stat().st_size for p in Path(args.outdir, "data").glob("*.parquet"))
    print(f"wrote {counts} ({len(CLASSES)} classes, {total / 1e6:.1f} MB) to {args.outdir}/data")


if __name__ == "__main__":
    main()
