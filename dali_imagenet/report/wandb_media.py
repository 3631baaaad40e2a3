"""What the run's page shows, for Weights & Biases: at the final validation, every class's
accuracy, the most confused pairs and the example images (true and predicted class, the Grad-CAM
heat maps) as W&B Tables of Images. The page itself goes up as an artifact (`RunLogger.close`)."""
from __future__ import annotations

from pathlib import Path

from dali_imagenet.report.html_report import newest_checkpoint, read_run
from dali_imagenet.report.run_results import CONFUSIONS, class_names, examples
from dali_imagenet.run.run_folder import PREDICTIONS


def wandb_media(run_dir: str | Path) -> dict:
    """{name: wandb object} for `wandb.log`; {} when the run has no final validation's predictions."""
    import wandb

    from dali_imagenet.inference.predictions import Predictions

    run = read_run(run_dir)
    if not (Path(run_dir) / PREDICTIONS).is_file():
        return {}
    predictions = Predictions.load(Path(run_dir) / PREDICTIONS)
    names = class_names(newest_checkpoint(run)[1], predictions)
    per_class = wandb.Table(columns=["class", "name", "val images", "top-1 right", "top-1 %"],
                            data=[[c["index"], names[c["index"]], c["images"], c["correct"], c["top1"]]
                                  for c in predictions.per_class(len(names)) if c["images"]])
    confused = wandb.Table(columns=["true class", "predicted as", "images", "% of the class"],
                           data=[[names[p["true"]], names[p["predicted"]], p["count"], 100 * p["share"]]
                                 for p in predictions.confusions(CONFUSIONS)])
    found = examples(run, predictions)
    shown = wandb.Table(columns=["key", "image", "true", "predicted", "confidence", "right", "crop", "grad-cam"])
    for example in found.items:
        crop, heat = example.cam or (None, None)
        shown.add_data(example.key, wandb.Image(example.image), names[example.true], names[example.predicted],
                       example.confidence, not example.wrong, crop and wandb.Image(crop), heat and wandb.Image(heat))
    return {"val/per_class": per_class, "val/confusions": confused, "val/examples": shown}
