"""Stanford Cars (196 classes, 8,144 train / 8,041 test), in either of its two official layouts.

- split layout: cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat and the labelled test
  file cars_test_annos_withlabels.mat, at the root or in devkit/;
- all-in-one layout: car_ims/ and cars_annos.mat (relative_im_path, bbox, class, test flag).

Either may sit in the given folder or in its stanford_cars/ subfolder (torchvision's nesting). The layout found is
logged. There is no working download (the official URL is dead), so a missing dataset gets an error that lists
exactly what to put where. Labels are the .mat `class` minus 1; boxes are read as 1-based inclusive corners.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io

from fgvc.boxes import from_inclusive_corners
from fgvc.data.annotations import AnnotationError
from fgvc.data.image_list import ImageTable

BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
EXPECTED_LAYOUTS = """expected one of the two official Stanford Cars layouts (in this folder or in its stanford_cars/ \
subfolder):
  split layout:       cars_train/*.jpg, cars_test/*.jpg, devkit/cars_meta.mat, devkit/cars_train_annos.mat,
                      cars_test_annos_withlabels.mat (here or in devkit/)
  all-in-one layout:  car_ims/*.jpg, cars_annos.mat
The dataset has no working download; copy the files into one of these layouts."""


def load_cars(root: str | os.PathLike, echo: Callable[[str], None] = print) -> ImageTable:
    """Every Stanford Cars image (train then test) with its label, box and official split."""
    root = Path(root).expanduser()
    for base in (root, root / "stanford_cars"):
        if _is_split_layout(base):
            echo(f"Stanford Cars: split layout (cars_train/, cars_test/, devkit/) in {base}")
            return _load_split_layout(base)
        if (base / "cars_annos.mat").is_file() and (base / "car_ims").is_dir():
            echo(f"Stanford Cars: all-in-one layout (car_ims/, cars_annos.mat) in {base}")
            return _load_all_in_one(base)
    raise AnnotationError(f"{root}: no Stanford Cars dataset found; {EXPECTED_LAYOUTS}")


def _labelled_test_file(base: Path) -> Path | None:
    for candidate in (base / "cars_test_annos_withlabels.mat", base / "devkit" / "cars_test_annos_withlabels.mat"):
        if candidate.is_file():
            return candidate
    return None


def _is_split_layout(base: Path) -> bool:
    return ((base / "devkit" / "cars_train_annos.mat").is_file() and (base / "cars_train").is_dir()
            and (base / "cars_test").is_dir())


def _load_split_layout(base: Path) -> ImageTable:
    test_file = _labelled_test_file(base)
    if test_file is None:
        raise AnnotationError(f"{base}: the labelled test annotations cars_test_annos_withlabels.mat are neither "
                              f"here nor in {base / 'devkit'} (devkit/cars_test_annos.mat has no labels)")
    classes = _class_names(base / "devkit" / "cars_meta.mat")
    paths, labels, boxes, is_train = [], [], [], []
    for mat, folder, train in ((base / "devkit" / "cars_train_annos.mat", base / "cars_train", True),
                               (test_file, base / "cars_test", False)):
        records = _annotations(mat, ("fname", "class", *BOX_FIELDS))
        for i, record in enumerate(records):
            paths.append(_image(mat, i, "fname", folder, record["fname"]))
            labels.append(_label(mat, i, record["class"], len(classes)))
            boxes.append(_box(mat, i, record))
            is_train.append(train)
    return ImageTable(paths, np.array(labels), classes, np.array(is_train), np.array(boxes, dtype=np.float32))


def _load_all_in_one(base: Path) -> ImageTable:
    mat = base / "cars_annos.mat"
    classes = _class_names(mat)
    paths, labels, boxes, is_train = [], [], [], []
    for i, record in enumerate(_annotations(mat, ("relative_im_path", "class", "test", *BOX_FIELDS))):
        paths.append(_image(mat, i, "relative_im_path", base, record["relative_im_path"]))
        labels.append(_label(mat, i, record["class"], len(classes)))
        boxes.append(_box(mat, i, record))
        test = _integer(mat, i, "test", record["test"])
        if test not in (0, 1):
            raise AnnotationError(f"{mat}: annotations[{i}].test = {test!r}, expected 0 or 1")
        is_train.append(test == 0)
    return ImageTable(paths, np.array(labels), classes, np.array(is_train), np.array(boxes, dtype=np.float32))


def _load_mat(path: Path) -> dict:
    if not path.is_file():
        raise AnnotationError(f"{path}: file not found; {EXPECTED_LAYOUTS}")
    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError, NotImplementedError) as error:
        raise AnnotationError(f"{path}: not a readable MATLAB .mat file ({error})") from error


def _class_names(path: Path) -> list[str]:
    content = _load_mat(path)
    if "class_names" not in content:
        raise AnnotationError(f"{path}: no 'class_names' field (found: {', '.join(_fields(content))})")
    names = np.atleast_1d(content["class_names"]).tolist()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(f"{path}: class_names[{i}] = {name!r} is not a class name")
    return names


def _fields(content: dict) -> list[str]:
    return [key for key in content if not key.startswith("__")]


def _annotations(path: Path, required: tuple[str, ...]) -> np.ndarray:
    content = _load_mat(path)
    if "annotations" not in content:
        raise AnnotationError(f"{path}: no 'annotations' field (found: {', '.join(_fields(content))})")
    records = np.atleast_1d(content["annotations"])
    names = records.dtype.names or ()
    missing = [name for name in required if name not in names]
    if missing:
        raise AnnotationError(f"{path}: 'annotations' lacks the field(s) {', '.join(missing)} "
                              f"(has: {', '.join(names) or 'none'})")
    if len(records) == 0:
        raise AnnotationError(f"{path}: 'annotations' is empty")
    return records


def _integer(path: Path, i: int, field: str, value) -> int:
    if isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and float(value).is_integer()):
        return int(value)
    raise AnnotationError(f"{path}: annotations[{i}].{field} = {value!r} is not an integer")


def _label(path: Path, i: int, value, num_classes: int) -> int:
    label = _integer(path, i, "class", value)
    if not 1 <= label <= num_classes:
        raise AnnotationError(f"{path}: annotations[{i}].class = {label} outside 1..{num_classes}")
    return label - 1


def _box(path: Path, i: int, record) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (_integer(path, i, field, record[field]) for field in BOX_FIELDS)
    if x2 < x1 or y2 < y1:
        raise AnnotationError(f"{path}: annotations[{i}] has an empty box ({x1}, {y1}, {x2}, {y2})")
    return from_inclusive_corners(x1, y1, x2, y2)


def _image(path: Path, i: int, field: str, folder: Path, name) -> Path:
    if not isinstance(name, str) or not name:
        raise AnnotationError(f"{path}: annotations[{i}].{field} = {name!r} is not a file name")
    image = folder / name
    if not image.is_file():
        raise AnnotationError(f"{path}: annotations[{i}].{field} = {name!r}: image file not found: {image}")
    return image
