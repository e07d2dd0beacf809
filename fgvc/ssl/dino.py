"""DINO (Caron et al. 2021): self-distillation with no labels. A student (backbone and DINO head) sees every crop
of an image, the 2 global ones and the small local ones; a momentum teacher (EMA 0.996 -> 1 on a cosine) sees the
global crops only. The student's softmax on each crop is trained to match the teacher's centred and sharpened
softmax on a different crop (fgvc.ssl.losses.dino_loss); the centre, an EMA (0.9) of the teacher's outputs, keeps
one prototype from winning, the low teacher temperature keeps the outputs from going uniform.

The backbone is a ViT whose CLS token is the image's embedding (timm's pooling); it is built with
dynamic_img_size, so the position embeddings are interpolated to each crop's grid of patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from fgvc.models.backbone import Backbone
from fgvc.ssl.base import SSLMethod, cosine_momentum, ema_update, momentum_copy
from fgvc.ssl.losses import dino_center, dino_loss


class DINOHead(nn.Module):
    """An MLP (GELU; `layers` linear layers, in_dim -> hidden_dim ... -> bottleneck_dim), L2 normalization, then a
    weight-normalized linear layer without bias to out_dim prototypes. norm_last_layer: the weight norm's
    magnitude stays 1 (not trained), which the paper found steadier."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = [in_dim, *[hidden_dim] * (layers - 1), bottleneck_dim]
        modules: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            modules.append(nn.Linear(width_in, width_out))
            if index < len(dims) - 2:
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def cls_embedding(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """B x C: the ViT's pooled token (its class token for timm's global_pool="token"), after its final norm: what
    timm's model without a classifier (num_classes=0) returns."""
    return backbone.model(images)


def by_resolution(views: list[torch.Tensor]) -> list[list[int]]:
    """The indices of `views` in runs of one image size (DINO's multi-crop wrapper batches each run in one pass)."""
    runs: list[list[int]] = []
    for index, view in enumerate(views):
        if runs and views[runs[-1][-1]].shape[-2:] == view.shape[-2:]:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


class DINO(SSLMethod):
    """The paper's defaults: a 65,536-prototype head (2048 hidden, 256 bottleneck), student temperature 0.1,
    teacher 0.04 (linearly from warmup_teacher_temp over warmup_teacher_temp_epochs, per epoch, as the paper's
    schedule), centre momentum 0.9, teacher EMA 0.996 -> 1, the last layer frozen in the first epoch
    (freeze_last_layer). `total_steps` and `steps_per_epoch`: the run's optimizer steps."""

    needs_tokens = True
    local_crops = 8
    collective_forward = True  # the centre is the mean over every rank's teacher outputs

    def __init__(self, backbone: Backbone, *, total_steps: int, steps_per_epoch: int, out_dim: int = 65536,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, norm_last_layer: bool = True,
                 freeze_last_layer: int = 1, momentum: float = 0.996, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 center_momentum: float = 0.9, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.embedding_dim = backbone.num_features
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.base_momentum, self.center_momentum = momentum, center_momentum
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = warmup_teacher_temp, warmup_teacher_temp_epochs
        self.freeze_last_layer = freeze_last_layer
        self.head = DINOHead(backbone.num_features, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                             norm_last_layer=norm_last_layer)
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(out_dim))
        # Optimizer steps taken, in the state dict so a resumed run continues the temperature schedule.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))

    def heads(self) -> dict:
        return {"head": self.head}

    def momentum_modules(self) -> list:
        return [self.teacher_backbone, self.teacher_head]

    @property
    def evaluated_backbone(self) -> Backbone:
        """The teacher: the paper finds it better than the student throughout training, and its evaluations and
        attention maps are the teacher's."""
        return self.teacher_backbone

    def compiled_modules(self) -> list[nn.Module]:
        return [self.backbone.model, self.head, self.teacher_backbone.model, self.teacher_head]

    def train(self, mode: bool = True) -> DINO:
        """The teacher stays in eval mode: no stochastic depth or dropout in the targets (the paper builds it
        without them)."""
        super().train(mode)
        for module in self.momentum_modules():
            module.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return cls_embedding(self.backbone, images)

    def current_teacher_temp(self) -> float:
        """The teacher temperature of the epoch in progress, as the paper's schedule: linear from warmup_teacher_temp
        at the first epoch to teacher_temp at epoch warmup_teacher_temp_epochs - 1, then teacher_temp."""
        epoch = int(self.steps_done) // self.steps_per_epoch
        warmup = self.warmup_teacher_temp_epochs
        if epoch >= warmup:
            return self.teacher_temp
        share = epoch / (warmup - 1) if warmup > 1 else 0.0  # one warm-up epoch: at warmup_teacher_temp (linspace)
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * share

    def crop_outputs(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(The student's head logits and CLS embeddings of every view, in order), each size run in one pass."""
        logits, embeddings = [None] * len(views), [None] * len(views)
        for run in by_resolution(views):
            embedding = self.encode(torch.cat([views[index] for index in run]))
            for index, chunk_logits, chunk in zip(run, self.head(embedding).chunk(len(run)),
                                                  embedding.chunk(len(run)), strict=True):
                logits[index], embeddings[index] = chunk_logits, chunk
        return logits, embeddings

    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """views: the 2 global crops first, then the local crops."""
        global_views = views[:2]
        with torch.no_grad():
            teacher = self.teacher_head(cls_embedding(self.teacher_backbone, torch.cat(global_views))).chunk(2)
        student, embeddings = self.crop_outputs(views)
        loss = dino_loss(student, list(teacher), self.center, self.student_temp, self.current_teacher_temp())
        self.center.copy_(dino_center(self.center, list(teacher), self.center_momentum, self.distributed.sum))
        return loss, embeddings[0]

    def before_optimizer_step(self, step: int) -> None:
        """In the first freeze_last_layer epochs the prototypes do not move (their gradients are dropped)."""
        if step // self.steps_per_epoch < self.freeze_last_layer:
            for parameter in self.head.last_layer.parameters():
                parameter.grad = None

    def after_optimizer_step(self, step: int) -> None:
        momentum = cosine_momentum(self.base_momentum, step, self.total_steps)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        self.steps_done.fill_(step + 1)
