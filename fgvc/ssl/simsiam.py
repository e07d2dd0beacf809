"""SimSiam (Chen & He 2021): a siamese network with a predictor on one branch and a stop-gradient on the other;
no negatives, no momentum encoder. Its known failure is collapse, which the embedding std (logged every step, and
fgvc's collapse guard) shows."""

from __future__ import annotations

import torch

from fgvc.models.backbone import Backbone
from fgvc.ssl.base import SSLMethod, mlp
from fgvc.ssl.losses import simsiam_loss


class SimSiam(SSLMethod):
    """backbone -> projector (3 layers of projection_dim, BatchNorm on each, the last without affine) -> predictor
    (projection_dim -> predictor_hidden_dim -> projection_dim, a bottleneck with BatchNorm on its hidden layer).
    The paper's ResNet-50: 2048 throughout, predictor hidden 512."""

    def __init__(self, backbone: Backbone, *, projection_dim: int = 2048, predictor_hidden_dim: int = 512,
                 **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.embedding_dim = projection_dim
        width = backbone.num_features
        self.projector = mlp([width, projection_dim, projection_dim, projection_dim], last_batch_norm=True)
        self.predictor = mlp([projection_dim, predictor_hidden_dim, projection_dim])

    def heads(self) -> dict:
        return {"projector": self.projector, "predictor": self.predictor}

    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = (self.projector(self.encode(view)) for view in views)
        return simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2), z1
