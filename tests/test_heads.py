"""FGVC heads: outputs contract on CNN and ViT backbones, pooled features against float64 references,
Newton-Schulz square roots, and WS-DAN's crop/drop geometry and centers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fgvc.build import build_model
from fgvc.config import ConfigError, ModelConfig, WSDANConfig
from fgvc.engine.checkpoint import load_checkpoint, save_checkpoint
from fgvc.losses import LabelSmoothingCrossEntropy
from fgvc.models import HEADS
from fgvc.models.heads import newton_schulz_sqrt
from fgvc.models.wsdan import (
    attention_boxes,
    attention_drop,
    choose_maps,
    crop_and_resize,
    normalized_upsampled,
    random_thresholds,
)

HEAD_NAMES = ["linear", "bilinear", "isqrt", "wsdan"]


def head_config(name: str, backbone: str = "test_resnet") -> ModelConfig:
    return ModelConfig(backbone=backbone, head=name, head_dim=8 if name in ("bilinear", "isqrt") else None,
                       num_attention_maps=4, output_stride=stride_for(backbone))


def stride_for(backbone: str) -> int | None:
    """The quick start's output stride for CNNs; ViTs keep their own."""
    return None if backbone == "test_vit" else 16


def features(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def signed_sqrt_l2(p: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.sign(p) * torch.sqrt(p.abs() + 1e-12), dim=1, eps=1e-12)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_every_head_trains_and_infers_on_cnn_and_vit(backbone: str, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(head_config(name, backbone), num_classes=5)
    size = 64 if backbone == "test_resnet" else 160  # test_vit takes 160 px (10 x 10 patches)
    batch = {"image": torch.randn(4, 3, size, size), "label": torch.tensor([0, 1, 2, 3])}
    outputs, losses = model.training_step(batch, LabelSmoothingCrossEntropy(0.1))
    losses["loss"].backward()
    assert outputs["logits"].shape == (4, 5)
    assert torch.isfinite(losses["loss"])
    trained = [p for p in model.head.parameters() if p.grad is not None]
    assert trained and all(torch.isfinite(p.grad).all() for p in trained)
    model.eval()
    with torch.no_grad():
        inference = model(batch["image"])
    assert inference["logits"].shape == (4, 5)
    if name == "wsdan":
        assert set(losses) == {"loss", "raw", "crop", "drop", "center"}
        assert inference["attention_maps"].shape[:2] == (4, 4)
        assert inference["part_features"].shape[1] == 4 * model.backbone.num_features


def test_bilinear_head_pools_as_the_formula_says() -> None:
    head = HEADS.get("bilinear")(6, 3, head_dim=None).double().eval()
    x = features(2, 6, 4, 5)
    flat = x.flatten(2)
    expected = head.fc(signed_sqrt_l2((flat @ flat.transpose(1, 2) / 20).flatten(1)))
    torch.testing.assert_close(head(x)["logits"], expected, rtol=1e-12, atol=1e-12)


def test_isqrt_head_is_the_square_root_of_the_covariance() -> None:
    head = HEADS.get("isqrt")(6, 3, head_dim=5, isqrt_iterations=5).double().eval()
    x = features(2, 6, 4, 5)
    reduced = head.reduce(x).flatten(2)
    centered = reduced - reduced.mean(2, keepdim=True)
    covariance = centered @ centered.transpose(1, 2) / 20
    root = newton_schulz_sqrt(covariance, 5)
    rows, cols = torch.triu_indices(5, 5)
    torch.testing.assert_close(head(x)["logits"], head.fc(root[:, rows, cols]), rtol=1e-12, atol=1e-12)
    assert head.fc.in_features == 15


def test_wsdan_part_features_are_bilinear_attention_pooling() -> None:
    head = HEADS.get("wsdan")(6, 3, num_attention_maps=4).double().eval()
    x = features(2, 6, 4, 5)
    maps = head.attention(x)
    expected = signed_sqrt_l2(torch.einsum("bmhw,bchw->bmc", maps, x).flatten(1) / 20)
    outputs = head(x)
    torch.testing.assert_close(outputs["part_features"], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(outputs["logits"], head.fc(expected * 100), rtol=1e-12, atol=1e-12)


def random_spd(n: int, seed: int, low: float = 0.5, high: float = 2.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(features(n, n, seed=seed))
    eigenvalues = torch.linspace(low, high, n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def eigen_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.transpose(-1, -2)


def test_newton_schulz_matches_the_eigendecomposition_square_root() -> None:
    matrices = torch.stack([random_spd(6, seed) for seed in range(3)])
    exact = eigen_sqrt(matrices)
    # Converged: as accurate as float64 allows.
    torch.testing.assert_close(newton_schulz_sqrt(matrices, 20), exact, rtol=1e-10, atol=1e-10)
    # iSQRT-COV's 5 iterations: an approximation, close on well-conditioned matrices.
    relative = (newton_schulz_sqrt(matrices, 5) - exact).norm() / exact.norm()
    assert relative < 0.02


def test_newton_schulz_stays_finite_on_singular_matrices() -> None:
    vectors = features(6, 2)
    rank_two = (vectors @ vectors.T)[None]
    zero = torch.zeros(1, 6, 6, dtype=torch.float64)
    root = newton_schulz_sqrt(torch.cat([rank_two, zero]), 5)
    assert torch.isfinite(root).all()
    assert root[1].abs().max() == 0
    # On the range of a singular matrix the iteration still approaches the true root.
    exact = eigen_sqrt(rank_two)
    assert ((newton_schulz_sqrt(rank_two, 30) - exact).norm() / exact.norm()) < 1e-3


def peaked_maps() -> torch.Tensor:
    """Two 4 x 4 maps: peaks at (row 1, col 2) and (row 3, col 0)."""
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 2], maps[0, 1, 3] = 1.0, 0.5
    maps[1, 3, 0], maps[1, 2, 0] = 2.0, 1.5
    return maps


def test_attention_crop_box_contains_the_peak_and_follows_the_threshold() -> None:
    maps = peaked_maps()
    upsampled = normalized_upsampled(maps, (32, 32))
    boxes = attention_boxes(maps, torch.tensor([0.5, 0.5]), (32, 32), padding=0.0)
    for box, up in zip(boxes, upsampled, strict=True):
        x0, y0, x1, y1 = box.tolist()
        peak_y, peak_x = divmod(int(up.argmax()), 32)
        assert x0 <= peak_x < x1 and y0 <= peak_y < y1
        region = (up >= 0.5).nonzero()
        assert (y0, x0) == tuple(region.min(0).values.tolist())  # tight around the thresholded region
        assert (y1 - 1, x1 - 1) == tuple(region.max(0).values.tolist())
    padded = attention_boxes(maps, torch.tensor([0.5, 0.5]), (32, 32), padding=0.1)
    assert (padded[:, :2] <= boxes[:, :2]).all() and (padded[:, 2:] >= boxes[:, 2:]).all()
    empty = attention_boxes(torch.zeros(1, 4, 4), torch.tensor([0.5]), (32, 32), padding=0.1)
    assert empty.tolist() == [[0, 0, 32, 32]]  # nothing above the threshold: the whole image


def test_crop_is_differentiable_in_the_images_and_resized_back() -> None:
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    boxes = torch.tensor([[4, 8, 20, 24], [0, 0, 32, 32]])
    crops = crop_and_resize(images, boxes)
    assert crops.shape == images.shape
    torch.testing.assert_close(crops[1], images[1])  # the whole image comes back unchanged
    crops.sum().backward()
    assert images.grad[0, :, 8:24, 4:20].abs().sum() > 0
    assert images.grad[0, :, :8].abs().sum() == 0  # outside the box: no influence


def test_drop_erases_exactly_the_thresholded_region() -> None:
    images = torch.randn(2, 3, 32, 32)
    maps = peaked_maps()
    thresholds = torch.tensor([0.3, 0.6])
    dropped = attention_drop(images, maps, thresholds)
    region = normalized_upsampled(maps, (32, 32)) >= thresholds[:, None, None]
    assert region.any() and (~region).any()
    assert (dropped[region[:, None].expand_as(images)] == 0).all()
    assert torch.equal(dropped[~region[:, None].expand_as(images)], images[~region[:, None].expand_as(images)])


def test_map_choice_and_thresholds_are_deterministic_under_a_seed() -> None:
    maps = torch.rand(5, 8, 4, 4, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        crop, drop = choose_maps(maps, generator)
        return crop, drop, random_thresholds([0.4, 0.6], 5, torch.device("cpu"), generator)

    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert ((first[2] >= 0.4) & (first[2] <= 0.6)).all()
    assert not torch.equal(first[0], first[1])  # crop and drop use two different maps


def test_wsdan_centers_move_and_survive_a_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(head_config("wsdan"), num_classes=3)
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 0, 2, 2])}
    model.training_step(batch, LabelSmoothingCrossEntropy(0.0))
    centers = model.head.centers
    assert centers[[0, 2]].abs().sum() > 0 and centers[1].abs().sum() == 0  # only the batch's classes moved
    save_checkpoint(tmp_path / "model.pt", {"model": model.state_dict()})
    restored = build_model(head_config("wsdan"), num_classes=3)
    restored.load_state_dict(load_checkpoint(tmp_path / "model.pt")["model"])
    assert torch.equal(restored.head.centers, centers)


def test_head_options_are_checked_and_named_by_their_keys() -> None:
    with pytest.raises(ConfigError, match="model.num_attention_maps: must be at least 2"):
        build_model(ModelConfig(backbone="test_resnet", head="wsdan", num_attention_maps=1), num_classes=3)
    with pytest.raises(ConfigError, match=r"model.wsdan.crop_threshold: must be \[low, high\]"):
        build_model(ModelConfig(backbone="test_resnet", head="wsdan", wsdan=WSDANConfig(crop_threshold=[0.7, 0.2])), 3)
    with pytest.raises(ConfigError, match="model.isqrt_iterations: must be at least 1"):
        build_model(ModelConfig(backbone="test_resnet", head="isqrt", isqrt_iterations=0), num_classes=3)
