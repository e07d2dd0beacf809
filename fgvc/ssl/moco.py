"""MoCo v2 (He et al. 2020, Chen et al. 2020): queries from the online encoder, keys from a momentum encoder (a
constant EMA, 0.999), InfoNCE of each query against its key and a queue of past keys (65,536), an MLP projector.

The key encoder's BatchNorm would let a query find its key through the batch statistics they share; MoCo breaks
that with shuffling BN across GPUs. Here the key batch is shuffled and normalized in groups (`key_bn_groups`) on
each rank -- the single-device form of the same idea (the authors' CIFAR demo splits BatchNorm likewise). Keys are
gathered from every rank before they are queued, so every rank keeps the same queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fgvc.models.backbone import Backbone
from fgvc.ssl.base import SSLMethod, ema_update, mlp, momentum_copy
from fgvc.ssl.losses import info_nce


class KeyQueue(nn.Module):
    """A first-in first-out queue of `size` keys (size x dim, one key a row) in buffers, so checkpoints hold it:
    enqueue writes a batch at the pointer, oldest keys first overwritten, wrapping around the end."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        # Random unit keys to start with, as MoCo does: the first steps' negatives mean nothing either way.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = len(self.keys)
        keys = keys[-size:]  # a batch larger than the queue keeps its newest keys
        rows = (self.pointer + torch.arange(len(keys), device=keys.device)) % size
        self.keys[rows] = keys.to(self.keys.dtype)
        self.pointer.copy_((self.pointer + len(keys)) % size)


class MoCo(SSLMethod):
    """Projector C -> hidden_dim -> projection_dim without BatchNorm (MoCo v2's MLP head; hidden null: the
    backbone's width), temperature 0.2, a queue of queue_size keys."""

    collective_forward = True

    def __init__(self, backbone: Backbone, *, temperature: float = 0.2, momentum: float = 0.999,
                 queue_size: int = 65536, hidden_dim: int | None = None, projection_dim: int = 128,
                 key_bn_groups: int = 2, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.embedding_dim = projection_dim
        self.temperature, self.momentum, self.key_bn_groups = temperature, momentum, key_bn_groups
        self.projector = mlp([backbone.num_features, hidden_dim or backbone.num_features, projection_dim],
                             batch_norm=False)
        self.key_backbone = momentum_copy(backbone)
        self.key_projector = momentum_copy(self.projector)
        self.queue = KeyQueue(queue_size, projection_dim)

    def heads(self) -> dict:
        return {"projector": self.projector}

    def momentum_modules(self) -> list:
        return [self.key_backbone, self.key_projector]

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized keys, the batch shuffled and its BatchNorm statistics taken per group, in input order."""
        order = torch.randperm(len(images), device=images.device)
        projected = torch.cat([self.key_projector(self.key_backbone(part).mean(dim=(2, 3)))
                               for part in images[order].tensor_split(min(self.key_bn_groups, len(images)))])
        keys = torch.empty_like(projected)
        keys[order] = projected
        return F.normalize(keys, dim=1)

    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first view's queries against the second view's keys and the queue (the paper's, not symmetrized);
        then every rank's keys are queued."""
        query_view, key_view = views
        z = self.projector(self.encode(query_view))
        keys = self.keys(key_view)
        # A copy: the loss's backward needs the queue as it was, and the keys are queued before that.
        loss = info_nce(F.normalize(z, dim=1), keys, self.queue.keys.clone(), self.temperature)
        self.queue.enqueue(self.gather(keys)[0])
        return loss, z

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)
