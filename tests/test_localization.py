"""Localization metrics against hand-computed values, Grad-CAM against the exact CAM, synthbirds' parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fgvc
from fgvc.data import CUBDataset
from fgvc.data.synthbirds import CLASS_FACTORS, FACTOR_PART, discriminative_parts
from fgvc.engine.localization import LocalizationMeter, localization_line, meter_for, peaks
from fgvc.models import FGVCModel
from fgvc.models.heads import ISqrtHead, LinearHead, grad_cam, gradient_times_features


def test_peaks_are_pixel_centres_of_the_resized_maximum() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 2] = 1.0  # cell (row 1, col 2) of a 4 x 4 map on a 32 x 32 image: pixels 8-15 x 16-23
    maps[1, 3, 0] = 1.0
    xy = peaks(maps, (32, 32))
    assert 16 <= xy[0, 0] <= 23 and 8 <= xy[0, 1] <= 15
    assert 0 <= xy[1, 0] <= 7 and 24 <= xy[1, 1] <= 31


def test_meter_counts_boxes_and_parts_by_hand() -> None:
    maps = torch.zeros(3, 32, 32)  # at image resolution, so the peaks are exact
    for i, (x, y) in enumerate([(5, 5), (20, 20), (30, 2)]):
        maps[i, y, x] = 1.0
    batch = {
        "image": torch.zeros(3, 3, 32, 32),
        "label": torch.tensor([0, 1, 0]),
        # (x0, y0, x1, y1) in pixel edges: the first and third peaks are inside, the second is not
        "bbox": torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0], [25.0, 0.0, 32.0, 5.0]]),
        # parts (x, y, visible): part 0 discriminates class 0, part 1 class 1
        "parts": torch.tensor([[[6.0, 6.0, 1.0], [0.0, 0.0, 0.0]],       # within 3.2 px of the peak: hit
                               [[0.0, 0.0, 0.0], [20.0, 25.0, 1.0]],     # 5 px away: miss
                               [[30.0, 2.0, 0.0], [30.0, 2.0, 1.0]]]),   # on the peak but not visible: miss
    }
    meter = LocalizationMeter([[0], [1]], part_radius=0.1)  # 3.2 px on a 32-px image
    meter.update(maps, batch)
    metrics = meter.compute()
    assert metrics == {"peak_in_box": pytest.approx(200 / 3), "peak_on_part": pytest.approx(100 / 3)}
    assert localization_line(metrics) == "attention peak in the object box 66.7%, on a discriminative part 33.3%"
    assert localization_line({"top1": 50.0}) == ""


def test_grad_cam_of_a_linear_head_is_its_class_activation_map() -> None:
    torch.manual_seed(0)
    model = FGVCModel(torch.nn.Identity(), LinearHead(6, 4, drop_rate=0.5)).train()
    images = torch.randn(3, 6, 5, 7)  # the identity "backbone" passes these through as features
    labels = torch.tensor([0, 3, 1])
    cam = torch.einsum("bc,bchw->bhw", model.head.fc.weight[labels], images)
    # Grad-CAM runs the head without dropout and leaves it in training mode.
    torch.testing.assert_close(grad_cam(model.head, images, labels), cam.relu().detach() / 35)
    assert model.head.training
    exact = model.class_activation_maps(images, labels)  # the linear head's own: the CAM with the class bias
    torch.testing.assert_close(exact, cam.detach() + model.head.fc.bias[labels].detach()[:, None, None])
    # Per-position gradient x feature is the same map for a linear head (the gradient is w / (h w) everywhere).
    torch.testing.assert_close(gradient_times_features(model.head, images, labels), cam.relu().detach() / 35)


def test_isqrt_maps_are_gradient_times_features() -> None:
    torch.manual_seed(0)
    head = ISqrtHead(6, 4, head_dim=5, isqrt_iterations=3).eval()
    features = torch.rand(8, 6, 5, 5)
    labels = torch.arange(8) % 4
    maps = head.class_activation_maps(features, labels)
    torch.testing.assert_close(maps, gradient_times_features(head, features, labels))
    assert (maps.flatten(1).amax(dim=1) > 0).all()


def test_discriminative_parts_follow_the_one_attribute_neighbours(small_birds: Path) -> None:
    dataset = CUBDataset(small_birds, "test")
    by_class = discriminative_parts(small_birds, dataset.classes)
    classes = json.loads((small_birds / "synthbirds.json").read_text())["classes"]
    for mine, parts in zip(classes, by_class, strict=True):
        differing = {f for other in classes for f in CLASS_FACTORS
                     if other[f] != mine[f] and sum(other[g] != mine[g] for g in CLASS_FACTORS) == 1}
        expected = {FACTOR_PART[f].removeprefix("left ") for f in differing}
        assert {name.removeprefix("left ").removeprefix("right ") for name in parts} == expected
        assert parts  # every class has a neighbour one attribute away
    assert discriminative_parts(small_birds, list(reversed(dataset.classes))) is None  # an edited tree
    # The synthbirds dataset supplies them (as part indices) to the localization metrics; CUB does not know them.
    synthbirds = fgvc.create_dataset("synthbirds", small_birds, "test")
    index = {name: i for i, name in enumerate(synthbirds.part_names)}
    assert synthbirds.discriminative_parts == [[index[name] for name in parts] for parts in by_class]
    assert meter_for(synthbirds).discriminative_parts == synthbirds.discriminative_parts
    assert meter_for(dataset).discriminative_parts is None and meter_for(dataset) is not None  # boxes only
