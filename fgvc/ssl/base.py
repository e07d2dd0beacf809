"""What the self-supervised methods share: the method module the training engine drives, the MLP heads, and the
momentum encoder's exponential moving average with its cosine schedule.

A method is an nn.Module with the engine's training interface (the one fgvc.models.FGVCModel has):
training_step(batch, criterion) -> (outputs, losses) on a batch of views (fgvc.ssl.views: batch["views"] is a
list of B x 3 x H x W tensors, and there is no label), parameter_groups() (the backbone, and the new layers: its
heads), before_optimizer_step(step) and after_optimizer_step(step) (momentum encoders and queues),
batch_statistics and compile(). Its backbone is a fgvc.models.Backbone; `backbone_weights()` is what the hand-off
file holds (the evaluated backbone's: the online one, DINO's teacher), the timm model's own state dict, so
`model.pretrained_file` loads it into any head.
"""

from __future__ import annotations

import abc
import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fgvc.engine.distributed import Distributed
from fgvc.models.backbone import Backbone
from fgvc.ssl.losses import Gather


def mlp(dims: list[int], *, batch_norm: bool = True, last_batch_norm: bool = False) -> nn.Sequential:
    """Linear layers through `dims` (input first), each hidden one followed by BatchNorm (batch_norm) and ReLU; the
    last linear layer is followed by an affine-free BatchNorm when last_batch_norm (SimSiam's projector). A
    linear layer followed by BatchNorm has no bias (the norm's shift stands in for it)."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = index == len(dims) - 2
        normed = last_batch_norm if last else batch_norm
        layers.append(nn.Linear(width_in, width_out, bias=not normed))
        if normed:
            layers.append(nn.BatchNorm1d(width_out, affine=not last))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule of the target's EMA coefficient: 1 - (1 - base) (cos(pi k / K) + 1) / 2 at step k (0-based)
    of K, from `base` at the first step towards 1 at k = K, the end of the run."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum x target + (1 - momentum) x online, parameter by parameter (buffers are the target's own:
    its BatchNorm statistics come from its own forward passes)."""
    for target_parameter, online_parameter in zip(target.parameters(), online.parameters(), strict=True):
        target_parameter.mul_(momentum).add_(online_parameter.detach(), alpha=1 - momentum)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` that only ema_update changes."""
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse signal: the standard deviation over the batch of the L2-normalized embeddings, averaged
    over channels. About 1 / sqrt(D) for embeddings spread over the sphere, 0 when every image maps to one point.
    The std of the batch's own rows (no correction), so a batch of one image gives 0, not NaN."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0, correction=0).mean()


class SSLMethod(nn.Module, abc.ABC):
    """A self-supervised method on a backbone: subclasses define `heads()` (the new layers, by name) and
    `views_loss(views)` -> (loss, online embedding of the first view)."""

    running_statistics = ("embedding_std",)
    needs_tokens = False  # works on a ViT's patch tokens only (refused with a CNN backbone)
    local_crops = 0  # multi-crop: the local crops it takes by default (0: none, its views only)
    embedding_dim: int  # the width of the embeddings whose std the collapse guard watches
    # Its forward is a collective under torchrun (negatives or keys gathered from every rank): every rank must run
    # every forward (fgvc.engine.distributed.DistributedStep).
    collective_forward = False

    def __init__(self, backbone: Backbone, *, distributed: Distributed | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.distributed = distributed if distributed is not None else Distributed()

    @property
    def gather(self) -> Gather:
        return self.distributed.gather_rows

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """B x C global-average-pooled backbone features: what the projector reads."""
        return self.backbone(images).mean(dim=(2, 3))

    @abc.abstractmethod
    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(The method's loss on the batch's views, the online embedding of the first view: what embedding_std
        reads; None for a method that logs no embedding statistics.)"""

    def training_step(self, batch: dict, criterion: Any = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """The method's loss on batch["views"]; `criterion` is the engine's and unused (the loss is the method's)."""
        loss, embedding = self.views_loss(batch["views"])
        return {"embedding": embedding}, {"loss": loss}

    @staticmethod
    def batch_statistics(outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"embedding_std": embedding_std(outputs["embedding"])}

    def before_optimizer_step(self, step: int) -> None:
        """Called before optimizer step `step` (0-based), the gradients summed: a method may drop some here."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (0-based): momentum encoders move here."""

    @abc.abstractmethod
    def heads(self) -> dict[str, nn.Module]:
        """The method's new layers (projector, predictor) by name."""

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters: "backbone", and "head" (projector, predictor: the new layers)."""
        return {"backbone": [p for p in self.backbone.parameters() if p.requires_grad],
                "head": [p for head in self.heads().values() for p in head.parameters() if p.requires_grad]}

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile in place what the method's forward calls (compiled_modules)."""
        for module in self.compiled_modules():
            module.compile(*args, **kwargs)

    def compiled_modules(self) -> list[nn.Module]:
        """The modules whose own forward the method calls: the backbone and every head (momentum copies included)."""
        return [self.backbone, *self.heads().values(), *self.momentum_modules()]

    def momentum_modules(self) -> list[nn.Module]:
        """The frozen copies that follow the online network by EMA (none for SimCLR and SimSiam)."""
        return []

    @property
    def evaluated_backbone(self) -> Backbone:
        """The backbone the run hands on and evaluates (monitor, probes, attention): the online one."""
        return self.backbone

    def backbone_weights(self) -> dict[str, torch.Tensor]:
        """The evaluated backbone's weights as timm names them (its own state dict), contiguous, for the hand-off."""
        state = self.evaluated_backbone.model.state_dict()
        return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
