"""Weighted k-nearest-neighbour classification of frozen features (DINO's eval_knn, Wu et al. 2018): how well
features separate classes with no training at all, so it serves as a probe of pretrained features and as the
monitor of self-supervised pretraining.

Features are L2-normalized; each query takes its k most cosine-similar training rows s_i and scores class c as
sum_i exp(s_i / T) [y_i = c]; the prediction is the best score. Ties are broken by position, so results are exact
and repeatable: among equally similar training rows the earlier one is the nearer neighbour, and among equal class
scores the lower class index wins.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from fgvc.engine.loop import Runtime
from fgvc.errors import OptionError

DEFAULT_K, DEFAULT_TEMPERATURE = 20, 0.07


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor, *,
               num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
               chunk_size: int = 256) -> torch.Tensor:
    """Q x num_classes weighted votes of the k nearest training rows of each query (N x D and Q x D features, any
    scale: they are normalized here). k larger than the training set uses all of it."""
    if k < 1:
        raise OptionError("k", f"must be at least 1, got {k}")
    if temperature <= 0:
        raise OptionError("temperature", f"must be positive, got {temperature}")
    # In float64: neighbours whose similarities are equal stay equal (float32 rounding of the normalization would
    # order them by accident), and the votes are summed without cancellation.
    train = F.normalize(train_features.double(), dim=1)
    labels = train_labels.to(train.device, torch.int64)
    k = min(k, len(train))
    scores = []
    for query in F.normalize(query_features.double().to(train.device), dim=1).split(chunk_size):
        similarity = query @ train.T
        # A stable sort keeps equal similarities in training order: the earlier row is the nearer neighbour.
        order = similarity.sort(dim=1, descending=True, stable=True).indices[:, :k]
        weights = (similarity.gather(1, order) / temperature).exp()
        votes = torch.zeros(len(query), num_classes, dtype=torch.float64, device=train.device)
        scores.append(votes.scatter_add_(1, labels[order], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, dtype=torch.float64)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, *, num_classes: int, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> dict[str, float]:
    """Top-1 and top-5 (%) of the weighted k-NN classifier on the queries (argmax: the lowest of tied classes), and
    the k and temperature used."""
    scores = knn_scores(train_features, train_labels, query_features, num_classes=num_classes, k=k,
                        temperature=temperature)
    k = min(k, len(train_features))  # as knn_scores used it
    labels = query_labels.to(scores.device, torch.int64)
    top1 = (scores.argmax(dim=1) == labels).float().mean().item()
    top5 = (scores.topk(min(5, num_classes), dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
    return {"top1": 100.0 * top1, "top5": 100.0 * top5, "k": k, "temperature": temperature}


@torch.no_grad()
def embed(backbone: torch.nn.Module, loader: Iterable[dict],
          runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N x C global-average-pooled backbone features, N labels, N dataset indices) of every readable image of an
    evaluation loader, with the backbone in eval mode (restored afterwards)."""
    was_training = backbone.training
    backbone.eval()
    features, labels, indices = [], [], []
    for batch in loader:
        if not batch:
            continue
        with runtime.autocast():
            maps = backbone(runtime.images(batch["image"]))
        features.append(maps.float().mean(dim=(2, 3)).cpu())
        labels.append(batch["label"].to(torch.int64))
        indices.append(batch["index"].to(torch.int64))
    backbone.train(was_training)
    if not features:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(labels), torch.cat(indices)
