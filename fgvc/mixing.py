"""Batch-level mixing: Mixup, CutMix and SnapMix. A batch goes in, a mixed batch with soft targets comes out.

Every mix pairs sample i with sample B-1-i (timm's convention: the batch flipped; torchvision rolls by one instead).
The mixed batch carries:
- "image": the mixed images;
- "target": the mixed label distribution, lam e_a + (1 - lam) e_b (SnapMix: rho_a e_a + rho_b e_b, which need not
  sum to 1), WITHOUT label smoothing: the criterion smooths once, and smoothing is linear, so smoothing a mixed
  target equals mixing smoothed targets (fgvc.losses);
- "label": the dominant image's label (the larger weight), for what needs one class per image (accuracy, the
  center loss);
- "parts" and "bbox": the dominant image's, with every part that the other image's pixels now cover marked not
  visible, so part-based metrics and losses never read a part that was pasted over (Mixup covers nothing, it blends).

Randomness comes from a numpy Generator the caller seeds from the batch's position (epoch, batch index), so a
resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fgvc.boxes import box_area, clip_boxes
from fgvc.data.loader import derived_seed
from fgvc.errors import OptionError

MIXING_STREAM = 1  # keeps the mixing draws apart from the augmentation draws of the same (seed, epoch, index)

Box = tuple[int, int, int, int]  # fgvc.boxes with integer corners: x0, y0, x1, y1, so image[..., y0:y1, x0:x1]


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


def mixup(images: torch.Tensor, lam: float) -> torch.Tensor:
    """lam x_i + (1 - lam) x_partner(i) (Zhang et al. 2018)."""
    return images * lam + images.flip(0) * (1 - lam)


def cutmix_box(height: int, width: int, lam: float, center_yx: tuple[int, int]) -> Box:
    """The CutMix box (Yun et al. 2019) for `lam`: sides int(sqrt(1 - lam) x the image's), around the centre
    (row, column), clipped to the image. Sides split around the centre as timm splits them, so the two agree box for
    box (and the centre is drawn row first, as timm draws it)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = center_yx
    return (int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cy - cut_h // 2, 0, height)),
            int(np.clip(cx + (cut_w + 1) // 2, 0, width)), int(np.clip(cy + (cut_h + 1) // 2, 0, height)))


def random_box(height: int, width: int, lam: float, rng: np.random.Generator) -> Box:
    """cutmix_box with a centre drawn uniformly over the pixels."""
    return cutmix_box(height, width, lam, (int(rng.integers(0, height)), int(rng.integers(0, width))))


def cutmix(images: torch.Tensor, box: Box) -> tuple[torch.Tensor, float]:
    """The partner's pixels pasted into `box`, and lam recomputed from the clipped box: 1 - box area / image area."""
    x0, y0, x1, y1 = box
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
    return mixed, 1.0 - box_area(box) / (images.shape[-2] * images.shape[-1])


def snapmix(images: torch.Tensor, cams: torch.Tensor, target_box: Box,
            source_box: Box) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SnapMix (Huang et al. 2021): the partner's `source_box`, resized (bilinear), pasted into `target_box`.

    cams: B x H x W class activation maps of the true classes at image size, each summing to 1. Returns the mixed
    images and the label weights rho_a = 1 - (a's CAM mass inside target_box) and rho_b = (the partner's CAM mass
    inside source_box), which need not sum to 1.
    """
    if box_area(target_box) == 0 or box_area(source_box) == 0:
        ones = images.new_ones(len(images))
        return images, ones, torch.zeros_like(ones)
    (tx0, ty0, tx1, ty1), (sx0, sy0, sx1, sy1) = target_box, source_box
    mixed = images.clone()
    patch = images.flip(0)[:, :, sy0:sy1, sx0:sx1]
    mixed[:, :, ty0:ty1, tx0:tx1] = F.interpolate(patch, size=(ty1 - ty0, tx1 - tx0), mode="bilinear",
                                                  align_corners=False)
    rho_a = 1.0 - cams[:, ty0:ty1, tx0:tx1].sum(dim=(1, 2))
    rho_b = cams.flip(0)[:, sy0:sy1, sx0:sx1].sum(dim=(1, 2))
    return mixed, rho_a, rho_b


def normalized_cams(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x h x w maps -> B x H x W at image size, minimum subtracted, summing to 1 (SnapMix's normalization). A
    constant map (no evidence anywhere) becomes uniform, so its mass in a box is the box's share of the image."""
    maps = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    maps = maps - maps.flatten(1).min(dim=1).values[:, None, None]
    total = maps.sum(dim=(1, 2), keepdim=True)
    uniform = torch.full_like(maps, 1.0 / (size[0] * size[1]))
    return torch.where(total > 0, maps / total.clamp_min(torch.finfo(maps.dtype).tiny), uniform)


def covered(points: torch.Tensor, box: Box) -> torch.Tensor:
    """Whether pixel-centre (x, y) points (... x 2) lie in the pixels of `box` (pixel k spans [k - 0.5, k + 0.5))."""
    x0, y0, x1, y1 = box
    x, y = points[..., 0], points[..., 1]
    return (x >= x0 - 0.5) & (x < x1 - 0.5) & (y >= y0 - 0.5) & (y < y1 - 0.5)


def moved_into(points: torch.Tensor, source: Box, target: Box) -> torch.Tensor:
    """Pixel-centre points of `source` at their place after `source` is resized onto `target`."""
    (sx0, sy0, sx1, sy1), (tx0, ty0, tx1, ty1) = source, target
    x = tx0 - 0.5 + (points[..., 0] - sx0 + 0.5) * (tx1 - tx0) / (sx1 - sx0)
    y = ty0 - 0.5 + (points[..., 1] - sy0 + 0.5) * (ty1 - ty0) / (sy1 - sy0)
    return torch.stack([x, y], dim=-1)


class Mixer:
    """The mixing of one training batch: SnapMix with probability snapmix_prob, otherwise Mixup or CutMix with
    probability mix_prob (CutMix with probability switch_prob when both are on). An alpha of 0 turns a method off;
    each lam (SnapMix: each box's) is drawn from Beta(alpha, alpha)."""

    def __init__(self, num_classes: int, seed: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, switch_prob: float = 0.5, snapmix_prob: float = 0.0,
                 snapmix_alpha: float = 1.0) -> None:
        for name, value in (("mix_prob", mix_prob), ("switch_prob", switch_prob), ("snapmix_prob", snapmix_prob)):
            if not 0 <= value <= 1:
                raise OptionError(name, f"must be in [0, 1], got {value}")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha),
                            ("snapmix_alpha", snapmix_alpha)):
            if value < 0:
                raise OptionError(name, f"must be >= 0, got {value}")
        if snapmix_prob > 0 and snapmix_alpha == 0:
            raise OptionError("snapmix_prob", "> 0 needs `snapmix_alpha` > 0")
        self.num_classes, self.seed = num_classes, seed
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = mixup_alpha, cutmix_alpha, mix_prob
        self.switch_prob, self.snapmix_prob, self.snapmix_alpha = switch_prob, snapmix_prob, snapmix_alpha

    @property
    def enabled(self) -> bool:
        mixes = self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)
        return mixes or self.snapmix_prob > 0

    def __call__(self, batch: dict, model, *, epoch: int, index: int) -> dict:
        """Mix batch `index` of `epoch`; its random draws depend on (seed, epoch, index) only."""
        return self.mix(batch, model, np.random.default_rng(derived_seed(self.seed, epoch, index, MIXING_STREAM)))

    def mix(self, batch: dict, model, rng: np.random.Generator) -> dict:
        if self.snapmix_prob > 0 and rng.random() < self.snapmix_prob:
            return self.snapmix(batch, model, rng)
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0) or rng.random() >= self.mix_prob:
            return {**batch, "target": one_hot(batch["label"], self.num_classes)}
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha) if use_cutmix
                    else rng.beta(self.mixup_alpha, self.mixup_alpha))
        images = batch["image"]
        if not use_cutmix:
            return self._mixed(batch, mixup(images, lam), lam, 1.0 - lam, covered_box=None, source_box=None)
        box = random_box(images.shape[-2], images.shape[-1], lam, rng)
        mixed, lam = cutmix(images, box)
        return self._mixed(batch, mixed, lam, 1.0 - lam, covered_box=box, source_box=box)

    def snapmix(self, batch: dict, model, rng: np.random.Generator) -> dict:
        images = batch["image"]
        size = images.shape[-2:]
        # The maps come from an extra no-grad pass in the model's current (training) mode, as in the authors' code:
        # batch statistics for the backbone's norms, whose running averages this pass also updates.
        cams = normalized_cams(model.class_activation_maps(images, batch["label"]), size)
        target_box = random_box(*size, float(rng.beta(self.snapmix_alpha, self.snapmix_alpha)), rng)
        source_box = random_box(*size, float(rng.beta(self.snapmix_alpha, self.snapmix_alpha)), rng)
        mixed, rho_a, rho_b = snapmix(images, cams, target_box, source_box)
        if box_area(target_box) == 0 or box_area(source_box) == 0:
            target_box = source_box = None
        return self._mixed(batch, mixed, rho_a, rho_b, covered_box=target_box, source_box=source_box)

    def _mixed(self, batch: dict, images: torch.Tensor, weight_a, weight_b, *, covered_box: Box | None,
               source_box: Box | None) -> dict:
        labels = batch["label"]
        weight_a = torch.as_tensor(weight_a, dtype=torch.float32, device=labels.device).expand(len(labels))
        weight_b = torch.as_tensor(weight_b, dtype=torch.float32, device=labels.device).expand(len(labels))
        partner = labels.flip(0)
        target = weight_a[:, None] * one_hot(labels, self.num_classes) + weight_b[:, None] * one_hot(
            partner, self.num_classes)
        a_dominant = weight_a >= weight_b
        mixed = {**batch, "image": images, "target": target, "label": torch.where(a_dominant, labels, partner)}
        if "parts" in batch:
            mixed["parts"] = self._parts(batch["parts"], a_dominant, covered_box, source_box)
        if "bbox" in batch:
            mixed["bbox"] = self._boxes(batch["bbox"], a_dominant, covered_box, source_box)
        return mixed

    @staticmethod
    def _parts(parts: torch.Tensor, a_dominant: torch.Tensor, covered_box: Box | None,
               source_box: Box | None) -> torch.Tensor:
        """Parts of the dominant image as they now appear: a's outside the pasted box; the partner's inside it
        (moved with the paste); blending (no box) hides nothing."""
        own, partner = parts, parts.flip(0).clone()
        if covered_box is not None:  # a hidden part is (0, 0, 0), as in CUB's files and fgvc.data.transforms
            own = torch.where(covered(own[..., :2], covered_box)[..., None], torch.zeros_like(own), own)
            inside = covered(partner[..., :2], source_box) & (partner[..., 2] > 0)
            partner[..., :2] = moved_into(partner[..., :2], source_box, covered_box)
            partner = torch.where(inside[..., None], partner, torch.zeros_like(partner))
        return torch.where(a_dominant[:, None, None], own, partner)

    @staticmethod
    def _boxes(boxes: torch.Tensor, a_dominant: torch.Tensor, covered_box: Box | None,
               source_box: Box | None) -> torch.Tensor:
        """The dominant image's object box: a's as it was (partly covered, perhaps); the partner's cut to what was
        pasted and moved with it."""
        partner = boxes.flip(0)
        if covered_box is not None:
            kept = clip_boxes(partner, source_box)
            corners = kept.view(-1, 2, 2) - 0.5  # edges as pixel centres, so that they move as pixels do
            moved = (moved_into(corners, source_box, covered_box) + 0.5).flatten(1)
            partner = torch.where((kept[:, 2:] > kept[:, :2]).all(dim=1, keepdim=True), moved, torch.zeros_like(kept))
        return torch.where(a_dominant[:, None], boxes, partner)
