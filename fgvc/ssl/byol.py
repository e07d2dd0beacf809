"""BYOL (Grill et al. 2020): an online network (backbone, projector, predictor) predicts a momentum target
network's projection of the other view; the target follows the online backbone and projector by an EMA whose
coefficient rises from `momentum` to 1 on a cosine over the run."""

from __future__ import annotations

import torch

from fgvc.models.backbone import Backbone
from fgvc.ssl.base import SSLMethod, cosine_momentum, ema_update, mlp, momentum_copy
from fgvc.ssl.losses import byol_loss


class BYOL(SSLMethod):
    """Projector and predictor are C -> hidden_dim -> projection_dim MLPs with BatchNorm on the hidden layer; the
    paper's: 4096 -> 256, EMA 0.996 -> 1. `total_steps`: the run's optimizer steps, the schedule's length."""

    def __init__(self, backbone: Backbone, *, total_steps: int, momentum: float = 0.996, hidden_dim: int = 4096,
                 projection_dim: int = 256, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.embedding_dim = projection_dim
        self.base_momentum, self.total_steps = momentum, total_steps
        self.projector = mlp([backbone.num_features, hidden_dim, projection_dim])
        self.predictor = mlp([projection_dim, hidden_dim, projection_dim])
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)

    def heads(self) -> dict:
        return {"projector": self.projector, "predictor": self.predictor}

    def momentum_modules(self) -> list:
        return [self.target_backbone, self.target_projector]

    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        online = [self.projector(self.encode(view)) for view in views]
        with torch.no_grad():
            target = [self.target_projector(self.target_backbone(view).mean(dim=(2, 3))) for view in views]
        p1, p2 = (self.predictor(z) for z in online)
        return byol_loss(p1, p2, target[0], target[1]), online[0]

    def after_optimizer_step(self, step: int) -> None:
        momentum = cosine_momentum(self.base_momentum, step, self.total_steps)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
