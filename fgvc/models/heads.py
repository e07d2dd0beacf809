"""Classification heads, registered by name. Every head takes B x C x H x W features and returns the outputs dict.

A head is built as `Head(in_features, num_classes, **options)`, its options named after the model.* config keys
(model.wsdan.* for WS-DAN's constants), so the build layer passes exactly the keys a head declares.

A head is also where a method keeps what it needs beyond one forward pass (DESIGN.md): `training_losses` may run
more passes (WS-DAN's crop and drop) and `refine` may add inference passes (WS-DAN's test-time crop). The defaults
are one pass and the criterion, so the engine never asks which method it is running.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fgvc.errors import OptionError
from fgvc.registry import Registry
from fgvc_kernels import BilinearPool, bilinear_pool

HEADS = Registry("head")
Forward = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # images -> outputs, one pass of the whole model


class Head(nn.Module):
    """Base of every head: one pass in training and at inference."""

    # Whether training needs nothing but the backbone's features of each image; False for heads whose training
    # passes look at the images again (WS-DAN's attention crop and drop), which a feature cache cannot serve.
    trains_from_features = True

    def sufficient_features(self, features: torch.Tensor) -> torch.Tensor:
        """The least of the B x C x h x w features that determines the head's output, as B x C' x h' x w' features
        the head takes in their place: what a feature cache keeps. The whole map, unless the head pools first."""
        return features

    def training_losses(self, forward: Forward, batch: dict, outputs: dict[str, torch.Tensor],
                        criterion: nn.Module) -> dict[str, torch.Tensor]:
        """The loss dict of one training step, given the outputs of the pass on batch["image"]."""
        return criterion(outputs, batch)

    def refine(self, forward: Forward, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> dict:
        """Inference outputs, given the pass on `images` (heads with test-time passes override this)."""
        return outputs

    def class_activation_maps(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B x h x w maps of where the evidence for `labels` lies in `features`; Grad-CAM unless a head has its own
        (the linear head's exact CAM, WS-DAN's attention maps, gradient x feature for iSQRT)."""
        return grad_cam(self, features, labels)

    def test_crop_boxes(self, outputs: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor | None:
        """The boxes (x0, y0, x1, y1) that `refine` crops at test time, for heads that crop; None otherwise."""
        return None


def grad_cam(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c w_c F_c) with w_c the spatial mean of d logit_label / d F_c (Selvaraju et al. 2017), for any head.
    The head runs in eval mode (no dropout) and nothing flows back into the features."""
    features, gradient = _label_gradient(head, features, labels)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * features).sum(dim=1)).detach()


def gradient_times_features(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c F_c,p d logit_label / d F_c,p) at each position p: the evidence at each position, to first order.

    Grad-CAM averages the gradient over positions before weighting the features. Through centered covariance pooling
    (iSQRT) the gradient at position p is proportional to its deviation from the mean, and those deviations nearly
    cancel in the average, so Grad-CAM's map is often exactly zero after its ReLU. Weighting each position by its
    own gradient keeps the evidence. For a linear head on average-pooled features both are the class activation
    map / (h w), up to the ReLU."""
    features, gradient = _label_gradient(head, features, labels)
    return F.relu((gradient * features).sum(dim=1)).detach()


def _label_gradient(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features as fp32, d logit_label / d features), with the head in eval mode (no dropout) for the pass."""
    was_training = head.training
    head.eval()
    try:
        with torch.enable_grad():
            features = features.detach().float().requires_grad_()
            logits = head(features)["logits"]
            (gradient,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), features)
    finally:
        head.train(was_training)
    return features.detach(), gradient


def reduction(in_features: int, dim: int | None) -> tuple[nn.Module, int]:
    """A 1x1 conv + BN + ReLU down to `dim` channels (identity when dim is None), and the channels it leaves."""
    if dim is None:
        return nn.Identity(), in_features
    if dim < 1:
        raise OptionError("head_dim", f"must be a positive number of channels (or null), got {dim}")
    return nn.Sequential(nn.Conv2d(in_features, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)), dim


@HEADS.register("linear")
class LinearHead(Head):
    """Global average pooling, dropout, a fully connected classifier."""

    def __init__(self, in_features: int, num_classes: int, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = features.mean(dim=(2, 3))
        return {"logits": self.fc(self.dropout(pooled))}

    def sufficient_features(self, features: torch.Tensor) -> torch.Tensor:
        """The average over positions, as a 1 x 1 map (whose own average is itself)."""
        return features.mean(dim=(2, 3), keepdim=True)

    def class_activation_maps(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The class activation map (Zhou et al. 2016): the true class's classifier weights over the feature map,
        plus its bias -- the maps whose spatial mean is the logit."""
        weights = self.fc.weight[labels].float()
        maps = torch.einsum("bc,bchw->bhw", weights, features.detach().float())
        return (maps + self.fc.bias[labels].float()[:, None, None]).detach()


@HEADS.register("bilinear")
class BilinearHead(Head):
    """B-CNN (Lin et al. 2015): optional 1x1 reduction, self bilinear pooling with signed sqrt and L2 through the
    fused op, dropout, FC. Without a reduction (head_dim None) a C-channel backbone gives C^2 features (512^2 for
    VGG-16)."""

    def __init__(self, in_features: int, num_classes: int, *, head_dim: int | None = None,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.reduce, channels = reduction(in_features, head_dim)
        self.pool = BilinearPool()
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels * channels, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.dropout(self.pool(self.reduce(features))))}


