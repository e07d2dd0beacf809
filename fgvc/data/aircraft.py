"""FGVC-Aircraft 2013b: 100 variants / 70 families / 30 manufacturers; official train, val, trainval and test.

Read from fgvc-aircraft-2013b/data/: images/<id>.jpg, {variants,families,manufacturers}.txt (class order = file
order), images_box.txt ("<id> xmin ymin xmax ymax", 1-based inclusive) and images_<level>_<split>.txt
("<id> <class name>", split on the first space only: "Cessna 172" and "F/A-18" are class names). Image ids stay
strings (leading zeros). The bottom 20 pixels of every image are a photographer-credit banner; the dataset's README
asks for it to be removed, which is the default here, with boxes clipped to what remains.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fgvc.boxes import from_inclusive_corners
from fgvc.data.annotations import AnnotationError, annotation_error, parse_float, read_records
from fgvc.data.image_list import ImageTable
from fgvc.data.splits import check_split
from fgvc.errors import OptionError

LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
BANNER_HEIGHT = 20
FOLDER = "fgvc-aircraft-2013b"


def resolve_data_dir(root: str | os.PathLike) -> Path:
    """Accept fgvc-aircraft-2013b/data, fgvc-aircraft-2013b, or the folder that contains it (torchvision's root)."""
    root = Path(root).expanduser()
    for candidate in (root, root / "data", root / FOLDER / "data"):
        if (candidate / "variants.txt").is_file() and (candidate / "images").is_dir():
            return candidate
    raise AnnotationError(f"{root}: no FGVC-Aircraft data here; expected {FOLDER}/data/ with images/, variants.txt, "
                          "families.txt, manufacturers.txt, images_box.txt and images_<level>_<split>.txt (the "
                          "official archive can be fetched with --download)")


def load_aircraft(root: str | os.PathLike, split: str, *, level: str = "variant",
                  remove_banner: bool = True) -> ImageTable:
    """The official `split` ("train", "val", "trainval" or "test") at annotation `level`."""
    if level not in LEVELS:
        raise OptionError("annotation_level", f"{level!r} is not an FGVC-Aircraft level; choose one of "
                                              f"{', '.join(LEVELS)}")
    check_split(split)
    data = resolve_data_dir(root)
    classes = _class_names(data / LEVELS[level])
    index = {name: i for i, name in enumerate(classes)}
    boxes_by_id = _read_boxes(data / "images_box.txt")
    path = data / f"images_{level}_{split}.txt"
    ids, labels = [], []
    for n, line, (image_id, name) in read_records(path, 2, rest_in_last=True):
        name = name.strip()
        if name not in index:
            raise annotation_error(path, n, line, f"class {name!r} is not in {LEVELS[level]}")
        if not (data / "images" / f"{image_id}.jpg").is_file():
            raise annotation_error(path, n, line, f"image file not found: {data / 'images' / f'{image_id}.jpg'}")
        if image_id not in boxes_by_id:
            raise annotation_error(path, n, line, f"image {image_id} has no box in images_box.txt")
        ids.append(image_id)
        labels.append(index[name])
    if not ids:
        raise AnnotationError(f"{path}: no images listed")
    return ImageTable([data / "images" / f"{image_id}.jpg" for image_id in ids], np.array(labels), classes,
                      bboxes=np.array([boxes_by_id[image_id] for image_id in ids], dtype=np.float32),
                      crop_bottom=BANNER_HEIGHT if remove_banner else 0)


def _class_names(path: Path) -> list[str]:
    names = []
    for n, line, (name,) in read_records(path, 1, rest_in_last=True):  # names have spaces ("Boeing 707-320")
        name = name.strip()
        if name in names:
            raise annotation_error(path, n, line, f"class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise AnnotationError(f"{path}: no classes listed")
    return names


def _read_boxes(path: Path) -> dict[str, tuple[float, float, float, float]]:
    boxes, seen = {}, {}
    for n, line, (image_id, *corners) in read_records(path, 5):
        if image_id in seen:
            raise annotation_error(path, n, line, f"image {image_id} already has a box on line {seen[image_id]}")
        x1, y1, x2, y2 = (parse_float(path, n, line, value, name)
                          for value, name in zip(corners, ("xmin", "ymin", "xmax", "ymax"), strict=True))
        if x2 < x1 or y2 < y1:
            raise annotation_error(path, n, line, "xmax and ymax must not be below xmin and ymin")
        boxes[image_id], seen[image_id] = from_inclusive_corners(x1, y1, x2, y2), n
    return boxes
