"""Where does the model look? Localization metrics from attention maps or class activation maps.

For each test image, the map (a localizer's attention maps averaged over maps; otherwise the head's class activation
map of the true class: the exact CAM for the linear head, gradient x feature for iSQRT, Grad-CAM for the others)
is resized to the image and its peak taken. Reported:
- peak_in_box: % of images whose peak lies inside the object box;
- peak_on_part (synthbirds): % of images whose peak lies within `part_radius` x the image side of a visible
  keypoint of a part that discriminates the true class from a class one attribute away.

For a self-supervised ViT (attention_localization) the map is the class token's last-layer attention, averaged over
heads: made without any label (the meter reads the label only to know which parts discriminate the class).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from fgvc.models import Backbone, FGVCModel

PART_RADIUS = 0.1  # of the image side: about the length of a synthbirds bill at the default pose scale


def localization_maps(model: FGVCModel, images: torch.Tensor, labels: torch.Tensor,
                      outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """B x h x w maps: the mean attention map where the head has them (already in `outputs`), else the head's class
    activation maps of the true class (Head.class_activation_maps)."""
    if "attention_maps" in outputs:
        return outputs["attention_maps"].float().mean(dim=1)
    return model.class_activation_maps(images, labels)


def peaks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x 2 (x, y) pixel-centre coordinates of each map's maximum after bilinear resizing to `size`."""
    resized = F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    flat = resized.flatten(1).argmax(dim=1)
    width = size[1]
    return torch.stack([flat % width, flat // width], dim=1).float()


class LocalizationMeter:
    """Accumulates peak_in_box (when batches carry "bbox") and peak_on_part (when `discriminative_parts` is given:
    per class, indices of the parts that tell it apart; batches then carry "parts")."""

    def __init__(self, discriminative_parts: list[list[int]] | None = None, part_radius: float = PART_RADIUS) -> None:
        self.discriminative_parts = discriminative_parts
        self.part_radius = part_radius
        self.in_box = self.on_part = self.boxed = self.parted = 0

    def update(self, maps: torch.Tensor, batch: dict) -> None:
        size = batch["image"].shape[-2:]
        xy = peaks(maps, size).cpu()
        labels = batch["label"].cpu()
        if "bbox" in batch:
            box = batch["bbox"].cpu().float()  # fgvc.boxes: x0, y0, x1, y1 in pixel edges
            centre = xy + 0.5  # pixel k covers [k, k + 1) in the box's edge coordinates
            inside = ((centre[:, 0] >= box[:, 0]) & (centre[:, 0] <= box[:, 2]) &
                      (centre[:, 1] >= box[:, 1]) & (centre[:, 1] <= box[:, 3]))
            self.in_box += int(inside.sum())
            self.boxed += len(inside)
        if self.discriminative_parts is not None and "parts" in batch:
            radius = self.part_radius * min(size)
            parts = batch["parts"].cpu().float()
            for peak, label, table in zip(xy, labels.tolist(), parts, strict=True):
                candidates = table[self.discriminative_parts[label]]
                visible = candidates[candidates[:, 2] > 0, :2]
                self.on_part += int(len(visible) > 0 and bool(((visible - peak).norm(dim=1) <= radius).any()))
                self.parted += 1

    def combine(self, meters: list[LocalizationMeter]) -> None:
        """Become the sum of `meters` (every rank's, this one among them)."""
        for name in ("in_box", "on_part", "boxed", "parted"):
            setattr(self, name, sum(getattr(meter, name) for meter in meters))

    def compute(self) -> dict[str, float]:
        metrics = {}
        if self.boxed:
            metrics["peak_in_box"] = 100.0 * self.in_box / self.boxed
        if self.parted:
            metrics["peak_on_part"] = 100.0 * self.on_part / self.parted
        return metrics


@torch.no_grad()
def attention_localization(backbone: Backbone, loader: Iterable[dict], batch_on_device: Callable[[dict], dict],
                           meter: LocalizationMeter) -> dict[str, float]:
    """The meter's metrics for the mean over heads of a ViT backbone's class-token attention
    (Backbone.cls_attention) on every readable batch of `loader` (moved by `batch_on_device`, a Runtime's batch),
    the backbone in eval mode meanwhile."""
    training = backbone.training
    backbone.eval()
    try:
        for batch in loader:
            if batch:
                batch = batch_on_device(batch)
                meter.update(backbone.cls_attention(batch["image"]).float().mean(dim=1), batch)
    finally:
        backbone.train(training)
    return meter.compute()


def localization_line(metrics: dict[str, float]) -> str:
    """"attention peak in the object box 83.1%, on a discriminative part 40.2%" (what the metrics hold), or ""."""
    found = [f"{words} {metrics[key]:.1f}%" for key, words in (("peak_in_box", "in the object box"),
                                                                ("peak_on_part", "on a discriminative part"))
             if key in metrics]
    return "attention peak " + ", ".join(found) if found else ""


def meter_for(dataset) -> LocalizationMeter | None:
    """A meter for a dataset with boxes (`has_boxes`) or with the parts that discriminate each class
    (`discriminative_parts`: synthbirds knows them); None when the dataset has nothing to localize against, or does
    not say (a dataset of one's own without these attributes)."""
    parts = getattr(dataset, "discriminative_parts", None)
    if not getattr(dataset, "has_boxes", False) and parts is None:
        return None
    return LocalizationMeter(parts)
