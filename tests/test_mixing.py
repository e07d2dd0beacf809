"""The regularization stack: soft targets and label smoothing applied once, Mixup and CutMix against timm, SnapMix
weights against hand-computed CAM masses, parts that a paste covers, dropout and stochastic depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup

from fgvc.build import build_model
from fgvc.config import ModelConfig
from fgvc.errors import OptionError
from fgvc.losses import LabelSmoothingCrossEntropy, smooth, smoothed_targets
from fgvc.mixing import Mixer, covered, cutmix, cutmix_box, mixup, normalized_cams, one_hot, snapmix
from fgvc.models import FGVCModel
from fgvc.models.heads import LinearHead

K = 5


def test_smoothing_is_linear_so_mixing_and_smoothing_commute() -> None:
    a, b, lam, eps = torch.tensor([0, 3]), torch.tensor([2, 3]), 0.3, 0.1
    mixed = lam * one_hot(a, K) + (1 - lam) * one_hot(b, K)
    expected = lam * smoothed_targets(a, K, eps) + (1 - lam) * smoothed_targets(b, K, eps)
    torch.testing.assert_close(smooth(mixed, eps), expected)
    # Sample 0 by hand: 0.3 (1 - eps) + 0.7 eps/4 on class 0; 0.3 eps/4 + 0.7 (1 - eps) on class 2; eps/4 elsewhere.
    torch.testing.assert_close(smooth(mixed, eps)[0], torch.tensor(
        [0.3 * 0.9 + 0.7 * 0.025, 0.025, 0.3 * 0.025 + 0.7 * 0.9, 0.025, 0.025]))
    # SnapMix's weights need not sum to 1: the map stays linear (0.5 e_0 + 0.2 e_1 -> mass 0.7).
    torch.testing.assert_close(smooth(torch.tensor([[0.5, 0.2, 0, 0, 0]]), eps).sum(), torch.tensor(0.7))


def test_soft_target_loss_is_a_float64_hand_computation_and_smooths_once() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, K)
    labels = torch.tensor([0, 1, 4, 2])
    target = 0.6 * one_hot(labels, K) + 0.4 * one_hot(labels.flip(0), K)
    criterion = LabelSmoothingCrossEntropy(0.2)
    loss = criterion({"logits": logits}, {"label": labels, "target": target})["loss"]
    t = target.double()
    smoothed = t * (1 - 0.2 - 0.05) + t.sum(1, keepdim=True) * 0.05
    expected = -(smoothed * torch.log_softmax(logits.double(), 1)).sum(1).mean()
    assert abs(loss.item() - expected.item()) < 1e-6
    # A one-hot target is smoothed exactly as the labels alone are: once, not twice.
    plain = criterion({"logits": logits}, {"label": labels})["loss"]
    as_target = criterion({"logits": logits}, {"label": labels, "target": one_hot(labels, K)})["loss"]
    torch.testing.assert_close(plain, as_target)


def timm_batch(seed: int, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    images, labels = torch.rand(6, 3, 20, 24), torch.tensor([0, 1, 2, 3, 4, 1])
    np.random.seed(seed)
    mixed, target = Mixup(num_classes=K, label_smoothing=0.0, mode="batch", **options)(images.clone(), labels)
    return images, labels, mixed, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_agrees_with_timm(seed: int) -> None:
    images, labels, timm_images, timm_target = timm_batch(seed, mixup_alpha=1.0, cutmix_alpha=0.0)
    np.random.seed(seed)
    np.random.rand()  # timm's draw order: the mix_prob test, then lam
    lam = float(np.random.beta(1.0, 1.0))
    torch.testing.assert_close(mixup(images, lam), timm_images)
    mixer = Mixer(K, seed=0, mixup_alpha=1.0)
    ours = mixer._mixed({"image": images, "label": labels}, mixup(images, lam), lam, 1 - lam, covered_box=None,
                        source_box=None)
    torch.testing.assert_close(ours["target"], timm_target)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_agrees_with_timm_and_lam_is_the_pasted_area(seed: int) -> None:
    images, labels, timm_images, timm_target = timm_batch(seed, mixup_alpha=0.0, cutmix_alpha=1.0)
    np.random.seed(seed)
    np.random.rand()
    lam = float(np.random.beta(1.0, 1.0))
    center = (int(np.random.randint(0, 20)), int(np.random.randint(0, 24)))
    box = cutmix_box(20, 24, lam, center)
    mixed, corrected = cutmix(images, box)
    torch.testing.assert_close(mixed, timm_images)
    changed = (mixed[0] != images[0]).any(dim=0)  # sample 0's partner differs at every pixel
    assert corrected == pytest.approx(1 - changed.float().mean().item())  # lam = 1 - pasted area, after clipping
    ours = Mixer(K, seed=0, cutmix_alpha=1.0)._mixed(
        {"image": images, "label": labels}, mixed, corrected, 1 - corrected, covered_box=box, source_box=box)
    torch.testing.assert_close(ours["target"], timm_target)


def test_cutmix_box_is_the_formula() -> None:
    # lam 0.75: sides sqrt(0.25) = half the image; centred at (10, 12) in a 20 x 24 image: rows 5..14, cols 6..17,
    # as (x0, y0, x1, y1).
    assert cutmix_box(20, 24, 0.75, (10, 12)) == (6, 5, 18, 15)
    assert cutmix_box(20, 24, 0.75, (0, 23)) == (17, 0, 24, 5)  # clipped at the edges


def test_cutmix_covers_parts_and_keeps_the_dominant_label() -> None:
    images = torch.rand(2, 3, 16, 16)
    labels = torch.tensor([1, 3])
    parts = torch.tensor([[[2.0, 2.0, 1.0], [10.0, 10.0, 1.0], [0.0, 0.0, 0.0]],
                          [[3.0, 3.0, 1.0], [12.0, 5.0, 1.0], [9.0, 9.0, 1.0]]])
    box = (8, 8, 16, 16)  # the bottom-right quarter: lam = 0.75, each image keeps its own label
    mixed, lam = cutmix(images, box)
    out = Mixer(K, 0, cutmix_alpha=1.0)._mixed(
        {"image": images, "label": labels, "parts": parts}, mixed, lam, 1 - lam, covered_box=box, source_box=box)
    assert out["label"].tolist() == [1, 3]
    # (10, 10) lies under the pasted quarter: hidden, written as CUB writes hidden parts.
    assert out["parts"][0].tolist() == [[2.0, 2.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert out["parts"][1, :, 2].tolist() == [1.0, 1.0, 0.0]
    # When the paste dominates, the partner's parts inside the box are the ones that stay visible.
    big = (4, 0, 16, 16)  # columns 4..15 of every row, 75% of the image: lam = 0.25
    mixed, lam = cutmix(images, big)
    out = Mixer(K, 0, cutmix_alpha=1.0)._mixed(
        {"image": images, "label": labels, "parts": parts}, mixed, lam, 1 - lam, covered_box=big, source_box=big)
    assert out["label"].tolist() == [3, 1]
    assert out["parts"][0].tolist() == [[0.0, 0.0, 0.0], [12.0, 5.0, 1.0], [9.0, 9.0, 1.0]]
    assert out["parts"][1, :, 2].tolist() == [0.0, 1.0, 0.0]


def test_snapmix_weights_are_cam_masses() -> None:
    images = torch.rand(2, 3, 4, 4)
    cams = torch.zeros(2, 4, 4)
    cams[0, 0, 0], cams[0, 3, 3] = 0.25, 0.75  # a: a quarter of its mass in the top-left pixel
    cams[1, 1:3, 1:3] = 0.25  # b: its mass spread over the centre 2 x 2
    target_box, source_box = (0, 0, 2, 2), (1, 1, 3, 2)  # paste b's 1 x 2 strip into a's top-left 2 x 2
    mixed, rho_a, rho_b = snapmix(images, cams, target_box, source_box)
    # Sample 0 (a) receives sample 1's strip: rho_a = 1 - 0.25, rho_b = b's mass in the strip = 2 x 0.25.
    assert rho_a[0].item() == pytest.approx(0.75) and rho_b[0].item() == pytest.approx(0.5)
    # Sample 1 receives sample 0's strip, which holds none of sample 0's mass; sample 1 loses 0.25 under its box.
    assert rho_a[1].item() == pytest.approx(0.75) and rho_b[1].item() == pytest.approx(0.0)
    strip = images[1, :, 1:2, 1:3]
    expected = torch.nn.functional.interpolate(strip[None], size=(2, 2), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(mixed[0, :, 0:2, 0:2], expected)
    torch.testing.assert_close(mixed[0, :, 2:, :], images[0, :, 2:, :])


@pytest.mark.parametrize(("mass_a", "mass_b"), [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.3, 0.9)])
def test_snapmix_weights_cover_all_of_zero_to_one(mass_a: float, mass_b: float) -> None:
    cams = torch.zeros(2, 2, 2)
    for sample, mass in ((0, mass_a), (1, mass_b)):
        cams[sample, 0, 0], cams[sample, 1, 1] = mass, 1 - mass
    _, rho_a, rho_b = snapmix(torch.rand(2, 3, 2, 2), cams, (0, 0, 1, 1), (0, 0, 1, 1))
    assert rho_a[0].item() == pytest.approx(1 - mass_a) and rho_b[0].item() == pytest.approx(mass_b)


def test_normalized_cams_sum_to_one_and_constant_maps_are_uniform() -> None:
    maps = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    cams = normalized_cams(maps, (2, 2))
    torch.testing.assert_close(cams[0], torch.tensor([[0.0, 1.0], [2.0, 4.0]]) / 7)
    torch.testing.assert_close(cams[1], torch.full((2, 2), 0.25))


def test_snapmix_through_the_model_uses_the_heads_maps() -> None:
    torch.manual_seed(0)
    model = FGVCModel(torch.nn.Identity(), LinearHead(3, K))
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixer = Mixer(K, seed=0, snapmix_prob=1.0)
    out = mixer({"image": images, "label": labels}, model, epoch=0, index=0)
    again = mixer({"image": images, "label": labels}, model, epoch=0, index=0)
    torch.testing.assert_close(out["image"], again["image"])  # draws depend on the position only
    weights = out["target"].sum(dim=1)
    assert ((weights >= 0) & (weights <= 2)).all() and not torch.equal(out["image"], images)


def test_mixer_off_and_probabilities() -> None:
    assert not Mixer(K, 0).enabled
    assert not Mixer(K, 0, mixup_alpha=0.8, mix_prob=0.0).enabled
    with pytest.raises(OptionError, match=r"mix_prob: must be in \[0, 1\], got 1.5"):
        Mixer(K, 0, mix_prob=1.5)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixer = Mixer(K, 0, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.5)
    kinds = set()
    for index in range(40):
        out = mixer({"image": images, "label": labels}, None, epoch=0, index=index)
        unchanged = torch.equal(out["image"], images)
        pasted = (out["image"] == images).any() and not unchanged
        kinds.add("none" if unchanged else "cutmix" if pasted else "mixup")
    assert kinds == {"none", "cutmix", "mixup"}


def test_covered_uses_pixel_extents() -> None:
    points = torch.tensor([[1.5, 1.0], [1.4, 1.0], [3.5, 2.0], [3.4, 2.0]])
    assert covered(points, (2, 0, 4, 4)).tolist() == [True, False, False, True]


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_stochastic_depth_and_dropout_act_only_in_training(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, head="linear", drop_rate=0.5, drop_path_rate=0.5,
                                    output_stride=None if backbone == "test_vit" else 16), K)
    size = 32 if backbone == "test_resnet" else 160
    images = torch.rand(8, 3, size, size)  # 8 samples: the chance that two passes draw the same masks is nil
    for module in model.modules():  # timm zero-initializes each residual branch's last norm: un-zero it
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    drop_paths = [m for m in model.backbone.modules() if type(m).__name__ == "DropPath"]
    assert drop_paths and all(m.drop_prob > 0 for m in drop_paths)
    model.train()
    assert not torch.equal(model(images)["logits"], model(images)["logits"])
    model.head.dropout.eval()  # dropout off: the remaining randomness is stochastic depth alone
    assert not torch.equal(model(images)["logits"], model(images)["logits"])
    model.eval()
    torch.testing.assert_close(model(images)["logits"], model(images)["logits"], rtol=0, atol=0)


def test_a_dominant_paste_brings_its_box_cut_and_moved() -> None:
    """Boxes are (x0, y0, x1, y1) in pixel edges. The partner's box (4, 4, 14, 14), cut to the pasted source region
    (8, 8, 16, 16) and stretched onto the whole 16 x 16 image (x2), becomes (0, 0, 12, 12)."""
    boxes = torch.tensor([[2.0, 2.0, 10.0, 10.0], [4.0, 4.0, 14.0, 14.0]])
    partner_dominant = torch.tensor([False, True])
    moved = Mixer._boxes(boxes, partner_dominant, covered_box=(0, 0, 16, 16), source_box=(8, 8, 16, 16))
    torch.testing.assert_close(moved[0], torch.tensor([0.0, 0.0, 12.0, 12.0]))
    torch.testing.assert_close(moved[1], boxes[1])  # the dominant image keeps its own box
    outside = Mixer._boxes(boxes, partner_dominant, covered_box=(0, 0, 16, 16), source_box=(12, 0, 16, 4))
    assert outside[0].tolist() == [0.0, 0.0, 0.0, 0.0]  # nothing of the partner's box was pasted: no box