@HEADS.register("isqrt")
class ISqrtHead(Head):
    """iSQRT-COV (Li et al. 2018): 1x1 reduction (head_dim; None gives the paper's 256), covariance pooling through
    the fused op (centered, no sqrt, no normalization), matrix square root by coupled Newton-Schulz iterations in
    fp32 with trace pre-normalization and post-compensation, the upper triangle, FC."""

    def __init__(self, in_features: int, num_classes: int, *, head_dim: int | None = None, isqrt_iterations: int = 5,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if isqrt_iterations < 1:
            raise OptionError("isqrt_iterations", f"must be at least 1, got {isqrt_iterations}")
        self.reduce, channels = reduction(in_features, head_dim or 256)
        self.iterations = isqrt_iterations
        self.register_buffer("upper", torch.triu_indices(channels, channels), persistent=False)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels * (channels + 1) // 2, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        reduced = self.reduce(features)
        batch, channels = reduced.shape[:2]
        covariance = bilinear_pool(reduced, center=True, sqrt_mode="none", normalize=False,
                                   out_dtype=torch.promote_types(reduced.dtype, torch.float32))
        covariance = covariance.view(batch, channels, channels)
        with torch.autocast(features.device.type, enabled=False):
            root = newton_schulz_sqrt(covariance, self.iterations)
        triangle = root[:, self.upper[0], self.upper[1]]
        return {"logits": self.fc(self.dropout(triangle.to(features.dtype)))}

    def class_activation_maps(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return gradient_times_features(self, features, labels)  # Grad-CAM nearly vanishes for covariance pooling


def newton_schulz_sqrt(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximate square roots of a batch of SPD matrices, as iSQRT-COV computes them.

    A = M / tr(M) has eigenvalues in (0, 1], where the coupled iteration Y <- Y T, Z <- T Z with
    T = (3I - Z Y) / 2 (Y0 = A, Z0 = I) converges to A^(1/2); the result is multiplied back by sqrt(tr(M)).
    Runs in fp32 at least. A zero matrix gives zeros (the trace is clamped), a singular one stays finite.
    """
    matrix = matrix.float() if matrix.dtype != torch.float64 else matrix
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device).expand_as(matrix)
    trace = matrix.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(matrix.dtype).tiny)[:, None, None]
    y, z = matrix / trace, identity
    for _ in range(iterations):
        t = 0.5 * (3.0 * identity - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()
