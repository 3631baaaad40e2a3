"""The model card: a published folder's README.md, as the Hub renders it (YAML metadata, then
Markdown): what the model is, its accuracy, what the run cost, the curves, the classes it gets most
and least right, how to load it, and the recipe."""
from __future__ import annotations

from pathlib import Path

import yaml

from dali_imagenet.report.html_report import Run
from dali_imagenet.run.metrics import describe_cost

SHOWN_CLASSES = 5  # worst and best


def card(run: Run, loaded, *, stock: bool, hub_repo: str | None, local: Path, predictions: Path,
         license: str) -> str:
    """`loaded`: the published weights (`inference.LoadedModel`)."""
    meta = {"license": license, "library_name": "timm" if stock else "pytorch", "pipeline_tag": "image-classification",
            "tags": ["image-classification", "dali-imagenet", *(["timm"] if stock else [])], "metrics": ["accuracy"]}
    name = hub_repo or run.name
    parts = [f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n", f"# {name}\n", _what(run, loaded, stock),
             _results(run, loaded), "## Curves\n\n![validation curves](curves.png)\n",
             _classes(loaded, predictions), _how_to_load(hub_repo, local, stock, loaded.arch),
             _recipe(run)]
    return "\n".join(part for part in parts if part)


def _what(run: Run, loaded, stock: bool) -> str:
    arch = loaded.arch
    network = f"timm's `{arch[len('timm:'):]}`" if arch.startswith("timm:") else \
        f"this project's {loaded.config.network}"
    if stock:
        kind = "timm builds it as it is: `timm.create_model` below gives this network and these logits."
    else:
        kind = ("**Not a timm architecture**: its BlurPool low-passes the input of each strided convolution (FFCV's "
                "placement), which timm's `resnetblur*` does not (it blurs after a stride-1 conv); timm refuses "
                "this folder by name rather than build a different network. Load it with dali-imagenet (below).")
    data = run.started.get("data") or "?"
    return (f"An image classifier: {network}, {loaded.num_classes} classes, trained from "
            f"{_start(run)} with dali-imagenet (JPEG decoding and augmentation on the GPU "
            f"with NVIDIA DALI). Data: `{data}`. The weights are the run's best: its **{loaded.weights}** "
            f"weights. {kind}\n")


def _start(run: Run) -> str:
    init = run.started.get("init")
    return f"the weights of `{init['source']}`" if init else "random weights"


def _results(run: Run, loaded) -> str:
    final, config = run.final, loaded.config
    if not final:
        return "## Results\n\nNo validation was recorded.\n"
    rows = [("raw", final["val_top1"], final["val_top5"])]
    if "val_ema_top1" in final:
        rows.append(("EMA", final["val_ema_top1"], final.get("val_ema_top5", float("nan"))))
    table = "\n".join(f"| {config.val_image_size} px (crop {config.val_crop_fraction:g}) | {which}"
                      f"{' (published)' if which.lower() == loaded.weights else ''} | {top1:.2f} | {top5:.2f} |"
                      for which, top1, top5 in rows)
    lines = [f"- epochs: {final.get('epoch', '?')} of {run.config.get('epochs', '?')}, "
             f"{run.ended.get('step', '?')} steps, batch {run.config.get('batch_size', '?')}",
             f"- state: {run.state()}"]
    if run.ended.get("cost"):
        lines.append(f"- time and cost: {describe_cost(run.ended['cost'])}")
    machine = run.started.get("machine", {})
    lines.append(f"- machine: {machine.get('gpu') or 'no GPU'}, {machine.get('cpu_count', '?')} CPUs")
    rate = run.median_rate()
    if rate:
        lines.append(f"- median training rate: {rate:,.0f} images/s")
    return (f"## Results\n\nThe final validation ({final.get('val_images', '?'):,} images):\n\n"
            f"| val size | weights | top-1 % | top-5 % |\n| --- | --- | ---: | ---: |\n{table}\n\n"
            + "\n".join(lines) + "\n")


def _classes(loaded, predictions: Path) -> str:
    from dali_imagenet.data.classes import display_names
    from dali_imagenet.errors import DaliImagenetError
    from dali_imagenet.inference.predictions import Predictions

    if not predictions.is_file():
        return ""
    try:
        found = Predictions.load(predictions)
    except DaliImagenetError:
        return ""
    names = display_names(loaded.class_names) if loaded.class_names else [f"class {i}" for i in
                                                                          range(loaded.num_classes)]
    rows = sorted((c for c in found.per_class(len(names)) if c["images"]), key=lambda c: (c["top1"], c["index"]))

    def listed(chosen):
        return "\n".join(f"| {names[c['index']]} | {c['images']} | {c['top1']:.1f} |" for c in chosen)

    head = "| class | val images | top-1 % |\n| --- | ---: | ---: |\n"
    shown = min(SHOWN_CLASSES, len(rows) // 2)  # no class in both lists
    return (f"## The classes it gets least and most right\n\nOf the final validation ({found.weights} weights); "
            f"every class, the most confused pairs and example images with Grad-CAM are in `report.html`.\n\n"
            f"Least:\n\n{head}{listed(rows[:shown])}\n\nMost:\n\n{head}"
            f"{listed(rows[::-1][:shown])}\n")


def _how_to_load(hub_repo: str | None, local: Path, stock: bool, arch: str) -> str:
    source = f"hf://{hub_repo}" if hub_repo else str(local)
    timm_id = f"hf-hub:{hub_repo}" if hub_repo else f"local-dir:{local}"
    lines = ["## How to load it\n"]
    if stock:
        lines.append(f"With timm (`pip install timm`), preprocessing from the model's own config:\n\n```python\n"
                     f"import timm\n\nmodel = timm.create_model(\"{timm_id}\", pretrained=True).eval()\n"
                     f"transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))\n"
                     f"```\n")
    lines.append(f"With dali-imagenet (top-5 of photos; the demo with Grad-CAM; accuracy on shards):\n\n```bash\n"
                 f"python predict.py photo.jpg --checkpoint {source}\n"
                 f"python app.py --checkpoint {source}\n"
                 f"python evaluate.py --checkpoint {source} --data SHARDS --dali\n```\n")
    return "\n".join(lines)


def _recipe(run: Run) -> str:
    return ("## Recipe\n\nThe run's config (`train.py --config` takes it as it is):\n\n```yaml\n"
            + yaml.safe_dump(run.config, sort_keys=True) + "```\n")
