"""CUB-200-2011 (and synthbirds, which is written in the same layout), read exactly as it ships.

Splits are fgvc's (fgvc.data.splits): CUB has no validation split, so val is carved from the training images.
Boxes become fgvc's (x0, y0, x1, y1) (fgvc.boxes; the file holds x, y, width, height). Attributes become one float
per attribute: 1 present, 0 absent, -1 unknown (CUB's certainty 1, "not visible").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgvc.boxes import from_xywh
from fgvc.data.annotations import AnnotationError, annotation_error, parse_float, parse_int, read_records
from fgvc.data.images import read_rgb
from fgvc.data.splits import check_split, check_val_fraction, split_rows

NOT_VISIBLE_CERTAINTY = 1


def resolve_root(root: str | os.PathLike) -> Path:
    """Accept the CUB_200_2011 folder itself or the folder that contains it."""
    root = Path(root).expanduser()
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise AnnotationError(
        f"{root}: no images.txt here or in {root / 'CUB_200_2011'}; expected the CUB_200_2011 layout "
        "(images/, images.txt, classes.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, "
        "parts/, attributes/)"
    )


@dataclass
class CUBAnnotations:
    """Every annotation of a CUB tree, indexed by position in images.txt order (row i = i-th image id)."""

    root: Path
    image_ids: np.ndarray  # (N,) the ids of images.txt
    paths: list[str]  # relative to root/images
    labels: np.ndarray  # (N,) 0-based class index
    is_train: np.ndarray  # (N,) bool, the official split
    classes: list[str]
    bboxes: np.ndarray | None = None  # (N, 4) x0, y0, x1, y1
    part_names: list[str] | None = None
    parts: np.ndarray | None = None  # (N, P, 3) x, y, visible
    attribute_names: list[str] | None = None
    attributes: np.ndarray | None = None  # (N, A) 1 / 0 / -1

    @classmethod
    def load(cls, root: str | os.PathLike, *, with_boxes: bool = True, with_parts: bool = True,
             with_attributes: bool = True) -> CUBAnnotations:
        root = resolve_root(root)
        image_ids, paths = _read_images(root)
        row = {image_id: i for i, image_id in enumerate(image_ids)}
        classes = _read_numbered_names(root / "classes.txt", "class")
        labels = _read_per_image(root / "image_class_labels.txt", row, "class id", valid=range(1, len(classes) + 1))
        split = _read_per_image(root / "train_test_split.txt", row, "is_training_image", valid=(0, 1))
        annotations = cls(root, np.array(image_ids), paths, np.array(labels) - 1, np.array(split) == 1, classes)
        if with_boxes:
            annotations.bboxes = _read_boxes(root / "bounding_boxes.txt", row)
        if with_parts:
            annotations.part_names = _read_numbered_names(root / "parts" / "parts.txt", "part")
            annotations.parts = _read_part_locs(root / "parts" / "part_locs.txt", row, len(annotations.part_names))
        if with_attributes:
            names_file = _find_attribute_names(root)
            annotations.attribute_names = _read_numbered_names(names_file, "attribute")
            annotations.attributes = _read_attribute_labels(
                root / "attributes" / "image_attribute_labels.txt", row, len(annotations.attribute_names))
        return annotations


class CUBDataset:
    """One split of a CUB-format tree. Items are raw samples: the decoded RGB image (H x W x 3 uint8) and its
    annotations in that image's pixel coordinates, ready for a part-aware transform (fgvc.data.transforms).

    discriminative_parts: per class, the indices of the parts that tell it from its nearest classes, where the data
    knows them (synthbirds does; real CUB does not). The localization metrics read it."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, val_fraction: float = 0.1,
                 split_seed: int = 0, with_boxes: bool = True, with_parts: bool = True, with_attributes: bool = True,
                 annotations: CUBAnnotations | None = None,
                 discriminative_parts: list[list[int]] | None = None) -> None:
        check_split(split)
        check_val_fraction(val_fraction)
        self.annotations = annotations or CUBAnnotations.load(
            root, with_boxes=with_boxes, with_parts=with_parts, with_attributes=with_attributes)
        self.split = split
        self.rows = split_rows(self.annotations.labels, self.annotations.is_train, split, val_fraction, split_seed)
        self.discriminative_parts = discriminative_parts

    @property
    def classes(self) -> list[str]:
        return self.annotations.classes

    @property
    def part_names(self) -> list[str] | None:
        return self.annotations.part_names

    @property
    def attribute_names(self) -> list[str] | None:
        return self.annotations.attribute_names

    @property
    def targets(self) -> np.ndarray:
        return self.annotations.labels[self.rows]

    @property
    def has_boxes(self) -> bool:
        return self.annotations.bboxes is not None

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        return self.annotations.root / "images" / self.annotations.paths[self.rows[index]]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        ann = self.annotations
        sample = {"image": read_rgb(self.image_path(index)), "label": int(ann.labels[row]), "index": int(index)}
        if ann.bboxes is not None:
            sample["bbox"] = ann.bboxes[row]
        if ann.parts is not None:
            sample["parts"] = ann.parts[row]
        if ann.attributes is not None:
            sample["attributes"] = ann.attributes[row]
        return sample


