"""The self-supervised losses, with the conventions of the papers (shared/REFERENCE.md sections 7 and 11 pin them).

    nt_xent(z1, z2, temperature)          SimCLR: the mean over the 2N anchors (the original TF code returns twice it)
    info_nce(q, k, queue, temperature)    MoCo: [q.k+, q.queue] / T, the positive at index 0, mean over the batch
    byol_loss(p1, p2, z1, z2)             BYOL: (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)), batch means, in [0, 8]
    simsiam_loss(p1, p2, z1, z2)          SimSiam: -(cos(p1, z2) + cos(p2, z1)) / 2, batch means, in [-1, 1]
    dino_loss(student_out, teacher_out, center, student_temp, teacher_temp)
                                          DINO: cross-entropy of the centred, sharpened teacher on each global crop
                                          against the student on every other crop, mean over the pairs
    mae_loss(pred, target, mask, norm_pix=True)
                                          MAE: mean squared error over the masked patches only, on per-patch
                                          normalized pixels

Targets (MoCo's keys and queue, BYOL's and SimSiam's z, DINO's teacher) are detached here, so no caller can let a
gradient through them by mistake. Each returns a scalar tensor.
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


def _wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or in its own dtype if wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dino_loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's self-distillation loss. `student_out`: the student's B x K logits of every crop, the global crops
    first, in the order of `teacher_out` (the teacher's logits of the global crops only). Each teacher crop's target
    is softmax((t - center) / teacher_temp), detached; the student's prediction log_softmax(s / student_temp). The
    loss is the mean over the pairs of different crops (teacher crop i, student crop v != i) of the batch mean of
    -sum_k target_k log prediction_k: 2 x (V - 1) pairs for 2 global crops among V."""
    if not 0 < len(teacher_out) <= len(student_out):
        raise ValueError(f"dino_loss: {len(teacher_out)} teacher crops for {len(student_out)} student crops; the "
                         "teacher sees the global crops, which the student's list begins with")
    # In float32 at least: under bf16 autocast, logits divided by 0.04 would carry bf16's rounding 25-fold.
    targets = [F.softmax((_wide(t.detach()) - center.detach()) / teacher_temp, dim=-1) for t in teacher_out]
    predictions = [F.log_softmax(_wide(s) / student_temp, dim=-1) for s in student_out]
    terms = [-(target * prediction).sum(dim=-1).mean()
             for i, target in enumerate(targets) for v, prediction in enumerate(predictions) if v != i]
    return torch.stack(terms).mean()


def dino_center(center: torch.Tensor, teacher_out: list[torch.Tensor], momentum: float,
                total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """DINO's centre after a step: momentum x center + (1 - momentum) x the mean of the teacher's logits over every
    global crop of the batch (under torchrun `total` sums over ranks: Distributed.sum, so the mean is the global
    batch's). Not differentiated."""
    with torch.no_grad():
        rows = torch.cat([t.detach().float() for t in teacher_out])
        sums = torch.cat([rows.sum(dim=0), rows.new_tensor([len(rows)])])
        if total is not None:
            sums = total(sums)
        return center * momentum + (sums[:-1] / sums[-1]).to(center.dtype) * (1 - momentum)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B x 3 x H x W images as B x N x (p * p * 3) patches, row-major over the patch grid, each patch's pixels
    row-major with the channels last (MAE's order)."""
    b, c, h, w = images.shape
    p = patch_size
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """patchify's inverse: B x N x (p * p * 3) patches of a rows x columns grid as B x 3 x H x W images."""
    b, p = len(patches), patch_size
    rows, columns = grid
    images = patches.reshape(b, rows, columns, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return images.reshape(b, -1, rows * p, columns * p)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MAE's reconstruction loss. pred and target: B x N x P (target: patchify of the input images), mask: B x N,
    1 where the patch was masked (hidden from the encoder). With norm_pix each target patch is normalized by its
    own pixels' mean and variance (unbiased, + 1e-6), as the paper's best setting. The loss is the squared error
    averaged over a patch's pixels, then over the masked patches only: visible patches count for nothing."""
    target = target.detach()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()
