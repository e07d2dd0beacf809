"""Part-aware transforms: keypoints stay on the drawn parts, boxes follow the image, flips swap left and right."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from fgvc.data.parts import CUB_PART_NAMES, mirror_permutation
from fgvc.data.synthbirds import class_attributes, render_bird
from fgvc.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PartAwareTransform,
    eval_transform,
    part_aware_compose,
    train_transform,
)

PART = {name: i for i, name in enumerate(CUB_PART_NAMES)}
CLASSES = class_attributes(12, seed=0)


def bird_sample(k: int, size: int = 160, difficulty: float = 0.0) -> tuple[dict, np.ndarray]:
    bird = render_bird(CLASSES[k % len(CLASSES)], np.random.default_rng([99, k]), size, difficulty)
    sample = {"image": bird.image, "label": 0, "index": k, "bbox": bird.bbox.astype(np.float32),
              "parts": bird.parts.astype(np.float32)}
    return sample, bird.part_colors


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Undo Normalize + ToTensorV2."""
    hwc = image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(hwc * 255 + 0.5, 0, 255).astype(np.uint8)


def colour_near(image: np.ndarray, x: float, y: float, colour: np.ndarray, tolerance: int) -> bool:
    """Is there a pixel within one pixel of (x, y) whose colour is within `tolerance` of `colour`?"""
    h, w = image.shape[:2]
    cx, cy = round(x), round(y)
    patch = image[max(cy - 1, 0): min(cy + 2, h), max(cx - 1, 0): min(cx + 2, w)].reshape(-1, 3).astype(int)
    return bool((np.abs(patch - colour.astype(int)).max(axis=1) <= tolerance).any())


def test_generator_keypoints_sit_on_their_parts() -> None:
    for k in range(40):
        sample, colours = bird_sample(k)
        for i in np.flatnonzero(sample["parts"][:, 2]):
            x, y, _ = sample["parts"][i]
            assert colour_near(sample["image"], x, y, colours[i], tolerance=12), (k, CUB_PART_NAMES[i])


@pytest.mark.parametrize("crop", ["random_resized", "resize_crop"])
def test_keypoints_stay_on_the_drawn_parts_after_training_transforms(crop: str) -> None:
    transform = PartAwareTransform(train_transform(128, crop=crop, color_jitter=0.0), CUB_PART_NAMES)
    checked = flipped = 0
    for k in range(40):
        sample, colours = bird_sample(k)
        # Only the near-side eye and wing are drawn; give the hidden side the same colour, so the check below does
        # not depend on whether the bird was flipped (the flip test checks the relabelling itself).
        colours = np.where(colours.any(axis=1, keepdims=True), colours, colours[mirror_permutation(CUB_PART_NAMES)])
        out = transform(sample, seed=1000 + k)
        image, parts = to_uint8(out["image"]), out["parts"].numpy()
        assert image.shape == (128, 128, 3)
        # Which way does the bird face now? The near-side eye tells; a flip turns "left" into "right".
        was_left = sample["parts"][PART["left eye"], 2] == 1
        now = parts[[PART["left eye"], PART["right eye"]], 2]
        if now.any():
            flipped += bool(now[1] if was_left else now[0])
        for i in np.flatnonzero(parts[:, 2]):
            x, y, _ = parts[i]
            assert -0.5 <= x < 127.5 and -0.5 <= y < 127.5
            assert colour_near(image, x, y, colours[i], tolerance=40), (k, CUB_PART_NAMES[i], crop)
            checked += 1
        # A part the transform reports visible was visible before, on the same or the mirrored side.
        before = sample["parts"][:, 2] == 1
        assert (parts[:, 2] <= np.maximum(before, before[mirror_permutation(CUB_PART_NAMES)])).all()
    assert checked > 300 and 5 < flipped < 35  # enough keypoints checked, and both orientations seen


@pytest.mark.parametrize("crop", ["random_resized", "resize_crop"])
def test_box_follows_the_image(crop: str) -> None:
    """Oracle: Albumentations' own bbox processor, run on the same seeded transforms."""
    transform = PartAwareTransform(train_transform(96, crop=crop), CUB_PART_NAMES)
    oracle = A.Compose(transform.compose.transforms, bbox_params=A.BboxParams(format="pascal_voc",  # x0 y0 x1 y1
                                                                              label_fields=["labels"], clip=True))
    emptied = 0
    for k in range(30):
        sample, _ = bird_sample(k)
        box = transform(sample, seed=k)["bbox"].numpy()
        oracle.set_random_seed(k)
        expected = oracle(image=sample["image"], bboxes=sample["bbox"][None], labels=[0])["bboxes"]
        if len(expected) == 0:
            np.testing.assert_array_equal(box, 0)  # the box left the frame entirely
            emptied += 1
        else:
            np.testing.assert_allclose(box, expected[0], atol=0.75)
    assert emptied < 5


