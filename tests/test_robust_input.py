"""Bad image files in a dataset: the pre-flight check lists each, training and evaluation leave each out of its
batch (never substituting another sample) and stop past data.max_bad_fraction; and the ImageFolder export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from fgvc.build import build_dataset
from fgvc.config import DataConfig
from fgvc.data.check import main as check_main
from fgvc.data.export import class_folders, export_imagefolder
from fgvc.data.loader import TooManyUnreadableImages, UnreadableImages, build_loader
from fgvc.data.transforms import PartAwareTransform, eval_transform
from fgvc.engine import trainer
from fgvc.engine.inference import evaluate_checkpoint
from tests.test_training import scratch_preset, tiny_overrides


def break_images(root: Path, split: str, count: int) -> list[Path]:
    """Corrupt the first `count` images of `split` in different ways; returns their paths."""
    dataset = build_dataset(DataConfig(dataset="cub200", root=str(root)), split)
    paths = [dataset.image_path(i) for i in range(count)]
    for n, path in enumerate(paths):
        data = path.read_bytes()
        path.write_bytes([b"", data[: len(data) // 3], b"plain text"][n % 3])
    return paths


def test_check_lists_every_bad_file(birds_copy: Path, capsys) -> None:
    bad = break_images(birds_copy, "test", 2) + break_images(birds_copy, "train", 1)
    assert check_main(["--dataset", "cub200", "--data-dir", str(birds_copy), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    for path in bad:
        assert f"{path}: " in out
    assert "the file is empty" in out and "truncated" in out and "3 unreadable" in out
    sizes = {split: len(build_dataset(DataConfig(dataset="cub200", root=str(birds_copy)), split))
             for split in ("train", "val", "test")}
    assert f"checked 60 images of cub200 (train {sizes['train']}, val {sizes['val']}, test {sizes['test']})" in out
    assert check_main(["--dataset", "cub200", "--data-dir", str(birds_copy), "--split", "val"]) == 0


def test_check_reports_bad_annotations(birds_copy: Path, capsys) -> None:
    (birds_copy / "classes.txt").write_text("1 only\nx two\n")
    assert check_main(["--dataset", "cub200", "--data-dir", str(birds_copy)]) == 2
    assert "classes.txt:2" in capsys.readouterr().err


def test_loader_leaves_bad_samples_out_without_substitutes(birds_copy: Path) -> None:
    bad = break_images(birds_copy, "test", 2)
    dataset = build_dataset(DataConfig(dataset="cub200", root=str(birds_copy)), "test")
    reported = []
    loader = build_loader(dataset, PartAwareTransform(eval_transform(32), dataset.part_names), batch_size=5,
                          seed=0, train=False, unreadable=UnreadableImages("test", len(dataset), 0.5, reported.append))
    loader.set_epoch(0)
    batches = list(loader)
    assert list(loader.unreadable.reasons) == [str(p) for p in bad] and len(reported) == 2
    assert batches[0]["index"].tolist() == [2, 3, 4]  # the two bad ones are gone, nothing took their place
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert seen == list(range(2, len(dataset)))


def test_training_excludes_bad_files_then_stops_past_the_fraction(birds_copy: Path, tmp_path: Path, capsys) -> None:
    bad = break_images(birds_copy, "train", 2)
    every_image = ["schedule.epochs=2", "data.batch_size=10"]  # 30 training images: no batch is dropped
    overrides = tiny_overrides(birds_copy, tmp_path, "tolerant") + every_image + ["data.max_bad_fraction=0.1"]
    result = trainer.train(scratch_preset(overrides))
    assert result.completed
    out = capsys.readouterr().out
    assert [out.count(str(path)) for path in bad] == [1, 1], (bad, out)  # each once, though met in both epochs
    strict = tiny_overrides(birds_copy, tmp_path, "strict") + ["schedule.epochs=1", "data.max_bad_fraction=0.0"]
    with pytest.raises(TooManyUnreadableImages, match="more than data.max_bad_fraction allows .0.*fgvc.data.check"):
        trainer.train(scratch_preset(strict))


def test_evaluation_says_how_many_images_it_left_out(birds_copy: Path, tmp_path: Path) -> None:
    tolerant = ["schedule.epochs=1", "data.max_bad_fraction=0.1"]  # the run's setting applies to evaluation too
    result = trainer.train(scratch_preset(tiny_overrides(birds_copy, tmp_path, "run") + tolerant))
    assert result.test["excluded_images"] == 0
    break_images(birds_copy, "test", 1)
    report = evaluate_checkpoint(result.run_dir / "best.pt", split="test", tta=["flip"])
    assert report.rows["single crop"]["excluded_images"] == report.rows["flip"]["excluded_images"] == 1
    assert report.confusion.sum() == report.images - 1


def test_export_imagefolder_round_trips_through_torchvision(small_birds: Path, tmp_path: Path) -> None:
    cfg = DataConfig(dataset="cub200", root=str(small_birds))
    out = export_imagefolder(cfg, tmp_path / "folders", echo=lambda _: None)
    for split in ("train", "val", "test"):
        ours = build_dataset(cfg, split)
        folder = torchvision.datasets.ImageFolder(str(out / split))
        assert folder.classes == ours.classes  # CUB's names are safe and sort in class order: kept as they are
        assert sorted(label for _, label in folder.samples) == sorted(ours.targets.tolist())
        assert sorted(Path(p).name for p, _ in folder.samples) == sorted(
            ours.image_path(i).name for i in range(len(ours)))
    assert (out / "classes.txt").read_text().splitlines()[0] == f"{ours.classes[0]} {ours.classes[0]}"
    with pytest.raises(FileExistsError):
        export_imagefolder(cfg, out)


def test_class_folders_keep_order_and_make_names_safe() -> None:
    assert class_folders(["001.a", "002.b"]) == ["001.a", "002.b"]
    assert class_folders(["707-320", "F/A-18", "A300"]) == ["0_707-320", "1_F-A-18", "2_A300"]
    assert class_folders(["b", "a"]) == ["0_b", "1_a"]  # kept as is, ImageFolder would reorder them
