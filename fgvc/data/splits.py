"""The splits every dataset offers, and how fgvc carves a validation split from official training images.

"train" and "val" partition the official training images (stratified, seeded: selecting on test is this field's most
common protocol error, and most FGVC datasets ship no validation split), "trainval" is all official training images,
"test" the official test images. Datasets with an official validation split (FGVC-Aircraft) use theirs instead.
"""

from __future__ import annotations

import numpy as np

from fgvc.errors import OptionError

SPLITS = ("train", "val", "trainval", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise OptionError("split", f"{split!r} is unknown; choose one of {', '.join(SPLITS)}")


def check_val_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise OptionError("val_fraction", f"must be in [0, 1), got {val_fraction}")


def split_rows(labels: np.ndarray, is_train: np.ndarray, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Rows of a split. Val is a stratified, seeded fraction of each class's official training images."""
    check_split(split)
    if split == "test":
        return np.flatnonzero(~is_train)
    if split == "trainval":
        return np.flatnonzero(is_train)
    rng = np.random.default_rng([seed, 3])
    val = []
    for label in np.unique(labels[is_train]):
        rows = np.flatnonzero(is_train & (labels == label))
        n_val = round(val_fraction * len(rows))
        if val_fraction > 0 and len(rows) > 1:
            n_val = min(max(n_val, 1), len(rows) - 1)  # every class in val, and every class still in train
        val.extend(rng.permutation(rows)[:n_val].tolist())
    in_val = np.zeros(len(labels), dtype=bool)
    in_val[val] = True
    return np.flatnonzero(in_val if split == "val" else is_train & ~in_val)
