"""evaluate (single crop, TTA rows, confusion matrix), predict and visualize, and the overlay library function."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fgvc import evaluate as evaluate_cli
from fgvc import predict as predict_cli
from fgvc import visualize as visualize_cli
from fgvc.build import build_dataset
from fgvc.config import load_config
from fgvc.engine import trainer
from fgvc.engine.loop import Runtime, evaluate
from fgvc.engine.metrics import ClassificationMeter, most_confused
from fgvc.engine.tta import average_views, flip_views, multiscale_views, ten_crop_views
from fgvc.models import FGVCModel
from fgvc.models.heads import Head
from fgvc.viz import attention_figure, overlay, save_figure
from tests.test_training import scratch_preset, tiny_overrides


class CornerHead(Head):
    """Logits from the top-left feature pixel only, so every view of an image scores differently."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(features[:, :, 0, 0])}


def known_model() -> FGVCModel:
    torch.manual_seed(0)
    return FGVCModel(torch.nn.Identity(), CornerHead()).eval()  # the images are the features


def test_tta_rows_are_hand_computed_averages() -> None:
    model = known_model()
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    batch = [{"image": images, "label": labels, "index": torch.arange(6)}]
    fc = model.head.fc

    def scores(views, average):
        meter = ClassificationMeter(4, keep_scores=True)
        evaluate(model, batch, Runtime(torch.device("cpu")), num_classes=4, views=views, average=average,
                 meter=meter)
        return torch.stack([meter.scores[i] for i in range(6)])

    corner, mirrored = fc(images[:, :, 0, 0]), fc(images[:, :, 0, -1])
    expected = ((F.softmax(corner, 1) + F.softmax(mirrored, 1)) / 2).log()
    torch.testing.assert_close(scores(flip_views, "probs"), expected.detach())
    torch.testing.assert_close(scores(flip_views, "logits"), ((corner + mirrored) / 2).detach())
    # 5 x 5 crops of an 8 x 8 image start at (0, 0), (0, 3), (3, 0), (3, 3) and, centred, (2, 2); the mirrored
    # image's crops start at the same places, which are column 7 - x of the original.
    corners = ((0, 0), (0, 3), (3, 0), (3, 3), (2, 2))
    by_hand = [fc(images[:, :, y, x]) for y, x in corners] + [fc(images[:, :, y, 7 - x]) for y, x in corners]
    crops = TF.ten_crop(images, [5, 5])
    torch.testing.assert_close(torch.stack([fc(c[:, :, 0, 0]) for c in crops]), torch.stack(by_hand))
    torch.testing.assert_close(scores(ten_crop_views(5), "logits"), torch.stack(by_hand).mean(0).detach())


def test_multiscale_views_and_average_errors() -> None:
    images = torch.rand(2, 3, 16, 16)
    views = multiscale_views((0.5, 1.0, 1.5))(images)
    assert [v.shape[-1] for v in views] == [8, 16, 24] and views[1] is images
    with pytest.raises(ValueError, match="average must be one of"):
        average_views([torch.zeros(1, 2)], "median")


def test_most_confused_pairs() -> None:
    confusion = torch.tensor([[5, 3, 0], [1, 6, 0], [0, 3, 2]])
    pairs = most_confused(confusion, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("a", "b", 3), ("c", "b", 3), ("b", "a", 1)]
    assert pairs[1]["share_of_true_class"] == pytest.approx(60.0)


