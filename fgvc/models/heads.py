"""Classification heads, registered by name. Every head takes B x C x H x W features and returns the outputs dict."""

from __future__ import annotations

import torch
from torch import nn

from fgvc.registry import Registry

HEADS = Registry("head")


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Global average pooling, dropout, a fully connected classifier."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = features.mean(dim=(2, 3))
        return {"logits": self.fc(self.dropout(pooled))}
