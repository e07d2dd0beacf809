"""SimCLR (Chen et al. 2020): two views of each image, an MLP projector, NT-Xent over the 2N views of the batch
(under torchrun, of the global batch: negatives are gathered from every rank with their gradient)."""

from __future__ import annotations

import torch

from fgvc.models.backbone import Backbone
from fgvc.ssl.base import SSLMethod, mlp
from fgvc.ssl.losses import nt_xent


class SimCLR(SSLMethod):
    """backbone -> projector (C -> hidden_dim -> projection_dim, BatchNorm on the hidden layer) -> NT-Xent. The
    paper's ResNet-50 projector is 2048 -> 2048 -> 128 (hidden_dim null: the backbone's width), temperature 0.1."""

    collective_forward = True

    def __init__(self, backbone: Backbone, *, temperature: float = 0.1, hidden_dim: int | None = None,
                 projection_dim: int = 128, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.embedding_dim = projection_dim
        self.temperature = temperature
        self.projector = mlp([backbone.num_features, hidden_dim or backbone.num_features, projection_dim])

    def heads(self) -> dict:
        return {"projector": self.projector}

    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = (self.projector(self.encode(view)) for view in views)
        return nt_xent(z1, z2, self.temperature, gather=self.gather), z1
