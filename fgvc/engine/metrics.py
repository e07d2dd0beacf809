"""Classification metrics: top-1 and top-5 (per sample, micro) and the per-class mean accuracy (macro recall)."""

from __future__ import annotations

import torch


class ClassificationMeter:
    """Accumulates predictions batch by batch; compute() gives percentages over everything seen."""

    def __init__(self, num_classes: int, topk: tuple[int, ...] = (1, 5)) -> None:
        self.num_classes = num_classes
        self.topk = tuple(k for k in topk if k <= num_classes)
        self.correct = dict.fromkeys(self.topk, 0)
        self.count = 0
        self.class_total = torch.zeros(num_classes, dtype=torch.long)
        self.class_correct = torch.zeros(num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        ranked = logits.topk(max(self.topk), dim=1).indices
        hits = ranked == labels[:, None]
        for k in self.topk:
            self.correct[k] += int(hits[:, :k].any(dim=1).sum())
        self.count += len(labels)
        self.class_total += torch.bincount(labels, minlength=self.num_classes)
        self.class_correct += torch.bincount(labels[hits[:, 0]], minlength=self.num_classes)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no predictions were recorded")
        metrics = {f"top{k}": 100.0 * self.correct[k] / self.count for k in self.topk}
        seen = self.class_total > 0  # classes absent from the split do not count towards the mean
        per_class = self.class_correct[seen].double() / self.class_total[seen].double()
        metrics["per_class_accuracy"] = 100.0 * float(per_class.mean())
        return metrics
