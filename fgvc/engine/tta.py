"""Test-time augmentation: views of an evaluation batch whose predictions are averaged.

Each view function maps a batch of evaluation images (B x 3 x H x W) to a list of batches. The predictions of the
views are averaged as probabilities by default (softmax, then the mean: an ensemble of the views; logit scales can
differ between views, as they do between scales) or as logits on request. TTA figures are always reported apart from
the single-crop figure, never in its place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

View = Callable[[torch.Tensor], list[torch.Tensor]]
AVERAGES = ("probs", "logits")
DEFAULT_SCALES = (0.875, 1.0, 1.125)


def flip_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The image and its mirror."""
    return [images, images.flip(-1)]


def multiscale_views(scales: Sequence[float] = DEFAULT_SCALES) -> View:
    """The evaluation crop resized (bilinear, antialiased) by each factor; the model sees each size as it is."""
    def views(images: torch.Tensor) -> list[torch.Tensor]:
        size = images.shape[-2:]
        return [images if scale == 1.0 else
                F.interpolate(images, size=(round(size[0] * scale), round(size[1] * scale)), mode="bilinear",
                              align_corners=False, antialias=True) for scale in scales]
    return views


def ten_crop_views(crop_size: int) -> View:
    """The four corner crops and the centre crop of `crop_size`, and their mirrors (torchvision's TenCrop). Fed
    with the wider evaluation images (resized, centre square of the resize size) so the crops differ."""
    def views(images: torch.Tensor) -> list[torch.Tensor]:
        return list(TF.ten_crop(images, [crop_size, crop_size]))
    return views


def average_views(logits: list[torch.Tensor], average: str) -> torch.Tensor:
    """One score per class from the views' logits: mean probability (returned as its log, so that it ranks and
    normalizes like logits) or mean logit."""
    if average == "probs":
        return torch.stack([F.softmax(view.float(), dim=-1) for view in logits]).mean(0).log()
    if average == "logits":
        return torch.stack([view.float() for view in logits]).mean(0)
    raise ValueError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")
