"""Classification metrics: top-1 and top-5 (per sample, micro), the per-class mean accuracy (macro recall), the
confusion matrix and the class pairs most often confused."""

from __future__ import annotations

import torch


class ClassificationMeter:
    """Accumulates predictions batch by batch; compute() gives percentages over everything seen."""

    def __init__(self, num_classes: int, topk: tuple[int, ...] = (1, 5), keep_scores: bool = False) -> None:
        self.num_classes = num_classes
        self.keep_scores = keep_scores
        self.scores: dict[int, torch.Tensor] = {}  # by sample index, when keep_scores
        self.topk = tuple(k for k in topk if k <= num_classes)
        self.correct = dict.fromkeys(self.topk, 0)
        self.count = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # rows: true class, columns: top-1

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        if self.keep_scores:
            if indices is None:
                raise ValueError("keep_scores needs the samples' indices")
            self.scores.update(zip(indices.tolist(), logits, strict=True))
        ranked = logits.topk(max(self.topk), dim=1).indices
        hits = ranked == labels[:, None]
        for k in self.topk:
            self.correct[k] += int(hits[:, :k].any(dim=1).sum())
        self.count += len(labels)
        cells = labels * self.num_classes + ranked[:, 0]
        self.confusion += torch.bincount(cells, minlength=self.num_classes**2).view(self.num_classes, -1)

    def combine(self, meters: list[ClassificationMeter]) -> None:
        """Become the sum of `meters` (every rank's, this one among them): integer counts, so the result is exactly
        that of one meter that saw every batch."""
        scores = {index: value for meter in meters for index, value in meter.scores.items()}
        self.correct = {k: sum(meter.correct[k] for meter in meters) for k in self.topk}
        self.count = sum(meter.count for meter in meters)
        self.confusion = torch.stack([meter.confusion for meter in meters]).sum(dim=0)
        self.scores = dict(sorted(scores.items()))

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no predictions were recorded")
        metrics = {f"top{k}": 100.0 * self.correct[k] / self.count for k in self.topk}
        class_total = self.confusion.sum(dim=1)
        seen = class_total > 0  # classes absent from the split do not count towards the mean
        per_class = self.confusion.diagonal()[seen].double() / class_total[seen].double()
        metrics["per_class_accuracy"] = 100.0 * float(per_class.mean())
        return metrics


def most_confused(confusion: torch.Tensor, classes: list[str], count: int = 10) -> list[dict]:
    """The `count` largest off-diagonal cells: which true class was taken for which, how often, and what share of
    the true class's images that is. Ties keep class order."""
    off_diagonal = confusion.clone()
    off_diagonal.fill_diagonal_(0)
    totals = confusion.sum(dim=1)
    order = torch.argsort(off_diagonal.flatten(), descending=True, stable=True)[:count]
    pairs = []
    for cell in order.tolist():
        true, predicted = divmod(cell, confusion.shape[1])
        if off_diagonal[true, predicted] == 0:
            break
        pairs.append({"true": classes[true], "predicted": classes[predicted],
                      "count": int(off_diagonal[true, predicted]),
                      "share_of_true_class": 100.0 * int(off_diagonal[true, predicted]) / int(totals[true])})
    return pairs
