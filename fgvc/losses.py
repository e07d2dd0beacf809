"""Losses. Each takes (outputs, batch) and returns a dict with "loss" and its named terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fgvc.errors import OptionError


def smoothed_targets(labels: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """Target distributions: 1 - eps on the true class and eps / (K - 1) on each other class.

    (PyTorch's and timm's label_smoothing=eps put eps / K on every class instead, so 1 - eps + eps / K on the true
    one; the two agree when PyTorch is given eps * K / (K - 1).)
    """
    return smooth(F.one_hot(labels, num_classes).float(), eps)


def smooth(targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Label smoothing of (possibly mixed, possibly unnormalized) target vectors: the linear map that sends e_k to
    smoothed_targets(k). Being linear, it commutes with mixing: smoothing a mixed target equals mixing smoothed
    ones, so it is applied exactly once, here, whether or not the batch was mixed."""
    num_classes = targets.shape[-1]
    if num_classes < 2:
        raise ValueError("label smoothing needs at least 2 classes")
    off = eps / (num_classes - 1)
    return targets * (1.0 - eps - off) + targets.sum(dim=-1, keepdim=True) * off


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against smoothed targets: the one-hot labels (batch["label"]), or the soft targets of a mixed
    batch (batch["target"], fgvc.mixing) when present. The one-hot case never materializes the targets."""

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        if not 0 <= eps < 1:
            raise OptionError("label_smoothing", f"must be in [0, 1), got {eps}")
        self.eps = eps

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = outputs["logits"]
        if logits.dtype in (torch.float16, torch.bfloat16):  # autocast output: take the softmax in fp32
            logits = logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        if "target" in batch:
            return {"loss": -(smooth(batch["target"].float(), self.eps) * log_probs).sum(dim=-1).mean()}
        num_classes = log_probs.shape[-1]
        true_class = log_probs.gather(1, batch["label"][:, None]).squeeze(1)
        if self.eps == 0:
            loss = -true_class.mean()
        else:
            others = log_probs.sum(dim=-1) - true_class
            loss = -((1 - self.eps) * true_class + self.eps / (num_classes - 1) * others).mean()
        return {"loss": loss}
