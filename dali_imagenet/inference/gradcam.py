"""Grad-CAM (Selvaraju et al., 2017): where a network looked when it chose a class.

The last feature stage's activations (a ResNet's `layer4`, a timm model's last `feature_info`)
A (C x h x w), weighted per channel by the mean gradient of the class's logit over them, summed
over channels, rectified: the regions whose features raised that logit. Upsampled to the input
and drawn over it as a heat map. One forward and one backward pass of one image: a ResNet-50 at
224 px takes well under a second on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

HEAT_ALPHA = 0.45  # the heat map's opacity over the photo


def grad_cam(model: torch.nn.Module, image: torch.Tensor, class_index: int,
             layer: torch.nn.Module | None = None) -> torch.Tensor:
    """The map (H x W, in [0, 1]) for `class_index` of `image` (1 x 3 x H x W, as the model takes
    it); `layer`: the stage whose output is looked at (default: the last, `archs.last_stage`)."""
    from dali_imagenet.training.archs import last_stage

    layer = layer if layer is not None else last_stage(model)
    seen = {}
    hook = layer.register_forward_hook(lambda module, inputs, output: seen.__setitem__("features", output))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(image)
            features = seen["features"]
            gradients, = torch.autograd.grad(logits[0, class_index], features)  # no parameter gradients
    finally:
        hook.remove()
        model.train(was_training)
    if features.dim() != 4:  # a transformer's tokens, not a feature map
        from dali_imagenet.training.archs import ArchError

        raise ArchError(f"Grad-CAM needs a stage with a feature map (N x C x H x W); this model's last stage gives "
                        f"{tuple(features.shape)}")
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True)).detach().float()
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = HEAT_ALPHA):
    """`heat` (H x W in [0, 1]) as a jet colour map over `image` (uint8 3 x H x W): a PIL image."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    colours = colormaps["jet"](heat.cpu().numpy())[..., :3]
    photo = image.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255
    return Image.fromarray((255 * ((1 - alpha) * photo + alpha * colours)).clip(0, 255).astype(np.uint8))
