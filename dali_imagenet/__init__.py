"""GPU-first ImageNet data path (NVIDIA DALI) and ResNet training pieces.

Importing the package is cheap: `make_loader` pulls in DALI and PyTorch only when first used.
"""

__all__ = ["make_loader"]


def __getattr__(name):
    if name == "make_loader":
        from dali_imagenet.loader import make_loader

        return make_loader
    raise AttributeError(f"module 'dali_imagenet' has no attribute {name!r}")
