"""Label smoothing exactly as specified, and metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from fgvc.engine.metrics import ClassificationMeter
from fgvc.losses import LabelSmoothingCrossEntropy, smoothed_targets


def test_smoothed_targets_are_the_formula() -> None:
    labels = torch.tensor([0, 3, 2])
    targets = smoothed_targets(labels, num_classes=5, eps=0.1)
    for row, label in zip(targets, labels.tolist(), strict=True):
        assert row[label] == pytest.approx(0.9)
        assert all(row[k] == pytest.approx(0.1 / 4) for k in range(5) if k != label)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_loss_equals_a_float64_hand_computation(eps: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (16,), generator=generator)
    loss = LabelSmoothingCrossEntropy(eps)({"logits": logits}, {"label": labels})["loss"]
    log_probs = torch.log_softmax(logits.double(), dim=1)
    expected = -(smoothed_targets(labels, 7, eps).double() * log_probs).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
    # PyTorch's label_smoothing spreads eps / K; it matches ours only with eps * K / (K - 1).
    assert F.cross_entropy(logits, labels, label_smoothing=eps * 7 / 6).item() == pytest.approx(loss.item(), rel=1e-5)
    if eps > 0:
        assert F.cross_entropy(logits, labels, label_smoothing=eps).item() != pytest.approx(loss.item(), rel=1e-5)


def test_meter_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 12))
    labels = rng.integers(0, 12, 200)
    labels[:5] = 11  # an uneven class
    meter = ClassificationMeter(12)
    for chunk in range(0, 200, 37):
        meter.update(torch.from_numpy(logits[chunk:chunk + 37]), torch.from_numpy(labels[chunk:chunk + 37]))
    metrics = meter.compute()
    assert metrics["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == labels))
    assert metrics["top5"] == pytest.approx(100 * top_k_accuracy_score(labels, logits, k=5, labels=range(12)))
    assert metrics["per_class_accuracy"] == pytest.approx(100 * balanced_accuracy_score(labels, logits.argmax(1)))


def test_top5_is_dropped_below_five_classes() -> None:
    meter = ClassificationMeter(3)
    meter.update(torch.eye(3), torch.tensor([0, 1, 1]))
    assert meter.compute() == pytest.approx({"top1": 200 / 3, "per_class_accuracy": 75.0})
