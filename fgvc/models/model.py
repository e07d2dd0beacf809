"""The assembled model: backbone features -> head -> outputs dict ({"logits": ...} and whatever the head adds)."""

from __future__ import annotations

import torch
from torch import nn

from fgvc.config import ModelConfig
from fgvc.models.backbone import Backbone, create_backbone
from fgvc.models.heads import HEADS


class FGVCModel(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(images))


def build_model(cfg: ModelConfig, num_classes: int) -> FGVCModel:
    backbone = create_backbone(cfg)
    head = HEADS.get(cfg.head)(backbone.num_features, num_classes, drop_rate=cfg.drop_rate)
    return FGVCModel(backbone, head)