@pytest.fixture(scope="module")
def trained_run(small_birds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs")
    result = trainer.train(scratch_preset(tiny_overrides(small_birds, output, "run") + ["schedule.epochs=1"]))
    return result.run_dir


def test_evaluate_writes_rows_confusion_and_matches_training(trained_run: Path, tmp_path: Path, capsys) -> None:
    results = json.loads((trained_run / "results.json").read_text())
    output = tmp_path / "eval.json"
    assert evaluate_cli.main(["--checkpoint", str(trained_run / "best.pt"), "--tta", "flip", "multiscale", "tencrop",
                              "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["top1"] == pytest.approx(results["test"]["top1"])  # single crop = the training run's figure
    assert set(report["tta"]) == {"flip", "multi-scale 0.875/1/1.125", "ten-crop"}
    rows = list(csv.reader((tmp_path / "eval-confusion.csv").read_text().splitlines()))
    assert rows[0][1:] == build_dataset(load_config(trained_run / "config.yaml").data, "test").classes
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum() == report["images"]
    assert np.trace(counts) / counts.sum() * 100 == pytest.approx(report["top1"])
    assert Image.open(tmp_path / "eval-confusion.png").size[0] > 100
    printed = capsys.readouterr().out
    assert "single crop" in printed and "ten-crop" in printed and "averages probs" in printed


def test_predict_gives_evaluates_probabilities(trained_run: Path, small_birds: Path, tmp_path: Path,
                                               capsys) -> None:
    assert evaluate_cli.main(["--checkpoint", str(trained_run / "best.pt"), "--output", str(tmp_path / "e.json"),
                              "--save-probabilities"]) == 0
    evaluated = [json.loads(line) for line in (tmp_path / "e-probabilities.jsonl").read_text().splitlines()]
    chosen = evaluated[:3]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    capsys.readouterr()
    status = predict_cli.main(["--checkpoint", str(trained_run / "best.pt"), "--json", "--topk", "6",
                               *[item["path"] for item in chosen], str(bad)])
    captured = capsys.readouterr()
    predictions = json.loads(captured.out)
    assert status == 1 and predictions[-1]["error"] and "broken.jpg: unreadable" in captured.err
    for item, prediction in zip(chosen, predictions, strict=False):
        by_index = {p["index"]: p["probability"] for p in prediction["predictions"]}
        np.testing.assert_allclose([by_index[i] for i in range(6)], item["probabilities"], rtol=1e-5, atol=1e-7)
        assert [p["probability"] for p in prediction["predictions"]] == sorted(by_index.values(), reverse=True)
    assert predict_cli.main(["--checkpoint", str(trained_run / "best.pt"), str(small_birds / "images")]) == 0
    text = capsys.readouterr().out
    assert text.count("  1. ") == 60 and "%" in text


def test_overlay_shows_the_map_where_it_peaks() -> None:
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    heatmap = np.zeros((4, 6))
    heatmap[1, 4] = 1.0  # the cell covering rows 10..19, columns 40..49
    result = overlay(image, heatmap, alpha=1.0)
    top = np.round(np.array(colormaps["inferno"](1.0)[:3]) * 255)
    bottom = np.round(np.array(colormaps["inferno"](0.0)[:3]) * 255)
    np.testing.assert_allclose(result[14:16, 44:46].reshape(-1, 3), np.tile(top, (4, 1)), atol=40)
    np.testing.assert_allclose(result[35, 5], bottom, atol=1)
    assert result[15, 45].sum() > result[15, 20].sum() + 200
    half = overlay(image, heatmap, alpha=0.5)
    np.testing.assert_allclose(half[35, 5], (128 + bottom) / 2, atol=1)


def test_attention_figure_png_has_the_expected_size(tmp_path: Path) -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    maps = [(f"map {i}", np.random.default_rng(i).random((4, 4))) for i in range(4)]
    figure = attention_figure(image, maps, title="t", box=[2, 3, 10, 12], crop_box=[0, 0, 20, 20],
                              parts=np.array([[5.0, 5.0, 1.0], [0, 0, 0]]), predictions=[("a", 0.9)], columns=3,
                              panel_inches=2.0, dpi=50)
    path = save_figure(figure, tmp_path / "figure.png")
    assert Image.open(path).size == (round(max(3 * 2.0 + 0.8, 7.0) * 50), round((2 * 2.0 + 0.9) * 50))
    assert not list(tmp_path.glob(".*partial"))


def test_the_saved_picture_is_bright_where_the_map_peaks(tmp_path: Path) -> None:
    image = np.full((32, 32, 3), 100, dtype=np.uint8)
    heatmap = np.zeros((4, 4))
    heatmap[3, 0] = 1.0  # bottom-left cell: image rows 24..31, columns 0..7
    figure = attention_figure(image, [("peaked", heatmap)], dpi=100)
    path = save_figure(figure, tmp_path / "peak.png")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    panel = figure.axes[1]  # the overlay panel, after the input

    def pixel(x: float, y: float) -> np.ndarray:
        column, row = panel.transData.transform((x, y))
        return picture[picture.shape[0] - int(round(row)), int(round(column))]

    assert pixel(3.5, 27.5).sum() > pixel(27.5, 3.5).sum() + 150  # bright at the peak, dark far from it
    np.testing.assert_allclose(pixel(27.5, 3.5), np.asarray(overlay(image, heatmap)[3, 27]), atol=12)


@pytest.mark.parametrize("head", ["linear", "wsdan"])
def test_visualize_writes_one_png_per_image(small_birds: Path, tmp_path: Path, head: str, capsys) -> None:
    extra = ["schedule.epochs=1", f"model.head={head}", "model.num_attention_maps=4"]
    run = trainer.train(scratch_preset(tiny_overrides(small_birds, tmp_path, head) + extra)).run_dir
    out = tmp_path / "pictures"
    assert visualize_cli.main(["--checkpoint", str(run / "best.pt"), "--count", "2", "--out", str(out)]) == 0
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 2
    columns = 6 if head == "wsdan" else 2  # input + 4 maps + their mean; input + the class activation map
    assert Image.open(pictures[0]).size[0] == round(max(columns * 2.2 + 0.8, 7.0) * 100)
    assert visualize_cli.main(["--checkpoint", str(run / "best.pt"), "--indices", "0", "--source", "gradcam",
                               "--out", str(out / "gradcam")]) == 0
    assert Image.open(out / "gradcam" / "test-00000.png").size[0] == 7 * 100  # two panels: the minimum width
