"""Optimizers with parameter groups (new layers at a multiple of the backbone lr; no weight decay on norms and
biases) and the cosine schedule with linear warmup, stepped every optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn

from fgvc.errors import OptionError

OPTIMIZERS = ("sgd", "adamw")
# Devices with torch's fused optimizer kernels: one pass over all parameters per step instead of one per tensor.
FUSED_DEVICES = {"cpu", "cuda"}


def parameter_groups(roles: dict[str, list[nn.Parameter]], *, lr: float, weight_decay: float,
                     head_lr_mult: float = 1.0, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Optimizer groups from a model's parameters by role (FGVCModel.parameter_groups: "backbone" and "head", or
    one role per backbone layer under layer-wise lr decay): (role) x (decayed | not decayed), each at lr x its
    `lr_scales` entry (default 1), the head's also x `head_lr_mult`. The scale is part of each group's lr, so the
    schedule (which multiplies every group's initial lr) applies it at every step; it is also kept as `lr_scale`.
    One-dimensional parameters -- norm scales and shifts, biases -- are not decayed: shrinking them towards zero
    only fights the normalization."""
    groups = []
    for role, params in roles.items():
        scale = (lr_scales or {}).get(role, 1.0) * (head_lr_mult if role == "head" else 1.0)
        decayed = [p for p in params if p.ndim > 1]
        not_decayed = [p for p in params if p.ndim <= 1]
        for name, members, decay in ((role, decayed, weight_decay), (f"{role}_no_decay", not_decayed, 0.0)):
            if members:
                groups.append({"name": name, "params": members, "lr": lr * scale, "lr_scale": scale,
                               "weight_decay": decay})
    return groups


def layer_decay_scales(num_layers: int, decay: float) -> list[float]:
    """Layer-wise lr decay (BEiT, MAE): layer l of `num_layers` (0 first) at decay^(num_layers - l), so the deepest
    backbone layer has decay^1 and the new layers above it 1 -- timm's param_groups_layer_decay scales."""
    return [decay ** (num_layers - layer) for layer in range(num_layers)]


def build_optimizer(groups: list[dict], *, name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over `groups`, fused where the parameters' device has fused kernels."""
    fused = all(p.device.type in FUSED_DEVICES for group in groups for p in group["params"]) or None
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    raise OptionError("name", f"{name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The lr multiplier at optimizer step `step` (0-based): linear warmup to 1, then cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int, warmup_epochs: float,
                    base_lr: float, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_epochs`, then cosine from each group's lr down to min_lr / base_lr of it."""
    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total)
    min_ratio = min_lr / base_lr if base_lr > 0 else 0.0

    def multiplier(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup, total_steps=total, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
