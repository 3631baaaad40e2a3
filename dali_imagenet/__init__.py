"""GPU-first ImageNet data path (NVIDIA DALI) and ResNet training pieces, in layers that import
only downward:

    data/      the shards, the DALI and baseline loaders, preprocessing: `make_loader`
    training/  the networks, the step, mixing, EMA, precision, schedule, recipe, evaluation
    run/       checkpoints (written, read), --init, resume, the run folder, outputs and S3, spot, exits
    inference/ a trained model put to use: prediction, Grad-CAM, the final validation's predictions
    report/    the pages people read: a run's page, an index of runs (and its tables for W&B)
    sharing/   a run published: timm's format with a model card, the Hugging Face Hub, a Space
    errors, s3, retry, seeding, distributed, atomic (a file replaced whole): what every layer shares;
    config: a run's description

Importing the package is cheap: `make_loader` pulls in DALI and PyTorch only when first used.
It registers this project's BlurPool ResNets in timm (`training/timm_models.py`: `resnet50_ffcvblur`,
...) without importing timm: at once if timm is already imported, else right after timm is.
"""
import importlib.abc
import importlib.util
import sys

__all__ = ["make_loader"]


class _RegisterAfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `timm` through the rest of sys.meta_path, once, and registers our models in it as soon
    as it has been executed (timm's own import seconds are paid only by who imports timm)."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # timm keeps its own loader (its resources)
        self.loader.exec_module(module)
        from dali_imagenet.training.timm_models import register

        register()


if "timm" in sys.modules:
    from dali_imagenet.training.timm_models import register as _register

    _register()
elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())


def __getattr__(name):
    if name == "make_loader":
        from dali_imagenet.data.loader import make_loader

        return make_loader
    raise AttributeError(f"module 'dali_imagenet' has no attribute {name!r}")
