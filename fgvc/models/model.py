"""The assembled model: backbone features -> head -> outputs dict ({"logits": ...} and whatever the head adds)."""

from __future__ import annotations

import torch
from torch import nn

from fgvc.config import ModelConfig
from fgvc.models.backbone import Backbone, create_backbone
from fgvc.models.heads import HEADS


class FGVCModel(nn.Module):
    """forward(images) is inference in eval mode (with the head's test-time passes) and one pass in training;
    training_step(batch, criterion) is what the engine calls to train, whatever the method."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def single_pass(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.single_pass(images)
        return outputs if self.training else self.head.refine(self.single_pass, images, outputs)

    @torch.no_grad()
    def class_activation_maps(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B x h x w maps of the evidence for `labels` (the head's own kind; see Head.class_activation_maps)."""
        return self.head.class_activation_maps(self.backbone(images), labels)

    def training_step(self, batch: dict, criterion: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """(outputs of the pass on batch["image"], the loss dict) -- extra passes are the head's business."""
        outputs = self.single_pass(batch["image"])
        return outputs, self.head.training_losses(self.single_pass, batch, outputs, criterion)


def build_model(cfg: ModelConfig, num_classes: int) -> FGVCModel:
    backbone = create_backbone(cfg)
    return FGVCModel(backbone, HEADS.get(cfg.head)(backbone.num_features, num_classes, cfg))
