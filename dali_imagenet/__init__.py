"""GPU-first ImageNet data path (NVIDIA DALI) and ResNet training pieces, in layers that import
only downward:

    data/      the shards, the DALI and baseline loaders, preprocessing: `make_loader`
    training/  the networks, the step, mixing, EMA, precision, schedule, recipe, evaluation
    run/       checkpoints (written, read), --init, resume, the run folder, outputs and S3, spot, exits
    inference/ a trained model put to use: prediction, Grad-CAM, the final validation's predictions
    report/    the pages people read: a run's page, an index of runs (and its tables for W&B)
    sharing/   a run published: timm's format with a model card, the Hugging Face Hub, a Space
    errors, s3, retry, seeding, distributed: what every layer shares; config: a run's description

Importing the package is cheap: `make_loader` pulls in DALI and PyTorch only when first used.
"""

__all__ = ["make_loader"]


def __getattr__(name):
    if name == "make_loader":
        from dali_imagenet.data.loader import make_loader

        return make_loader
    raise AttributeError(f"module 'dali_imagenet' has no attribute {name!r}")
