"""The model card: a published folder's README.md, as the Hub renders it. Its metadata is built
with huggingface_hub's `ModelCardData`, so that the Hub reads what it shows: the library, tags,
the training data (`datasets`), the model it was fine-tuned from (`base_model`: the model tree),
the licence (one of the Hub's identifiers, checked) and the final validation's top-1 and top-5 as
eval results (`model-index`). Then Markdown: what the model is, the project that trained it (its
URL, its install line), its accuracy, what the run cost, the curves, the classes it gets most and
least right, how to load it, and the recipe. Nothing of the publisher's machine: no path, no
bucket, no host name."""
from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from dali_imagenet.errors import UsageError
from dali_imagenet.report.html_report import RunRecords
from dali_imagenet.run.cost import describe_cost

SHOWN_CLASSES = 5  # worst and best
PROJECT_URL = "https://github.com/dali-imagenet/dali-imagenet"
INSTALL = f"pip install git+{PROJECT_URL}"
# The Hub's licence identifiers, as its documentation lists them (hub-docs, repositories-licenses.md,
# August 2026). "other" needs a license_name and a LICENSE file, which publish.py does not write.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
openmdw-1.0 openmdw-1.1 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 grok2-community gemma unknown
""".split())


def check_license(license: str) -> None:
    """Raises, in one line, unless `license` is one of the Hub's identifiers."""
    if license in HUB_LICENSES:
        return
    if license == "other":
        raise UsageError("--license other: the Hub then needs a license_name and a LICENSE file, which publish.py "
                         "does not write; name one of the Hub's identifiers")
    close = difflib.get_close_matches(license.lower(), sorted(HUB_LICENSES), n=3, cutoff=0.6)
    raise UsageError(f"--license {license}: not one of the Hub's licence identifiers"
                     + (f" (close: {', '.join(close)})" if close else "")
                     + "; the list: https://huggingface.co/docs/hub/repositories-licenses")


def base_model(run: RunRecords) -> str | None:
    """The Hub repo a run started from (`--init hf://REPO`, or timm's own weights for its arch)."""
    source = (run.started.get("init") or {}).get("source") or ""
    if source.startswith("hf://"):
        return source[len("hf://"):].partition("@")[0]
    arch = run.config.get("arch", "")
    if source == f"{arch} pretrained" and arch.startswith("timm:"):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(arch[len("timm:"):])
        return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None
    return None


def metadata(run: RunRecords, loaded, *, stock: bool, name: str, license: str, data_name: str | None):
    """The card's `ModelCardData`: what the Hub indexes and shows beside the card."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    scores = _published_scores(run, loaded)
    if scores:
        size = loaded.config.val_image_size
        for metric, value, label in (("accuracy", scores[0], "top-1"), ("top_5_accuracy", scores[1], "top-5")):
            results.append(EvalResult(task_type="image-classification", dataset_type=data_name or "custom",
                                      dataset_name=data_name or "the run's own data", dataset_split="validation",
                                      metric_type=metric, metric_value=round(value, 2),
                                      metric_name=f"{label} accuracy (%) at {size} px"))
    return ModelCardData(license=license, library_name="timm" if stock else "pytorch",
                         pipeline_tag="image-classification", datasets=[data_name] if data_name else None,
                         base_model=base_model(run), metrics=["accuracy"], model_name=name,
                         tags=["image-classification", "dali-imagenet", *(["timm"] if stock else ["blurpool"])],
                         eval_results=results or None)


def _published_scores(run: RunRecords, loaded) -> tuple[float, float] | None:
    """The final validation's (top-1, top-5) of the published weights."""
    final = run.final
    key = "val_ema" if loaded.weights == "ema" else "val"
    if f"{key}_top1" not in final or f"{key}_top5" not in final:
        return None
    return final[f"{key}_top1"], final[f"{key}_top5"]


def card(run: RunRecords, loaded, *, stock: bool, timm_name: str, hub_repo: str | None, folder_name: str,
         predictions: Path, license: str, data_name: str | None) -> str:
    """`loaded`: the published weights (`inference.LoadedModel`); `timm_name`: the architecture
    its config.json names."""
    name = hub_repo or run.name
    meta = metadata(run, loaded, stock=stock, name=name, license=license, data_name=data_name)
    parts = [f"---\n{meta.to_yaml()}\n---\n", f"# {name}\n", _what(run, loaded, stock, timm_name, data_name),
             _results(run, loaded), "## Curves\n\n![validation curves](curves.png)\n",
             _classes(loaded, predictions), _how_to_load(hub_repo, folder_name, stock, timm_name),
             _recipe(run)]
    return "\n".join(part for part in parts if part)


def _what(run: RunRecords, loaded, stock: bool, timm_name: str, data_name: str | None) -> str:
    arch = loaded.arch
    network = f"timm's `{arch[len('timm:'):]}`" if arch.startswith("timm:") else \
        f"this project's {loaded.config.network}"
    if stock:
        kind = (f"timm builds it as it is (`{timm_name}`): `timm.create_model` below gives this network and these "
                f"logits.")
    else:
        kind = (f"Its BlurPool low-passes the input of each strided convolution (FFCV's placement), which timm's "
                f"`resnetblur*` does not (it blurs after a stride-1 conv), so it is not one of timm's own networks: "
                f"`import dali_imagenet` registers it in timm as `{timm_name}` (below); without it, timm refuses "
                f"this repo by name rather than build a different network.")
    return (f"An image classifier: {network}, {loaded.num_classes} classes, trained from {_start(run)} on "
            f"{f'`{data_name}`' if data_name else 'data it does not name'} with "
            f"[dali-imagenet]({PROJECT_URL}) (JPEG decoding and augmentation on the GPU with NVIDIA DALI; "
            f"`{INSTALL}`). The weights are the run's best: its **{loaded.weights}** weights. {kind}\n")


def _start(run: RunRecords) -> str:
    if not run.started.get("init"):
        return "random weights"
    base = base_model(run)
    return f"the weights of [`{base}`](https://huggingface.co/{base})" if base else "other weights (not published)"


def _results(run: RunRecords, loaded) -> str:
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


def _how_to_load(hub_repo: str | None, folder_name: str, stock: bool, timm_name: str) -> str:
    source = f"hf://{hub_repo}" if hub_repo else folder_name
    timm_id = f"hf-hub:{hub_repo}" if hub_repo else f"local-dir:{folder_name}"
    lines = ["## How to load it\n"]
    install, register = ("pip install timm", "") if stock else (
        INSTALL, f"import dali_imagenet  # registers {timm_name} (FFCV's BlurPool placement) in timm\n")
    lines.append(f"With timm (`{install}`), preprocessing from the model's own config:\n\n```python\n"
                 f"{register}import timm\n\nmodel = timm.create_model(\"{timm_id}\", pretrained=True).eval()\n"
                 f"transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))\n"
                 f"```\n")
    lines.append(f"With [dali-imagenet]({PROJECT_URL})'s scripts, from a clone of it (top-5 of photos; the demo "
                 f"with Grad-CAM; accuracy on shards):\n\n```bash\n"
                 f"python predict.py photo.jpg --checkpoint {source}\n"
                 f"python app.py --checkpoint {source}\n"
                 f"python evaluate.py --checkpoint {source} --data SHARDS --dali\n```\n")
    return "\n".join(lines)


def _recipe(run: RunRecords) -> str:
    return ("## Recipe\n\nThe run's config (`train.py --config` takes it as it is):\n\n```yaml\n"
            + yaml.safe_dump(run.config, sort_keys=True) + "```\n")
