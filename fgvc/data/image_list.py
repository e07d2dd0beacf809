"""A dataset that is a list of image files with labels (and maybe boxes): Stanford Cars, FGVC-Aircraft, image
folders and ImageNet all reduce to this once their own annotation format is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgvc.boxes import clip_boxes
from fgvc.data.images import read_rgb
from fgvc.data.splits import check_split, check_val_fraction, split_rows


@dataclass
class ImageTable:
    """Images of a dataset in a fixed order: files, 0-based labels, class names, and the official split.

    is_train: the official train/test membership, from which fgvc carves its validation split (see
    fgvc.data.splits); None when the table already is one official split (FGVC-Aircraft ships its own).
    bboxes: (N, 4) x0, y0, x1, y1 (fgvc.boxes) in pixels of the stored image, or None.
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
        check_split(split)
        if self.is_train is None:
            return np.arange(len(self.paths))
        return split_rows(self.labels, self.is_train, split, val_fraction, seed)


class ImageListDataset:
    """One split of an ImageTable. Items are raw samples as in fgvc.data.cub: the decoded RGB image, label (where
    the table has classes), index and, where the table has them, the box."""

    part_names = None
    attribute_names = None
    discriminative_parts = None

    def __init__(self, table: ImageTable, split: str, *, val_fraction: float = 0.1, split_seed: int = 0) -> None:
        check_val_fraction(val_fraction)
        self.table, self.split = table, split
        self.rows = table.rows(split, val_fraction, split_seed)

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def targets(self) -> np.ndarray:
        return self.table.labels[self.rows]

    @property
    def has_boxes(self) -> bool:
        return self.table.bboxes is not None

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        return self.table.paths[self.rows[index]]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = read_rgb(self.image_path(index))
        if self.table.crop_bottom:
            image = image[: max(image.shape[0] - self.table.crop_bottom, 1)]
        sample = {"image": image, "index": int(index)}
        if self.table.classes:  # unlabeled images (fgvc.data.generic.load_unlabeled) have no label key
            sample["label"] = int(self.table.labels[row])
        if self.table.bboxes is not None:  # clipped: the credit banner may have been cut off
            box = torch.from_numpy(self.table.bboxes[row])
            sample["bbox"] = clip_boxes(box, (0, 0, image.shape[1], image.shape[0])).numpy()
        return sample
