"""Part-aware Albumentations presets: the box and the part keypoints move with the image.

Conventions: keypoints are pixel-centre coordinates (pixel k has its centre at x = k, as in Albumentations), boxes
are fgvc's (x0, y0, x1, y1) in pixel edges (fgvc.boxes). A keypoint that leaves the frame becomes not visible -- it
is never clipped onto the border -- and a mirror image relabels left and right parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from fgvc.boxes import clip_boxes
from fgvc.data.parts import mirror_permutation
from fgvc.errors import OptionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize to size / 0.875, centre-crop size: ImageNet's 256 -> 224, FGVC's 512 -> 448
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}


@dataclass(frozen=True)
class Preprocessing:
    """What pretrained weights expect of their input: normalization and the resampling filter (timm's
    pretrained_cfg; ImageNet's statistics and bilinear resampling for a network trained from scratch)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise OptionError("interpolation", f"{self.interpolation!r} is unknown; choose one of "
                                               f"{', '.join(INTERPOLATIONS)}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise OptionError(name, f"needs 3 values (R, G, B), got {list(getattr(self, name))}")
        if min(self.std) <= 0:
            raise OptionError("std", f"values must be positive, got {list(self.std)}")


# Transforms that produce a mirror image, so "left eye" must become "right eye" each time one is applied.
MIRRORS = {"HorizontalFlip", "VerticalFlip", "Transpose"}
UNSUPPORTED = {"D4", "SquareSymmetry"}  # mirror or not depending on a hidden draw: their left/right is unknowable


def train_transform(image_size: int, *, resize_size: int | None = None, crop: str = "random_resized",
                    crop_scale: tuple[float, float] = (0.35, 1.0), hflip: float = 0.5, color_jitter: float = 0.2,
                    preprocessing: Preprocessing = Preprocessing()) -> A.Compose:
    """Training preset.

    crop="resize_crop": resize the short side to `resize_size` (default image_size / 0.875), random crop (the
    standard FGVC recipe, e.g. 512 -> 448). crop="random_resized": random resized crop with `crop_scale`.
    Colour jitter changes brightness, contrast and saturation but never hue: in fine-grained data a colour is often
    the class (a red versus a yellow crown).
    """
    interpolation = INTERPOLATIONS[preprocessing.interpolation]
    if crop == "resize_crop":
        geometry = [A.SmallestMaxSize(max_size=resize_size or round(image_size / EVAL_CROP_RATIO),
                                      interpolation=interpolation),
                    A.RandomCrop(image_size, image_size)]
    elif crop == "random_resized":
        geometry = [A.RandomResizedCrop(size=(image_size, image_size), scale=crop_scale, ratio=(3 / 4, 4 / 3),
                                        interpolation=interpolation)]
    else:
        raise OptionError("crop", f"{crop!r} is unknown; choose 'resize_crop' or 'random_resized'")
    if hflip > 0:
        geometry.append(A.HorizontalFlip(p=hflip))
    color = [A.ColorJitter(color_jitter, color_jitter, color_jitter, hue=0.0, p=1.0)] if color_jitter > 0 else []
    return part_aware_compose(geometry + color, preprocessing.mean, preprocessing.std)


def eval_transform(image_size: int, *, resize_size: int | None = None, wide: bool = False,
                   preprocessing: Preprocessing = Preprocessing()) -> A.Compose:
    """Evaluation preset: resize the short side to image_size / 0.875 (or `resize_size`), centre crop image_size.
    wide: keep the resized centre square instead (ten-crop TTA takes its crops from it)."""
    resize = resize_size or round(image_size / EVAL_CROP_RATIO)
    crop = resize if wide else image_size
    geometry = [A.SmallestMaxSize(max_size=resize, interpolation=INTERPOLATIONS[preprocessing.interpolation]),
                A.CenterCrop(crop, crop)]
    return part_aware_compose(geometry, preprocessing.mean, preprocessing.std)


def part_aware_compose(transforms: list, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    """Wrap geometric/photometric transforms with normalization and the box and keypoint bookkeeping that
    PartAwareTransform needs; use it to build custom pipelines."""
    return A.Compose(
        [*transforms, A.Normalize(mean=mean, std=std), ToTensorV2()],
        # The box travels as its four corners through the keypoint machinery: Albumentations' bbox processor costs
        # ~1 ms more per sample than the whole rest of the pipeline, and for the crops, resizes and flips used
        # here the box of the moved corners is exactly the moved box.
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False, check_each_transform=False),
        save_applied_params=True,  # tells PartAwareTransform which mirrors were applied
    )


class PartAwareTransform:
    """Applies an Albumentations Compose to a raw sample dict (fgvc.data.cub) and returns tensors.

    The randomness of one call is fixed by `seed`, so the caller decides what it depends on (fgvc.data.loader uses
    (run seed, epoch, sample index)). Output keys: image (3 x H x W float), index, and where present label, bbox
    (x0, y0, x1, y1; all zeros when the box left the frame), parts (P x 3: x, y, visible), attributes.
    """

    def __init__(self, compose: A.Compose, part_names: Sequence[str] | None = None) -> None:
        _refuse_unknown_mirrors(compose)
        if not compose.save_applied_params:
            raise ValueError("PartAwareTransform needs A.Compose(..., save_applied_params=True) to track mirrors")
        self.compose = compose
        self.mirror = mirror_permutation(part_names) if part_names is not None else None

    def __call__(self, sample: dict, seed: int) -> dict:
        image = sample["image"]
        has_box, has_parts = "bbox" in sample, "parts" in sample
        if has_parts and self.mirror is None:
            raise ValueError("sample has parts but the transform was built without part_names")
        parts = np.asarray(sample["parts"], dtype=np.float32) if has_parts else np.zeros((0, 3), np.float32)
        visible = parts[:, 2] > 0
        corners = _box_corners(np.asarray(sample["bbox"], dtype=np.float32)) if has_box else np.zeros((0, 2))
        self.compose.set_random_seed(seed)
        out = self.compose(image=image, keypoints=np.concatenate([parts[visible, :2], corners]).astype(np.float32))
        moved = np.asarray(out["keypoints"], dtype=np.float32).reshape(-1, 2)
        height, width = out["image"].shape[-2:]
        result = {"image": out["image"], "index": sample["index"]}
        if "label" in sample:  # unlabeled data (fgvc.data.generic.load_unlabeled) have none
            result["label"] = sample["label"]
        if has_box:
            result["bbox"] = _enclosing_box(moved[len(moved) - 4 :], width, height)
        if has_parts:
            mirrored = sum(name in MIRRORS for name, _ in out["applied_transforms"]) % 2 == 1
            moved_parts = _moved_parts(parts, visible, moved[: int(visible.sum())], width, height)
            result["parts"] = torch.from_numpy(moved_parts[self.mirror] if mirrored else moved_parts)
        if "attributes" in sample:
            result["attributes"] = torch.as_tensor(sample["attributes"], dtype=torch.float32)
        return result



def _moved_parts(parts: np.ndarray, visible: np.ndarray, xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """The part table after the transform: moved points of the visible parts, (0, 0, 0) for those now outside."""
    moved = np.zeros_like(parts)
    # Pixel k spans [k - 0.5, k + 0.5): beyond that the point is outside the image, hence not visible.
    inside = (xy[:, 0] >= -0.5) & (xy[:, 0] < width - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] < height - 0.5)
    rows = np.flatnonzero(visible)[inside]
    moved[rows, :2] = xy[inside]
    moved[rows, 2] = 1.0
    return moved


def _box_corners(box: np.ndarray) -> np.ndarray:
    """The corners of a box of pixel edges, as pixel-centre keypoints (half a pixel further in)."""
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=np.float32) - 0.5


def _enclosing_box(corners: np.ndarray, width: int, height: int) -> torch.Tensor:
    """The moved corners' box, clipped to the frame; all zeros when nothing of it is left in the frame."""
    box = torch.from_numpy(np.concatenate([corners.min(axis=0), corners.max(axis=0)]) + np.float32(0.5))
    return clip_boxes(box, (0, 0, width, height))


def _refuse_unknown_mirrors(compose: A.BaseCompose) -> None:
    for transform in compose.transforms:
        if isinstance(transform, A.BaseCompose):
            _refuse_unknown_mirrors(transform)
        elif type(transform).__name__ in UNSUPPORTED:
            raise ValueError(f"{type(transform).__name__} cannot be used with part keypoints: whether it mirrors "
                             "the image (swapping left and right parts) is not reported; use explicit flips")
