"""The self-supervised losses, with the conventions of the papers (shared/REFERENCE.md sections 7 and 11 pin them).

    nt_xent(z1, z2, temperature)          SimCLR: the mean over the 2N anchors (the original TF code returns twice it)
    info_nce(q, k, queue, temperature)    MoCo: [q.k+, q.queue] / T, the positive at index 0, mean over the batch
    byol_loss(p1, p2, z1, z2)             BYOL: (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)), batch means, in [0, 8]
    simsiam_loss(p1, p2, z1, z2)          SimSiam: -(cos(p1, z2) + cos(p2, z1)) / 2, batch means, in [-1, 1]

Targets (MoCo's keys and queue, BYOL's and SimSiam's z) are detached here, so no caller can let a gradient through
them by mistake. Each returns a scalar tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Every rank's rows and where this rank's begin (fgvc.engine.distributed.Distributed.gather_rows); one process: its own.
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _own_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    return rows, 0


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: Gather = _own_rows) -> torch.Tensor:
    """NT-Xent (SimCLR) of two views' embeddings (N x D each, any scale: compared by cosine). Each of the 2N views
    is an anchor whose positive is the other view of its image and whose negatives are the 2N - 2 other views;
    the loss is the mean over the anchors of the cross-entropy of softmax(cos / temperature).

    gather: under torchrun, Distributed.gather_rows -- the anchors are this rank's views, the candidates every
    rank's (with their gradient), so the loss does not change with the world size."""
    all1, offset = gather(z1)
    all2, _ = gather(z2)
    n, total = len(z1), len(all1)
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = F.normalize(torch.cat([all1, all2]), dim=1)
    logits = anchors @ candidates.T / temperature
    rows = torch.arange(n, device=z1.device) + offset
    itself = torch.cat([rows, rows + total])
    logits = logits.masked_fill(F.one_hot(itself, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(logits, torch.cat([rows + total, rows]))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (MoCo) of queries q against their keys k (B x D, L2-normalized) and a queue of negative keys (K x D,
    one key a row): cross-entropy of [q.k, q.queue] / temperature with the positive at index 0, mean over B. The
    keys and the queue carry no gradient."""
    k, queue = k.detach(), queue.detach()
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.int64, device=q.device))


def _cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch mean of cos(prediction, target), the target detached."""
    return F.cosine_similarity(prediction, target.detach(), dim=1).mean()


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """BYOL, symmetrized as the paper sums it: each view's online prediction p against the other view's target
    projection z, 2 - 2 cos (the squared distance of the normalized vectors), batch means, the two terms added."""
    return (2 - 2 * _cosine(p1, z2)) + (2 - 2 * _cosine(p2, z1))


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam: -(cos(p1, stopgrad z2) + cos(p2, stopgrad z1)) / 2, batch means; -1 at best."""
    return -(_cosine(p1, z2) + _cosine(p2, z1)) / 2