def test_horizontal_flip_mirrors_coordinates_and_swaps_left_and_right() -> None:
    transform = PartAwareTransform(part_aware_compose([A.HorizontalFlip(p=1.0)]), CUB_PART_NAMES)
    for k in range(6):
        sample, colours = bird_sample(k)
        out = transform(sample, seed=k)
        parts, image = out["parts"].numpy(), to_uint8(out["image"])
        width = sample["image"].shape[1]
        for name in CUB_PART_NAMES:
            partner = name.replace("left", "@").replace("right", "left").replace("@", "right")
            x, y, visible = sample["parts"][PART[partner]]
            expected = [width - 1 - x, y, 1.0] if visible else [0.0, 0.0, 0.0]
            np.testing.assert_allclose(parts[PART[name]], expected, atol=1e-4)
        faces_right = sample["parts"][PART["left eye"], 2] == 1
        seen, mirrored = ("left eye", "right eye") if faces_right else ("right eye", "left eye")
        x, y, visible = parts[PART[mirrored]]
        assert visible == 1 and colour_near(image, x, y, colours[PART[seen]], tolerance=12)


def test_keypoints_that_leave_the_frame_become_invisible_not_clipped() -> None:
    sample, _ = bird_sample(0)
    parts = sample["parts"]
    transform = PartAwareTransform(part_aware_compose([A.Crop(x_min=0, y_min=0, x_max=80, y_max=160)]),
                                   CUB_PART_NAMES)
    out = transform(sample, seed=0)["parts"].numpy()
    left_half = (parts[:, 2] == 1) & (parts[:, 0] < 79.5)
    right_half = (parts[:, 2] == 1) & (parts[:, 0] >= 79.5)
    assert left_half.any() and right_half.any()
    np.testing.assert_allclose(out[left_half], parts[left_half])
    np.testing.assert_array_equal(out[right_half], 0.0)  # not moved onto the border


def test_same_seed_same_result_different_seed_different() -> None:
    transform = PartAwareTransform(train_transform(64), CUB_PART_NAMES)
    sample, _ = bird_sample(3)
    a, b, c = transform(sample, 5), transform(sample, 5), transform(sample, 6)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["parts"], b["parts"])
    assert not torch.equal(a["image"], c["image"])


def test_eval_transform_is_resize_then_centre_crop() -> None:
    sample, _ = bird_sample(1, size=128)
    out = PartAwareTransform(eval_transform(112), CUB_PART_NAMES)(sample, seed=0)
    # 128 -> 112 / 0.875 = 128 (no resize), then the central 112 x 112: a shift by 8 pixels.
    assert out["image"].shape == (3, 112, 112)
    visible = (sample["parts"][:, 2] == 1) & (np.abs(sample["parts"][:, :2] - 63.5).max(axis=1) < 55)
    np.testing.assert_allclose(out["parts"].numpy()[visible, :2], sample["parts"][visible, :2] - 8, atol=1e-4)
    np.testing.assert_allclose(to_uint8(out["image"]).astype(int), sample["image"][8:120, 8:120].astype(int), atol=1)


def test_mirror_permutation_and_refusals() -> None:
    permutation = mirror_permutation(CUB_PART_NAMES)
    assert [CUB_PART_NAMES[i] for i in permutation[[6, 7, 8, 0]]] == ["right eye", "right leg", "right wing", "back"]
    with pytest.raises(ValueError, match="no 'right fin' partner"):
        mirror_permutation(["left fin", "tail"])
    with pytest.raises(ValueError, match="D4 cannot be used"):
        PartAwareTransform(part_aware_compose([A.D4()]), CUB_PART_NAMES)
    with pytest.raises(ValueError, match="without part_names"):
        PartAwareTransform(part_aware_compose([A.HorizontalFlip(p=0.0)]))(bird_sample(0)[0], seed=0)
    with pytest.raises(ValueError, match="crop: .zoom. is unknown"):
        train_transform(64, crop="zoom")
