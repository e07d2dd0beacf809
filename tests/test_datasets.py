"""Stanford Cars, FGVC-Aircraft, ImageFolder trees and torchvision's sets, against torchvision as the oracle on fixture
trees built in the exact shipped layouts."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

from fgvc.build import build_dataset
from fgvc.config import DataConfig
from fgvc.data.aircraft import load_aircraft
from fgvc.data.annotations import AnnotationError
from fgvc.data.cars import load_cars
from fgvc.data.generic import load_image_folder
from fgvc.data.image_list import ImageListDataset

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Aston Martin V8 Vantage/Convertible 2012"]


def write_image(path: Path, size: tuple[int, int] = (24, 16), value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


def struct_array(records: list[dict]) -> np.ndarray:
    """A MATLAB struct array as scipy.io.savemat writes one."""
    names = list(records[0])
    array = np.zeros(len(records), dtype=[(name, object) for name in names])
    for i, record in enumerate(records):
        array[i] = tuple(record[name] for name in names)
    return array


def car_records(split: str) -> list[dict]:
    count = 5 if split == "train" else 4
    return [{"bbox_x1": 2 + i, "bbox_y1": 3, "bbox_x2": 20, "bbox_y2": 12 + i % 3, "class": 1 + i % 3,
             "fname": f"{i + 1:05d}.jpg"} for i in range(count)]


def make_cars_split_layout(base: Path, *, test_file_in_devkit: bool = False) -> Path:
    for split in ("train", "test"):
        for record in car_records(split):
            write_image(base / f"cars_{split}" / record["fname"], value=record["class"] * 40)
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(CAR_CLASSES, dtype=object)})
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(car_records("train"))})
    # The unlabelled test file of the devkit must not be mistaken for the labelled one.
    unlabelled = [{k: v for k, v in r.items() if k != "class"} for r in car_records("test")]
    scipy.io.savemat(base / "devkit" / "cars_test_annos.mat", {"annotations": struct_array(unlabelled)})
    test_folder = base / "devkit" if test_file_in_devkit else base
    scipy.io.savemat(test_folder / "cars_test_annos_withlabels.mat", {"annotations": struct_array(car_records("test"))})
    return base


def make_cars_all_in_one(base: Path) -> Path:
    records = []
    for split, test in (("train", 0), ("test", 1)):
        for record in car_records(split):
            relative = f"car_ims/{split}_{record['fname']}"
            write_image(base / relative, value=record["class"] * 40)
            records.append({"relative_im_path": relative, **{k: record[k] for k in
                            ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")}, "test": test})
    scipy.io.savemat(base / "cars_annos.mat", {"annotations": struct_array(records),
                                               "class_names": np.array(CAR_CLASSES, dtype=object)})
    return base


def table_split(table, train: bool) -> list[tuple[str, int]]:
    return [(str(p), int(label)) for p, label, t in zip(table.paths, table.labels, table.is_train, strict=True)
            if t == train]


@pytest.mark.parametrize("test_file_in_devkit", [False, True])
def test_cars_split_layout_matches_torchvision(tmp_path: Path, test_file_in_devkit: bool) -> None:
    make_cars_split_layout(tmp_path / "stanford_cars", test_file_in_devkit=test_file_in_devkit)
    messages = []
    table = load_cars(tmp_path, echo=messages.append)  # the parent: torchvision's nesting
    assert "split layout" in messages[0]
    assert load_cars(tmp_path / "stanford_cars", echo=messages.append).paths == table.paths
    assert table.classes == CAR_CLASSES
    if not test_file_in_devkit:  # torchvision only looks for the labelled test file at the root
        for split, train in (("train", True), ("test", False)):
            oracle = torchvision.datasets.StanfordCars(str(tmp_path), split=split)
            assert table_split(table, train) == [(str(p), t) for p, t in oracle._samples]
            assert oracle.classes == table.classes
    # Boxes: 1-based inclusive corners (x1, y1, x2, y2) = (2, 3, 20, 12) cover 0-based pixels 1..19 x 2..11, whose
    # edges are (x0, y0, x1, y1) = (1, 2, 20, 12).
    np.testing.assert_array_equal(table.bboxes[0], [1, 2, 20, 12])


def test_cars_all_in_one_layout_gives_the_same_data(tmp_path: Path) -> None:
    split = load_cars(make_cars_split_layout(tmp_path / "split"), echo=lambda _: None)
    messages = []
    together = load_cars(make_cars_all_in_one(tmp_path / "together"), echo=messages.append)
    assert "all-in-one" in messages[0]
    assert together.classes == split.classes
    np.testing.assert_array_equal(together.labels, split.labels)
    np.testing.assert_array_equal(together.is_train, split.is_train)
    np.testing.assert_array_equal(together.bboxes, split.bboxes)
    dataset = ImageListDataset(together, "test")
    sample = dataset[0]
    assert sample["image"].shape == (16, 24, 3) and sample["label"] == split.labels[~split.is_train][0]
    assert "bbox" in sample


def test_cars_missing_dataset_lists_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="(?s)split layout.*all-in-one layout.*no working download") as caught:
        load_cars(tmp_path)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(AnnotationError, match="no working download"):
        build_dataset(DataConfig(dataset="cars196", root=str(tmp_path), download=True), "train")


def test_cars_missing_labelled_test_file_is_named(tmp_path: Path) -> None:
    base = make_cars_split_layout(tmp_path)
    (base / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(AnnotationError, match="cars_test_annos_withlabels.mat are neither here nor in"):
        load_cars(base, echo=lambda _: None)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.update({"class": 4}), r"annotations\[1\]\.class = 4 outside 1\.\.3"),
    (lambda r: r.update({"class": "x"}), r"annotations\[1\]\.class = 'x' is not an integer"),
    (lambda r: r.update({"fname": "99999.jpg"}), r"annotations\[1\]\.fname = '99999.jpg': image file not found"),
    (lambda r: r.update({"bbox_x2": 0}), r"annotations\[1\] has an empty box"),
])
def test_cars_annotation_errors_name_file_field_and_value(tmp_path: Path, edit, message: str) -> None:
    base = make_cars_split_layout(tmp_path)
    records = car_records("train")
    edit(records[1])
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(records)})
    with pytest.raises(AnnotationError, match=re.escape(str(base / "devkit" / "cars_train_annos.mat")) + ".*"
                       + message):
        load_cars(base, echo=lambda _: None)


def test_cars_mat_without_the_field_is_named(tmp_path: Path) -> None:
    base = make_cars_split_layout(tmp_path)
    records = [{k: v for k, v in r.items() if k != "fname"} for r in car_records("train")]
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(records)})
    with pytest.raises(AnnotationError, match="'annotations' lacks the field.*fname"):
        load_cars(base, echo=lambda _: None)
    (base / "devkit" / "cars_train_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(AnnotationError, match="not a readable MATLAB .mat file"):
        load_cars(base, echo=lambda _: None)


# ---------------------------------------------------------------------------------------------------------------
# FGVC-Aircraft
# ---------------------------------------------------------------------------------------------------------------

AIRCRAFT = [  # (id, variant, family, manufacturer); the ids keep their leading zeros
    ("0034309", "707-320", "Boeing 707", "Boeing"), ("0056978", "707-320", "Boeing 707", "Boeing"),
    ("1025794", "Cessna 172", "Cessna 172", "Cessna"), ("0000042", "Cessna 172", "Cessna 172", "Cessna"),
    ("2031775", "F/A-18", "F/A-18", "Boeing"), ("0894380", "F/A-18", "F/A-18", "Boeing"),
    ("0716386", "Cessna 172", "Cessna 172", "Cessna"), ("0000007", "707-320", "Boeing 707", "Boeing"),
]
AIRCRAFT_SPLITS = {"train": [0, 2, 4], "val": [1, 3, 5], "test": [6, 7]}


def make_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    for i, (image_id, *_) in enumerate(AIRCRAFT):
        write_image(data / "images" / f"{image_id}.jpg", size=(30, 40), value=i * 20)
    levels = {"variant": ("variants.txt", 1), "family": ("families.txt", 2), "manufacturer": ("manufacturers.txt", 3)}
    for level, (names_file, column) in levels.items():
        names = sorted({row[column] for row in AIRCRAFT}, reverse=True)  # file order, not sorted order, is the rule
        (data / names_file).write_text("".join(f"{name}\n" for name in names))
        splits = {**AIRCRAFT_SPLITS, "trainval": AIRCRAFT_SPLITS["train"] + AIRCRAFT_SPLITS["val"]}
        for split, rows in splits.items():
            (data / f"images_{level}_{split}.txt").write_text(
                "".join(f"{AIRCRAFT[i][0]} {AIRCRAFT[i][column]}\n" for i in rows))
    (data / "images_box.txt").write_text("".join(f"{row[0]} 3 4 28 39\n" for row in AIRCRAFT))
    return root


@pytest.mark.parametrize("level", ["variant", "family", "manufacturer"])
@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_aircraft_matches_torchvision(tmp_path: Path, level: str, split: str) -> None:
    make_aircraft(tmp_path)
    oracle = torchvision.datasets.FGVCAircraft(str(tmp_path), split=split, annotation_level=level)
    for root in (tmp_path, tmp_path / "fgvc-aircraft-2013b", tmp_path / "fgvc-aircraft-2013b" / "data"):
        table = load_aircraft(root, split, level=level)
        assert table.classes == oracle.classes
        assert [Path(p).resolve() for p in table.paths] == [Path(p).resolve() for p in oracle._image_files]
        assert table.labels.tolist() == oracle._labels


def test_aircraft_names_with_spaces_and_slashes_and_leading_zeros(tmp_path: Path) -> None:
    table = load_aircraft(make_aircraft(tmp_path), "trainval")
    assert {"Cessna 172", "F/A-18"} <= set(table.classes)
    assert [p.stem for p in table.paths] == [AIRCRAFT[i][0] for i in (0, 2, 4, 1, 3, 5)]
    assert table.classes[table.labels[2]] == "F/A-18"


def test_aircraft_banner_is_removed_and_boxes_clipped(tmp_path: Path) -> None:
    make_aircraft(tmp_path)
    with_banner = ImageListDataset(load_aircraft(tmp_path, "test", remove_banner=False), "test")[0]
    without = ImageListDataset(load_aircraft(tmp_path, "test"), "test")[0]
    assert with_banner["image"].shape == (40, 30, 3) and without["image"].shape == (20, 30, 3)
    np.testing.assert_array_equal(without["image"], with_banner["image"][:20])
    # Corners (3, 4)-(28, 39), 1-based inclusive: x 2..28, y 3..39 in pixel edges; the banner cuts y at 20.
    np.testing.assert_array_equal(with_banner["bbox"], [2, 3, 28, 39])
    np.testing.assert_array_equal(without["bbox"], [2, 3, 28, 20])


@pytest.mark.parametrize(("file", "line", "text", "message"), [
    ("images_variant_train.txt", 2, "1025794 Cessna 999", "class 'Cessna 999' is not in variants.txt"),
    ("images_variant_train.txt", 1, "9999999 707-320", "image file not found"),
    ("images_variant_train.txt", 3, "2031775", "expected 2 fields, found 1"),
    ("images_box.txt", 4, "0000042 3 4 x 39", "xmax must be a number, got 'x'"),
    ("images_box.txt", 5, "0034309 3 4 28 39", "image 0034309 already has a box on line 1"),
    ("variants.txt", 3, "Cessna 172", "class 'Cessna 172' is listed twice"),
])
def test_aircraft_annotation_errors_name_file_and_line(tmp_path: Path, file: str, line: int, text: str,
                                                      message: str) -> None:
    path = make_aircraft(tmp_path) / "fgvc-aircraft-2013b" / "data" / file
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=re.escape(f"{path}:{line}: {message}")):
        load_aircraft(tmp_path, "train")


def test_aircraft_through_the_registry(tmp_path: Path) -> None:
    make_aircraft(tmp_path)
    cfg = DataConfig(dataset="aircraft100", root=str(tmp_path), annotation_level="manufacturer")
    assert len(build_dataset(cfg, "val")) == 3
    assert build_dataset(cfg, "train").classes == ["Cessna", "Boeing"]
    with pytest.raises(AnnotationError, match="no FGVC-Aircraft data here"):
        load_aircraft(tmp_path / "elsewhere", "train")


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder trees and torchvision's datasets
# ---------------------------------------------------------------------------------------------------------------


def make_folder_tree(root: Path, splits=("train", "test")) -> Path:
    for split in splits:
        for c, name in enumerate(["b class", "a_class", "c"]):
            for i in range(4 if split == "train" else 2):
                write_image(root / split / name / f"{i}.png", value=c * 50 + i)
    return root


def test_image_folder_matches_torchvision(tmp_path: Path) -> None:
    root = make_folder_tree(tmp_path)
    (root / "train" / "c" / "notes.txt").write_text("not an image")
    messages = []
    for split in ("trainval", "test"):
        table = load_image_folder(root, split, echo=messages.append)
        oracle = torchvision.datasets.ImageFolder(str(root / ("train" if split == "trainval" else split)))
        assert table.classes == oracle.classes == ["a_class", "b class", "c"]
        rows = table.rows(split, 0.25, 0)
        assert [(str(table.paths[r]), int(table.labels[r])) for r in rows] == oracle.samples
    assert any("notes.txt" in m and "not reading 1 file" in m for m in messages)
    train = ImageListDataset(load_image_folder(root, "train", echo=lambda _: None), "train", val_fraction=0.25)
    val = ImageListDataset(load_image_folder(root, "val", echo=lambda _: None), "val", val_fraction=0.25)
    assert len(train) == 9 and len(val) == 3 and not set(map(str, [train.image_path(i) for i in range(9)])) & set(
        str(val.image_path(i)) for i in range(3))


def test_image_folder_official_val_and_errors(tmp_path: Path) -> None:
    root = make_folder_tree(tmp_path, splits=("train", "val"))
    assert len(load_image_folder(root, "val", echo=lambda _: None).paths) == 6
    with pytest.raises(AnnotationError, match="no test/ folder"):
        load_image_folder(root, "test")
    shutil.copytree(root / "val" / "c", root / "val" / "d")
    with pytest.raises(AnnotationError, match=r"class folder\(s\) d are not classes of"):
        load_image_folder(root, "val")
    with pytest.raises(AnnotationError, match="no train/ folder"):
        load_image_folder(tmp_path / "val", "train")


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0, 0, uint8 code 8, number of dimensions), big-endian sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 255, (20, 28, 28)), "t10k": rng.integers(0, 255, (6, 28, 28))}
    labels = {"train": np.arange(20) % 10, "t10k": np.arange(6)}
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images[prefix])
        write_idx(tmp_path / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels[prefix])
    cfg = DataConfig(dataset="mnist", root=str(tmp_path), val_fraction=0.5)
    test = build_dataset(cfg, "test")
    assert len(test) == 6 and len(test.classes) == 10
    sample = test[3]
    assert sample["image"].shape == (28, 28, 3) and sample["label"] == 3
    np.testing.assert_array_equal(sample["image"][..., 1], images["t10k"][3])
    assert len(build_dataset(cfg, "train")) + len(build_dataset(cfg, "val")) == 20


def test_cifar10_from_disk(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 255, (3, 3072), dtype=np.uint8), "labels": [1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    # The fixture's files cannot have the real archive's MD5 sums, which torchvision checks.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    test = build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)), "test")
    assert len(test) == 3 and test.classes == names
    expected = batches["test_batch"]["data"][1].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(test[1]["image"], expected)
    assert test[1]["label"] == 2


def test_imagenet_from_disk(tmp_path: Path) -> None:
    wnids = ["n01440764", "n01443537"]
    for split, count in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(wnids):
            for i in range(count):
                write_image(tmp_path / split / wnid / f"{wnid}_{i}.JPEG", value=c * 100 + i)
    torch.save(({"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus")},
                [wnids[0]] * 2 + [wnids[1]] * 2), tmp_path / "meta.bin")
    cfg = DataConfig(dataset="imagenet", root=str(tmp_path), val_fraction=0.34)
    test = build_dataset(cfg, "test")
    assert test.classes == ["n01440764 tench", "n01443537 goldfish"]
    assert len(test) == 4 and test[2]["label"] == 1  # ImageNet's official val is fgvc's test split
    assert len(build_dataset(cfg, "train")) == 4 and len(build_dataset(cfg, "val")) == 2
