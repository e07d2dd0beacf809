"""A dataset that is a list of image files with labels (and maybe boxes): Stanford Cars, FGVC-Aircraft, image
folders and ImageNet all reduce to this once their own annotation format is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgvc.data.cub import SPLITS, split_rows
from fgvc.data.images import read_rgb


@dataclass
class ImageTable:
    """Images of a dataset in a fixed order: files, 0-based labels, class names, and the official split.

    is_train: the official train/test membership, from which fgvc carves its validation split (see
    fgvc.data.cub.split_rows); None when the table already is one official split (FGVC-Aircraft ships its own).
    bboxes: (N, 4) x, y, w, h in pixels of the stored image, or None.
    crop_bottom: pixels cut from the bottom of every image on reading (FGVC-Aircraft's credit banner); boxes are
    clipped to what remains.
    """

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    is_train: np.ndarray | None = None
    bboxes: np.ndarray | None = None
    crop_bottom: int = 0

    def rows(self, split: str, val_fraction: float, seed: int) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if self.is_train is None:
            return np.arange(len(self.paths))
        return split_rows(self.labels, self.is_train, split, val_fraction, seed)


class ImageListDataset:
    """One split of an ImageTable. Items are raw samples as in fgvc.data.cub: the decoded RGB image, label, index
    and, where the table has them, the box."""

    part_names = None
    attribute_names = None

    def __init__(self, table: ImageTable, split: str, *, val_fraction: float = 0.1, split_seed: int = 0) -> None:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.table, self.split = table, split
        self.rows = table.rows(split, val_fraction, split_seed)

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def targets(self) -> np.ndarray:
        return self.table.labels[self.rows]

    @property
    def bboxes(self) -> np.ndarray | None:
        return None if self.table.bboxes is None else self.table.bboxes[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        return self.table.paths[self.rows[index]]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = read_rgb(self.image_path(index))
        if self.table.crop_bottom:
            image = image[: max(image.shape[0] - self.table.crop_bottom, 1)]
        sample = {"image": image, "label": int(self.table.labels[row]), "index": int(index)}
        if self.table.bboxes is not None:
            sample["bbox"] = clip_box(self.table.bboxes[row], image.shape[1], image.shape[0])
        return sample


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (x, y, w, h) box clipped to the image; all zeros (the "no box in frame" value) when nothing is left."""
    low = np.clip(box[:2], 0, (width, height))
    high = np.clip(box[:2] + box[2:], 0, (width, height))
    if (high - low).min() <= 0:
        return np.zeros(4, dtype=np.float32)
    return np.concatenate([low, high - low]).astype(np.float32)


def inclusive_corners_to_box(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    """MATLAB-style 1-based inclusive pixel corners (Stanford Cars, FGVC-Aircraft) as an (x, y, w, h) box of pixel
    edges in 0-based coordinates, the convention of CUB's bounding_boxes.txt."""
    return x1 - 1.0, y1 - 1.0, x2 - x1 + 1.0, y2 - y1 + 1.0