# ---------------------------------------------------------------------------------------------------------------
# File readers. Each checks what a hand-edited or truncated copy gets wrong and names the file and line.
# ---------------------------------------------------------------------------------------------------------------


def _read_images(root: Path) -> tuple[list[int], list[str]]:
    path = root / "images.txt"
    ids, paths, seen, missing = [], [], {}, []
    for n, line, (id_text, relative) in read_records(path, 2, rest_in_last=True):
        image_id = parse_int(path, n, line, id_text, "image id")
        if image_id in seen:
            raise annotation_error(path, n, line, f"image id {image_id} already given on line {seen[image_id]}")
        seen[image_id] = n
        if not (root / "images" / relative).is_file():
            missing.append((n, line, relative))
        ids.append(image_id)
        paths.append(relative)
    if not ids:
        raise AnnotationError(f"{path}: no images listed")
    if missing:
        n, line, relative = missing[0]
        more = f" ({len(missing) - 1} more images are missing)" if len(missing) > 1 else ""
        raise annotation_error(path, n, line, f"image file not found: {root / 'images' / relative}{more}")
    return ids, paths


def _read_numbered_names(path: Path, what: str) -> list[str]:
    """Files of "<id> <name>" with ids 1, 2, 3, ... in order (classes, parts, attributes)."""
    names = []
    for n, line, (id_text, name) in read_records(path, 2, rest_in_last=True):
        number = parse_int(path, n, line, id_text, f"{what} id")
        if number != len(names) + 1:
            raise annotation_error(path, n, line, f"{what} ids must run 1, 2, 3, ...; expected {len(names) + 1}")
        names.append(name.strip())
    if not names:
        raise AnnotationError(f"{path}: no {what}s listed")
    return names


def _row_of(path: Path, n: int, line: str, id_text: str, row: dict[int, int]) -> int:
    image_id = parse_int(path, n, line, id_text, "image id")
    if image_id not in row:
        raise annotation_error(path, n, line, f"image id {image_id} is not in images.txt")
    return row[image_id]


def _check_complete(path: Path, filled: np.ndarray, row: dict[int, int], what: str) -> None:
    """`filled` holds, per image, the line that gave its value (0: none)."""
    filled = filled > 0
    if not filled.all():
        first = next(image_id for image_id, i in row.items() if not filled[i])
        count = int((~filled).sum())
        raise AnnotationError(f"{path}: no {what} for image id {first} ({count} images lack one)")


def _read_per_image(path: Path, row: dict[int, int], what: str, valid: range | tuple[int, ...]) -> list[int]:
    values = [0] * len(row)
    filled = np.zeros(len(row), dtype=np.int64)
    for n, line, (id_text, value_text) in read_records(path, 2):
        i = _row_of(path, n, line, id_text, row)
        if filled[i]:
            raise annotation_error(path, n, line, f"image id {id_text} already has a {what} on line {filled[i]}")
        value = parse_int(path, n, line, value_text, what)
        if value not in valid:
            raise annotation_error(path, n, line, f"{what} {value} out of range ({min(valid)}..{max(valid)})")
        values[i], filled[i] = value, n
    _check_complete(path, filled, row, what)
    return values


