"""Datasets that are not fine-grained but are one flag away for seed benchmarks and sanity checks: any ImageFolder
tree, and torchvision's MNIST, CIFAR-10/100 and ImageNet when they are already on disk (nothing is downloaded).
All of them give the same raw samples as the FGVC datasets (fgvc.data.cub): an H x W x 3 uint8 RGB image, the
label and the index."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fgvc.data.annotations import AnnotationError
from fgvc.data.image_list import ImageTable

FOLDER_LAYOUT = ("ROOT/train/<class>/<image> (required), ROOT/val/<class>/<image> (optional: otherwise a "
                 "validation split is carved from train), ROOT/test/<class>/<image> (needed for the test split)")


def load_image_folder(root: str | os.PathLike, split: str, echo: Callable[[str], None] = print) -> ImageTable:
    """`split` of an ImageFolder tree. Classes are the sorted folder names of ROOT/train (torchvision's
    convention); val/ and test/ may hold only some of them, never others. Files without an image extension are
    listed in the log, not read."""
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        raise AnnotationError(f"{root}: no train/ folder; expected {FOLDER_LAYOUT}")
    try:
        classes, class_to_idx = find_classes(root / "train")
    except FileNotFoundError as error:
        raise AnnotationError(f"{root / 'train'}: {error}") from None
    has_val = (root / "val").is_dir()
    if split == "test":
        if not (root / "test").is_dir():
            raise AnnotationError(f"{root}: no test/ folder, so there is no test split; expected {FOLDER_LAYOUT}")
        folders = ["test"]
    elif has_val:
        folders = {"train": ["train"], "val": ["val"], "trainval": ["train", "val"]}[split]
    else:
        folders = ["train"]
    paths, labels = [], []
    for folder in folders:
        found = _folder_samples(root / folder, class_to_idx, echo)
        paths += [Path(path) for path, _ in found]
        labels += [label for _, label in found]
    # With official val/ (or the test folder) the table is the split itself; otherwise val is carved from train.
    is_train = None if split == "test" or has_val else np.ones(len(paths), dtype=bool)
    return ImageTable(paths, np.array(labels, dtype=np.int64), classes, is_train=is_train)


def _folder_samples(folder: Path, class_to_idx: dict[str, int], echo: Callable[[str], None]) -> list[tuple[str, int]]:
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: folder not found")
    unknown = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name not in class_to_idx)
    if unknown:
        raise AnnotationError(f"{folder}: class folder(s) {', '.join(unknown)} are not classes of "
                              f"{folder.parent / 'train'}")
    present = {name: index for name, index in class_to_idx.items() if (folder / name).is_dir()}
    samples = make_dataset(str(folder), present, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise AnnotationError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    listed = {path for path, _ in samples}
    ignored = sorted(str(path) for path in folder.rglob("*") if path.is_file() and str(path) not in listed)
    if ignored:
        echo(f"{folder}: not reading {len(ignored)} file(s) without an image extension, e.g. {ignored[0]}")
    return samples


def load_unlabeled(root: str | os.PathLike, echo: Callable[[str], None] = print) -> ImageTable:
    """Every image file under `root`, at any depth, in sorted order, with no labels (self-supervised
    pretraining's data); files without an image extension are listed in the log, not read."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AnnotationError(f"{root}: folder not found")
    files = sorted(path for path in root.rglob("*") if path.is_file())
    paths = [path for path in files if path.suffix.lower() in IMG_EXTENSIONS]
    if not paths:
        raise AnnotationError(f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) in it or below it")
    if len(paths) < len(files):
        echo(f"{root}: not reading {len(files) - len(paths)} file(s) without an image extension, e.g. "
             f"{next(path for path in files if path.suffix.lower() not in IMG_EXTENSIONS)}")
    return ImageTable(paths, np.full(len(paths), -1, dtype=np.int64), classes=[])


# ---------------------------------------------------------------------------------------------------------------
# torchvision's datasets, read from disk as they store them
# ---------------------------------------------------------------------------------------------------------------


class ArrayDataset:
    """A split of a dataset that torchvision holds decoded in memory (MNIST, CIFAR): raw samples as above."""

    part_names = None
    attribute_names = None
    discriminative_parts = None
    has_boxes = False

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], rows: np.ndarray) -> None:
        self.images, self.labels, self.classes, self.rows = images, labels, classes, rows

    @property
    def targets(self) -> np.ndarray:
        return self.labels[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> None:
        return None  # decoded by torchvision when it loaded the dataset; there is no file to check

    def __getitem__(self, index: int) -> dict:
        image = self.images[self.rows[index]]
        if image.ndim == 2:  # MNIST is greyscale
            image = np.repeat(image[..., None], 3, axis=2)
        return {"image": np.ascontiguousarray(image), "label": int(self.labels[self.rows[index]]),
                "index": int(index)}


def load_torchvision_arrays(name: str, root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str],
                                                                            np.ndarray]:
    """(images, labels, classes, is_train) of torchvision's MNIST, CIFAR10 or CIFAR100 stored under `root`, train
    images first."""
    from torchvision import datasets

    kind = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    parts = []
    for train in (True, False):
        try:
            parts.append(kind(str(Path(root).expanduser()), train=train, download=False))
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. ..."
            raise AnnotationError(f"{root}: {kind.__name__} ({'train' if train else 'test'}) not found: {error}") \
                from None
    images = np.concatenate([np.asarray(part.data) for part in parts])
    labels = np.concatenate([np.asarray(part.targets, dtype=np.int64) for part in parts])
    is_train = np.arange(len(labels)) < len(parts[0].targets)
    return images, labels, list(parts[0].classes), is_train


def load_imagenet(root: str | os.PathLike) -> ImageTable:
    """ILSVRC-2012 as torchvision's ImageNet finds it (meta.bin, train/, val/ under `root`). Its official val is
    fgvc's test split (the standard protocol); fgvc's val is carved from train. Class names are "<wnid> <first
    name>", unique where ImageNet's first names are not ("crane" is two classes)."""
    from torchvision.datasets import ImageNet

    splits = []
    for split in ("train", "val"):
        try:
            splits.append(ImageNet(str(Path(root).expanduser()), split=split))
        except RuntimeError as error:
            raise AnnotationError(f"{root}: ImageNet ({split}) not found: {error}") from None
    train, val = splits
    if val.wnids != train.wnids:
        raise AnnotationError(f"{root}: val/ and train/ hold different class folders ({len(val.wnids)} vs "
                              f"{len(train.wnids)}); labels would not correspond")
    classes = [f"{wnid} {names[0]}" for wnid, names in zip(train.wnids, train.classes, strict=True)]
    samples = train.samples + val.samples
    return ImageTable([Path(path) for path, _ in samples], np.array([label for _, label in samples]), classes,
                      is_train=np.arange(len(samples)) < len(train.samples))
