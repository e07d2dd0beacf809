"""The CUB loader: samples, splits, both attributes.txt locations, and path:line errors for every bad file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvc.build import build_dataset
from fgvc.config import ConfigError, DataConfig
from fgvc.data import DATA_ROOT_ENV, DATASETS
from fgvc.data.annotations import AnnotationError
from fgvc.data.cub import CUBAnnotations, CUBDataset
from fgvc.data.images import ImageReadError
from fgvc.data.synthbirds import SynthBirdsSpec
from fgvc.errors import OptionError

from .conftest import SMALL_SPEC


def test_sample_matches_the_files(small_birds: Path) -> None:
    dataset = CUBDataset(small_birds, "trainval")
    sample = dataset[3]
    image_id = int(dataset.annotations.image_ids[dataset.rows[3]])
    lines = {name: (small_birds / name).read_text().splitlines() for name in
             ("images.txt", "image_class_labels.txt", "bounding_boxes.txt", "parts/part_locs.txt")}
    relative = lines["images.txt"][image_id - 1].split(" ", 1)[1]
    expected = np.asarray(Image.open(small_birds / "images" / relative).convert("RGB"))
    np.testing.assert_array_equal(sample["image"], expected)
    assert sample["label"] == int(lines["image_class_labels.txt"][image_id - 1].split()[1]) - 1
    assert sample["index"] == 3
    x, y, w, h = (float(v) for v in lines["bounding_boxes.txt"][image_id - 1].split()[1:])
    np.testing.assert_allclose(sample["bbox"], [x, y, x + w, y + h])  # the file's x, y, w, h as x0, y0, x1, y1
    part_rows = [r.split() for r in lines["parts/part_locs.txt"] if int(r.split()[0]) == image_id]
    np.testing.assert_allclose(sample["parts"], [[float(r[2]), float(r[3]), float(r[4])] for r in part_rows])
    assert sample["attributes"].shape == (len(dataset.attribute_names),)
    assert set(np.unique(sample["attributes"])) <= {-1.0, 0.0, 1.0}
    assert dataset.part_names[6] == "left eye" and len(dataset.classes) == SMALL_SPEC.num_classes


def test_splits_are_stratified_disjoint_and_seeded(small_birds: Path) -> None:
    annotations = CUBAnnotations.load(small_birds)
    split = {name: CUBDataset(small_birds, name, annotations=annotations, val_fraction=0.2)
             for name in ("train", "val", "trainval", "test")}
    rows = {name: set(ds.rows.tolist()) for name, ds in split.items()}
    assert rows["train"].isdisjoint(rows["val"]) and rows["train"] | rows["val"] == rows["trainval"]
    assert rows["trainval"].isdisjoint(rows["test"])
    assert rows["test"] == set(np.flatnonzero(~annotations.is_train).tolist())  # test is never touched by val
    # 6 official training images per class, 20% -> 1 per class in val: every class, and every class still in train.
    assert sorted(split["val"].targets.tolist()) == list(range(SMALL_SPEC.num_classes))
    assert set(split["train"].targets.tolist()) == set(range(SMALL_SPEC.num_classes))

    again = CUBDataset(small_birds, "val", annotations=annotations, val_fraction=0.2)
    other_seed = CUBDataset(small_birds, "val", annotations=annotations, val_fraction=0.2, split_seed=1)
    assert again.rows.tolist() == split["val"].rows.tolist()
    assert other_seed.rows.tolist() != split["val"].rows.tolist()


def test_root_may_be_the_parent_and_attributes_txt_may_sit_beside(birds_copy: Path) -> None:
    shutil.move(birds_copy / "attributes" / "attributes.txt", birds_copy.parent / "attributes.txt")
    dataset = CUBDataset(birds_copy.parent, "test")  # the folder that contains CUB_200_2011/
    assert dataset.annotations.root == birds_copy
    assert len(dataset.attribute_names) == len(dataset[0]["attributes"])


def test_registry_builds_the_loader(small_birds: Path) -> None:
    assert {"cub200", "synthbirds"} <= set(DATASETS.list())
    cfg = DataConfig(dataset="cub200", root=str(small_birds))
    assert len(build_dataset(cfg, "test")) == len(CUBDataset(small_birds, "test"))
    with pytest.raises(ConfigError, match=r"data.dataset \(--dataset\): unknown dataset 'cub20'; did you mean"):
        build_dataset(DataConfig(dataset="cub20", root=str(small_birds)), "test")
    with pytest.raises(ConfigError, match=r"data.root \(--data-dir\): must point at CUB_200_2011"):
        build_dataset(DataConfig(dataset="cub200"), "test")
    with pytest.raises(ConfigError, match=r"data.download \(--download\): folder has no such option"):
        build_dataset(DataConfig(dataset="folder", root=str(small_birds), download=True), "test")
    with pytest.raises(ConfigError, match="data.annotation_level: cub200 has no such option .*'family'"):
        build_dataset(DataConfig(dataset="cub200", root=str(small_birds), annotation_level="family"), "test")
    with pytest.raises(OptionError, match="^split: .dev. is unknown"):
        build_dataset(DataConfig(dataset="cub200", root=str(small_birds)), "dev")


def test_synthbirds_is_generated_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    cfg = DataConfig(synthbirds=SynthBirdsSpec(num_classes=2, images_per_class=4, image_size=32))
    first = build_dataset(cfg, "test")
    root = first.annotations.root
    assert root.parent == tmp_path and root.name.startswith("synthbirds-")
    stamp = (root / "images.txt").stat().st_mtime_ns
    assert len(build_dataset(cfg, "trainval")) + len(first) == 8
    assert (root / "images.txt").stat().st_mtime_ns == stamp  # reused, not regenerated
    other = build_dataset(DataConfig(synthbirds=SynthBirdsSpec(num_classes=2, images_per_class=4, image_size=32,
                                                               seed=5)), "test")
    assert other.annotations.root != root  # another spec, another folder


def test_not_visible_attributes_are_unknown_and_extra_fields_are_read(birds_copy: Path) -> None:
    labels = birds_copy / "attributes" / "image_attribute_labels.txt"
    lines = labels.read_text().splitlines()
    image_id, attribute_id, present, _, time = lines[0].split()
    lines[0] = f"{image_id} {attribute_id} {present} 1 {time}"  # certainty 1: not visible
    lines[1] = lines[1] + " 0"  # a line with a sixth field, as some lines of the real file have
    labels.write_text("\n".join(lines) + "\n")
    annotations = CUBAnnotations.load(birds_copy)
    assert annotations.attributes[0, int(attribute_id) - 1] == -1.0


def test_greyscale_images_become_rgb(birds_copy: Path) -> None:
    dataset = CUBDataset(birds_copy, "test", with_attributes=False)
    Image.open(dataset.image_path(0)).convert("L").save(dataset.image_path(0))
    grey = np.asarray(Image.open(dataset.image_path(0)))
    assert grey.ndim == 2
    image = dataset[0]["image"]
    assert image.shape == (*grey.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)


def test_unreadable_image_names_the_file(birds_copy: Path) -> None:
    dataset = CUBDataset(birds_copy, "test", with_attributes=False)
    dataset.image_path(0).write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=re.escape(str(dataset.image_path(0)))):
        dataset[0]


def edit_line(path: Path, line_number: int, new_text: str | None) -> None:
    """Replace (or, with None, delete) one line of an annotation file."""
    lines = path.read_text().splitlines()
    if new_text is None:
        del lines[line_number - 1]
    else:
        lines[line_number - 1] = new_text
    path.write_text("\n".join(lines) + "\n")


# (file, line to edit, new text or None to delete it, the line the error must name, what the message must say)
MALFORMED = [
    ("images.txt", 2, "two some/path.jpg", 2, "image id must be an integer, got 'two'"),
    ("images.txt", 3, "1 duplicate.jpg", 3, "image id 1 already given on line 1"),
    ("images.txt", 4, "4", 4, "expected 2 fields, found 1"),
    ("images.txt", 5, "5 001.Nowhere/missing.jpg", 5, "image file not found"),
    ("classes.txt", 2, "3 003.Skipped", 2, "class ids must run 1, 2, 3, ...; expected 2"),
    ("image_class_labels.txt", 7, "7 99", 7, "class id 99 out of range (1..6)"),
    ("image_class_labels.txt", 8, "999 1", 8, "image id 999 is not in images.txt"),
    ("image_class_labels.txt", 9, "10 1", 10, "image id 10 already has a class id on line 9"),
    ("image_class_labels.txt", 9, None, None, "no class id for image id 9"),
    ("train_test_split.txt", 10, "10 2", 10, "is_training_image 2 out of range (0..1)"),
    ("bounding_boxes.txt", 11, "11 1.0 2.0 wide 4.0", 11, "width must be a number, got 'wide'"),
    ("bounding_boxes.txt", 12, "12 1.0 2.0 -3.0 4.0", 12, "width and height must be positive"),
    ("bounding_boxes.txt", 13, "13 1.0 2.0 nan 4.0", 13, "width must be finite"),
    ("parts/parts.txt", 15, "15", 15, "expected 2 fields, found 1"),
    ("parts/part_locs.txt", 20, "2 5 10.0 10.0", 20, "expected 5 fields, found 4"),
    ("parts/part_locs.txt", 21, "2 16 10.0 10.0 1", 21, "part id 16 out of range (1..15)"),
    ("parts/part_locs.txt", 22, "2 7 10.0 10.0 2", 22, "visible must be 0 or 1, got 2"),
    ("parts/part_locs.txt", 23, "2 7 10.0 10.0 1", 23, "image id 2 already has part 7 on line 22"),
    ("parts/part_locs.txt", 30, None, None, "no complete set of 15 part locations for image id 2"),
    ("attributes/image_attribute_labels.txt", 40, "2 15 1", 40, "expected 4 fields, found 3"),
    ("attributes/image_attribute_labels.txt", 41, "2 16 1 5 0.0", 41, "certainty id 1..4"),
    ("attributes/image_attribute_labels.txt", 42, "2 99 1 4 0.0", 42, "attribute id 99 out of range"),
    ("attributes/attributes.txt", 3, "3", 3, "expected 2 fields, found 1"),
]


@pytest.mark.parametrize(("name", "line", "text", "reported_line", "message"), MALFORMED,
                         ids=[f"{m[0]}:{m[1]}:{m[4][:30]}" for m in MALFORMED])
def test_malformed_files_name_file_line_and_text(birds_copy: Path, name: str, line: int, text: str | None,
                                                  reported_line: int | None, message: str) -> None:
    edit_line(birds_copy / name, line, text)
    with pytest.raises(AnnotationError) as error:
        CUBAnnotations.load(birds_copy)
    where = f"{birds_copy / name}:{reported_line}: " if reported_line else f"{birds_copy / name}: "
    assert str(error.value).startswith(where), str(error.value)
    assert message in str(error.value)
    if text is not None:
        assert repr(text) in str(error.value)  # the offending line itself, quoted


@pytest.mark.parametrize("name", ["images.txt", "classes.txt", "bounding_boxes.txt", "parts/part_locs.txt"])
def test_missing_file_is_named(birds_copy: Path, name: str) -> None:
    (birds_copy / name).unlink()
    with pytest.raises(AnnotationError, match=re.escape(str(birds_copy))):
        CUBAnnotations.load(birds_copy)


def test_annotations_that_are_not_asked_for_are_not_read(birds_copy: Path) -> None:
    shutil.rmtree(birds_copy / "parts")
    shutil.rmtree(birds_copy / "attributes")
    (birds_copy / "bounding_boxes.txt").unlink()
    sample = CUBDataset(birds_copy, "test", with_boxes=False, with_parts=False, with_attributes=False)[0]
    assert set(sample) == {"image", "label", "index"}  # missing annotations are absent keys, not zeros
