"""WS-DAN (Hu et al. 2019, "See Better Before Looking Closer"): attention maps, bilinear attention pooling, and
attention-guided crop and drop, with a center loss on the part features.

Training step: the pass on the image gives M attention maps A and part features (A x F through the fused op: signed
sqrt, L2 over M*C); one map per sample (drawn with probability ~ sqrt of its mass) crops the region above a random
threshold (resized back), another erases its region; the three passes' cross-entropies are averaged and the center
loss pulls part features towards moving-average class centers. Test: logits averaged over the image and the crop
of its mean attention map. The defaults of the constants are those of the authors' released code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fgvc.boxes import clip_boxes
from fgvc.errors import OptionError
from fgvc.models.heads import HEADS, Forward, Head
from fgvc_kernels import bilinear_pool


@HEADS.register("wsdan")
class WSDANHead(Head):
    """num_attention_maps: M. Training: crop_threshold and drop_threshold bound the uniform draw of each image's
    crop and drop thresholds; the crop box grows by crop_padding x the image side on each side. Test: the crop is
    where the mean attention map exceeds test_crop_threshold, padded by test_crop_padding. center_loss_weight
    scales the center loss; the class centers move center_momentum of the way towards each batch's part features.
    Part features are multiplied by logit_scale before the classifier."""

    trains_from_features = False  # its crop and drop passes run the backbone on new images

    def __init__(self, in_features: int, num_classes: int, *, num_attention_maps: int = 32, drop_rate: float = 0.0,
                 crop_threshold: Sequence[float] = (0.4, 0.6), drop_threshold: Sequence[float] = (0.2, 0.5),
                 crop_padding: float = 0.1, test_crop_threshold: float = 0.1, test_crop_padding: float = 0.05,
                 center_loss_weight: float = 1.0, center_momentum: float = 0.05, logit_scale: float = 100.0) -> None:
        super().__init__()
        maps = num_attention_maps
        if maps < 2:
            raise OptionError("num_attention_maps", f"must be at least 2 for WS-DAN (one map guides the crop, "
                                                    f"another the drop), got {maps}")
        for name, bounds in (("crop_threshold", crop_threshold), ("drop_threshold", drop_threshold)):
            if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= 1:
                raise OptionError(name, f"must be [low, high] with 0 <= low <= high <= 1, got {list(bounds)}")
        self.crop_threshold, self.drop_threshold = tuple(crop_threshold), tuple(drop_threshold)
        self.crop_padding, self.test_crop_threshold = crop_padding, test_crop_threshold
        self.test_crop_padding, self.logit_scale = test_crop_padding, logit_scale
        self.center_loss_weight, self.center_momentum = center_loss_weight, center_momentum
        self.attention = nn.Sequential(nn.Conv2d(in_features, maps, 1, bias=False), nn.BatchNorm2d(maps),
                                       nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(maps * in_features, num_classes, bias=False)
        # Class centers of the part features: state, not parameters; saved in checkpoints with the weights.
        self.register_buffer("centers", torch.zeros(num_classes, maps * in_features))
        self.pending_centers: torch.Tensor | None = None  # set by defer_updates

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.attention(features)
        parts = bilinear_pool(maps, features)  # scale 1/(HW), signed sqrt (eps 1e-12), L2 over M*C
        return {"logits": self.fc(self.dropout(parts * self.logit_scale)), "attention_maps": maps,
                "part_features": parts}

    def training_losses(self, forward: Forward, batch: dict, outputs: dict[str, torch.Tensor],
                        criterion: nn.Module) -> dict[str, torch.Tensor]:
        images, maps = batch["image"], outputs["attention_maps"].detach().float()
        crop_map, drop_map = choose_maps(maps)
        crop_thresholds = random_thresholds(self.crop_threshold, len(images), images.device)
        crops = crop_and_resize(images, attention_boxes(crop_map, crop_thresholds, images.shape[-2:],
                                                        self.crop_padding))
        drops = attention_drop(images, drop_map, random_thresholds(self.drop_threshold, len(images), images.device))
        raw = criterion(outputs, batch)["loss"]
        crop = criterion(forward(crops), batch)["loss"]
        drop = criterion(forward(drops), batch)["loss"]
        center = self.center_loss(outputs["part_features"], batch["label"])
        loss = (raw + crop + drop) / 3 + self.center_loss_weight * center
        return {"loss": loss, "raw": raw.detach(), "crop": crop.detach(), "drop": drop.detach(),
                "center": center.detach()}

    def refine(self, forward: Forward, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> dict:
        boxes = self.test_crop_boxes(outputs, images.shape[-2:])
        crop_logits = forward(crop_and_resize(images, boxes))["logits"]
        return {**outputs, "logits": (outputs["logits"] + crop_logits) / 2}

    def test_crop_boxes(self, outputs: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The test-time attention crop (x0, y0, x1, y1 in pixel edges) of each image: where the mean attention map
        exceeds test_crop_threshold, padded."""
        mean_map = outputs["attention_maps"].float().mean(dim=1)
        thresholds = torch.full((len(mean_map),), self.test_crop_threshold, device=mean_map.device)
        return attention_boxes(mean_map, thresholds, size, self.test_crop_padding)

    def class_activation_maps(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """WS-DAN's own maps: the mean attention map (class-agnostic, as the method uses it)."""
        return self(features)["attention_maps"].detach().float().mean(dim=1)

    def center_loss(self, parts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of squared distances to the (L2-normalized) class centers over the batch size; then the centers of
        the batch's classes move towards its features by `center_momentum` (index_add: one update per sample,
        deterministic where the reference code's indexed assignment keeps only one sample per class)."""
        parts = parts.float()
        centers = F.normalize(self.centers[labels], dim=-1)
        loss = (parts - centers).pow(2).sum() / len(parts)
        with torch.no_grad():
            update = self.center_momentum * (parts.detach() - centers)
            if self.pending_centers is None:  # one process: the centers move at once
                self.centers.index_add_(0, labels, update)
            else:  # under torchrun: every rank's updates, summed, at the optimizer step (apply_updates)
                self.pending_centers.index_add_(0, labels, update)
        return loss

    def defer_updates(self) -> None:
        """Collect the center updates until apply_updates, so that the centers learn from every rank's batches
        (DDP would otherwise keep rank 0's, broadcasting buffers at each forward)."""
        self.pending_centers = torch.zeros_like(self.centers)

    def apply_updates(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.centers += sum_over_ranks(self.pending_centers)
        self.pending_centers.zero_()


def choose_maps(maps: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different attention maps per sample (B x M x h x w -> two B x h x w), drawn with probabilities
    proportional to sqrt(map mass): the first guides the crop, the second the drop."""
    weights = maps.sum(dim=(2, 3)).clamp_min(0).add(1e-12).sqrt()
    chosen = torch.multinomial(weights / weights.sum(dim=1, keepdim=True), 2, generator=generator)
    rows = torch.arange(len(maps), device=maps.device)
    return maps[rows, chosen[:, 0]], maps[rows, chosen[:, 1]]


def random_thresholds(bounds: Sequence[float], count: int, device: torch.device,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(count, generator=generator, device=device)


def normalized_upsampled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x h x w maps divided by their maximum (all-zero maps stay zero), bilinearly resized to the image size."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return F.interpolate((maps / peak)[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def attention_boxes(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                    padding: float) -> torch.Tensor:
    """Per sample, the box (fgvc.boxes: x0, y0, x1, y1 in pixel edges, ints) of the region where the normalized,
    upsampled map is at least the threshold, grown by `padding` x the image side on each side and clipped to the
    image; the whole image when the region is empty."""
    height, width = size
    region = normalized_upsampled(maps, size) >= thresholds[:, None, None]
    boxes = torch.tensor([[0, 0, width, height]] * len(maps), dtype=torch.long)
    pad = torch.tensor([-round(padding * width), -round(padding * height), round(padding * width),
                        round(padding * height)])
    for i, mask in enumerate(region.cpu()):
        rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
        if len(rows):
            tight = torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            boxes[i] = clip_boxes(tight + pad, (0, 0, width, height))
    return boxes


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box, bilinearly resized back to the full image size (differentiable in the images)."""
    size = images.shape[-2:]
    return torch.cat([F.interpolate(image[None, :, y0:y1, x0:x1], size=size, mode="bilinear", align_corners=False)
                      for image, (x0, y0, x1, y1) in zip(images, boxes.tolist(), strict=True)])


def attention_drop(images: torch.Tensor, maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The images with the region where the normalized, upsampled map reaches the threshold set to zero."""
    keep = normalized_upsampled(maps, images.shape[-2:]) < thresholds[:, None, None]
    return images * keep[:, None].to(images.dtype)