def _read_boxes(path: Path, row: dict[int, int]) -> np.ndarray:
    boxes = np.zeros((len(row), 4), dtype=np.float32)
    filled = np.zeros(len(row), dtype=np.int64)
    for n, line, fields in read_records(path, 5):
        i = _row_of(path, n, line, fields[0], row)
        if filled[i]:
            raise annotation_error(path, n, line, f"image id {fields[0]} already has a box on line {filled[i]}")
        box = [parse_float(path, n, line, value, name)
               for value, name in zip(fields[1:], ("x", "y", "width", "height"), strict=True)]
        if box[2] <= 0 or box[3] <= 0:
            raise annotation_error(path, n, line, "bounding box width and height must be positive")
        boxes[i], filled[i] = box, n
    _check_complete(path, filled, row, "bounding box")
    return from_xywh(boxes)


def _read_part_locs(path: Path, row: dict[int, int], num_parts: int) -> np.ndarray:
    parts = np.zeros((len(row), num_parts, 3), dtype=np.float32)
    filled = np.zeros((len(row), num_parts), dtype=np.int64)
    for n, line, fields in read_records(path, 5):
        i = _row_of(path, n, line, fields[0], row)
        part = parse_int(path, n, line, fields[1], "part id")
        if not 1 <= part <= num_parts:
            raise annotation_error(path, n, line, f"part id {part} out of range (1..{num_parts})")
        if filled[i, part - 1]:
            raise annotation_error(path, n, line, f"image id {fields[0]} already has part {part} on line "
                                                  f"{filled[i, part - 1]}")
        x, y = (parse_float(path, n, line, v, name) for v, name in zip(fields[2:4], ("x", "y"), strict=True))
        visible = parse_int(path, n, line, fields[4], "visible")
        if visible not in (0, 1):
            raise annotation_error(path, n, line, f"visible must be 0 or 1, got {visible}")
        parts[i, part - 1] = (x, y, visible) if visible else (0.0, 0.0, 0.0)
        filled[i, part - 1] = n
    _check_complete(path, filled.min(axis=1), row, f"complete set of {num_parts} part locations")
    return parts


def _find_attribute_names(root: Path) -> Path:
    """attributes.txt ships both inside attributes/ and beside the CUB_200_2011 folder."""
    for candidate in (root / "attributes" / "attributes.txt", root.parent / "attributes.txt",
                      root / "attributes.txt"):
        if candidate.is_file():
            return candidate
    raise AnnotationError(f"{root / 'attributes' / 'attributes.txt'}: file not found "
                          f"(also looked for {root.parent / 'attributes.txt'})")


def _read_attribute_labels(path: Path, row: dict[int, int], num_attributes: int) -> np.ndarray:
    """"<image id> <attribute id> <is_present> <certainty id> [<time>]". Only the first four fields are read:
    some lines of the real file are reported to carry extra fields."""
    values = np.zeros((len(row), num_attributes), dtype=np.float32)
    filled = np.zeros((len(row), num_attributes), dtype=np.int64)
    for n, line, fields in read_records(path, 4, extra_fields=True):
        i = _row_of(path, n, line, fields[0], row)
        attribute = parse_int(path, n, line, fields[1], "attribute id")
        if not 1 <= attribute <= num_attributes:
            raise annotation_error(path, n, line, f"attribute id {attribute} out of range (1..{num_attributes})")
        present = parse_int(path, n, line, fields[2], "is_present")
        certainty = parse_int(path, n, line, fields[3], "certainty id")
        if present not in (0, 1) or not 1 <= certainty <= 4:
            raise annotation_error(path, n, line, "is_present must be 0 or 1 and certainty id 1..4")
        if filled[i, attribute - 1]:
            raise annotation_error(path, n, line, f"image id {fields[0]} already has attribute {attribute} on line "
                                                  f"{filled[i, attribute - 1]}")
        values[i, attribute - 1] = -1.0 if certainty == NOT_VISIBLE_CERTAINTY else present
        filled[i, attribute - 1] = n
    _check_complete(path, filled.min(axis=1), row, f"complete set of {num_attributes} attribute labels")
    return values
