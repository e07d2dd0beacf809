"""Using a trained model: evaluate it on a split (single crop, test-time augmentation rows, confusion matrix),
predict single images, and show where it looks. Shared by the evaluate, predict and visualize CLIs, so all three
see exactly the model and preprocessing that training evaluated (fgvc.build.load_model)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets.folder import IMG_EXTENSIONS

from fgvc.build import LoadedModel, build_eval_loader, dataset_for, load_model
from fgvc.data.images import ImageReadError, read_rgb
from fgvc.engine.distributed import Distributed
from fgvc.engine.localization import meter_for
from fgvc.engine.logging import echo
from fgvc.engine.loop import evaluate
from fgvc.engine.metrics import ClassificationMeter, most_confused
from fgvc.engine.tta import DEFAULT_SCALES, flip_views, multiscale_views, ten_crop_views
from fgvc.errors import OptionError

TTA_KINDS = ("flip", "multiscale", "tencrop")
SINGLE_CROP = "single crop"


@dataclass
class EvaluationReport:
    checkpoint: str
    split: str
    images: int
    rows: dict[str, dict[str, float]]  # "single crop" first, then each TTA kind
    confusion: torch.Tensor  # single crop: rows true class, columns predicted
    classes: list[str]
    average: str
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)  # single crop, by dataset index
    image_paths: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The single-crop metrics at the top level (what training reports), TTA rows apart, confused pairs."""
        single = self.rows[SINGLE_CROP]
        return {"checkpoint": self.checkpoint, "split": self.split, "images": self.images, **single,
                "tta": {name: row for name, row in self.rows.items() if name != SINGLE_CROP},
                "tta_average": self.average, "most_confused": most_confused(self.confusion, self.classes)}


def evaluate_checkpoint(path: str | os.PathLike, *, split: str = "test", data_root: str | None = None,
                        device: str = "auto", batch_size: int | None = None, tta: Sequence[str] = (),
                        average: str = "probs", scales: Sequence[float] = DEFAULT_SCALES,
                        keep_probabilities: bool = False, distributed: Distributed | None = None) -> EvaluationReport:
    """A checkpoint (best.pt or last.pt) on a split, with the run's own data settings: the single-crop metrics
    (exactly what training's final evaluation computes), then one row per TTA kind in `tta`. Under torchrun
    (`distributed`) each rank evaluates its shard and every rank gets the whole report."""
    unknown = [kind for kind in tta if kind not in TTA_KINDS]
    if unknown:
        raise OptionError("tta", f"{', '.join(unknown)} unknown; choose from {', '.join(TTA_KINDS)}")
    loaded = load_model(path, device=device, data_root=data_root, distributed=distributed)
    if "multiscale" in tta:
        check_scales(loaded, scales)
    dataset = (distributed or Distributed()).main_first(lambda: dataset_for(loaded, split))
    cfg, classes = loaded.config, len(dataset.classes)

    def loader(wide: bool = False, silent: bool = False):
        # TTA passes are silent: the single-crop pass has reported the unreadable images and applied
        # data.max_bad_fraction already.
        return build_eval_loader(cfg, dataset, loaded.preprocessing, split=split, wide=wide, silent=silent,
                                 batch_size=batch_size, distributed=distributed)

    meter = ClassificationMeter(classes, keep_scores=keep_probabilities)
    rows = {SINGLE_CROP: evaluate(loaded.model, loader(), loaded.runtime, num_classes=classes,
                                  localization=meter_for(dataset), meter=meter, distributed=distributed)}
    views = {"flip": flip_views, "multiscale": multiscale_views(scales), "tencrop": ten_crop_views(loaded.image_size)}
    names = {"flip": "flip", "multiscale": "multi-scale " + "/".join(f"{s:g}" for s in scales), "tencrop": "ten-crop"}
    for kind in tta:
        rows[names[kind]] = evaluate(loaded.model, loader(wide=kind == "tencrop", silent=True), loaded.runtime,
                                     num_classes=classes, views=views[kind], average=average, distributed=distributed)
    report = EvaluationReport(str(path), split, len(dataset), rows, meter.confusion, dataset.classes, average)
    if keep_probabilities:
        for index, scores in meter.scores.items():
            report.probabilities[index] = F.softmax(scores, dim=-1).numpy()
            report.image_paths[index] = str(dataset.image_path(index))
    return report


def check_scales(loaded: LoadedModel, scales: Sequence[float]) -> None:
    """Refuse multi-scale views that cannot be made or that the backbone cannot take (a ViT built for one input
    size), before any pass."""
    for scale in scales:
        side = round(loaded.image_size * scale)
        problem = "a view needs at least one pixel" if side < 1 else loaded.model.refuses_size(side, side)
        if problem is not None:
            raise OptionError("scales", f"{scale:g} makes {side} x {side} views, which {loaded.config.model.backbone} "
                                        f"cannot take: {problem}")


def write_confusion_csv(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    """Rows: true class, columns: predicted class, first row and column the class names (quoted as CSV wants)."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion.tolist(), strict=True):
            writer.writerow([name, *row])


@dataclass
class Prediction:
    path: str
    classes: list[str] = field(default_factory=list)  # top-k, most probable first
    indices: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None  # why the file could not be read (then nothing else is set)

    def to_json(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": [{"class": c, "index": i, "probability": p} for c, i, p in
                                                   zip(self.classes, self.indices, self.probabilities, strict=True)]}


def image_files(inputs: Sequence[str | os.PathLike], echo_skipped=echo) -> list[Path]:
    """Files named directly, and the image files (by extension, recursively, sorted) of folders named."""
    files = []
    for item in map(Path, inputs):
        if not item.is_dir():
            files.append(item)  # read (or reported unreadable) whatever its name
            continue
        found = sorted(p for p in item.rglob("*") if p.is_file())
        images = [p for p in found if p.suffix.lower() in IMG_EXTENSIONS]
        if len(images) < len(found):
            echo_skipped(f"{item}: not reading {len(found) - len(images)} file(s) without an image extension")
        files.extend(images)
    return files


def predict_files(trained: LoadedModel, paths: Sequence[Path], *, topk: int = 5,
                  batch_size: int = 32) -> list[Prediction]:
    """Top-k classes and probabilities (softmax of the inference logits, single crop, as evaluate computes them)
    for each file, `batch_size` files at a time; an unreadable file gets its reason and does not stop the rest."""
    k = min(topk, len(trained.classes))
    predictions = []
    for start in range(0, len(paths), batch_size):
        chunk = [Prediction(str(path)) for path in paths[start : start + batch_size]]
        images = []
        for prediction in chunk:
            try:
                image = read_rgb(prediction.path)
            except ImageReadError as error:
                prediction.error = error.reason
                continue
            images.append(trained.prepare(image))
        readable = [prediction for prediction in chunk if prediction.error is None]
        if readable:
            top = F.softmax(trained.logits(torch.stack(images)), dim=-1).cpu().topk(k, dim=1)
            for prediction, values, indices in zip(readable, top.values, top.indices, strict=True):
                prediction.indices = indices.tolist()
                prediction.classes = [trained.classes[i] for i in prediction.indices]
                prediction.probabilities = values.tolist()
        predictions.extend(chunk)
    return predictions


MAP_SOURCES = ("auto", "gradcam")


@dataclass
class Looked:
    """Where the model looked for one image: titled maps (h x w), the top predictions, the head's test-time crop."""

    maps: list[tuple[str, np.ndarray]]
    predictions: list[tuple[str, float]]
    crop_box: tuple[float, float, float, float] | None  # fgvc.boxes: x0, y0, x1, y1


@torch.no_grad()
def where_it_looks(trained: LoadedModel, image: torch.Tensor, *, source: str = "auto", max_maps: int = 12,
                   topk: int = 3) -> Looked:
    """Maps for one normalized image (3 x H x W). source "auto": the head's attention maps (the `max_maps` with
    the most mass, and their mean over all maps) or, for heads without attention, its class activation map of the
    top-1 class; "gradcam": Grad-CAM of the top-1 class, whatever the head."""
    if source not in MAP_SOURCES:
        raise OptionError("source", f"{source!r} is unknown; choose from {', '.join(MAP_SOURCES)}")
    model = trained.model
    images = trained.runtime.images(image[None])
    with trained.runtime.autocast():
        features = model.forward_features(images)
        outputs = model.forward_head(features, images)
    top = F.softmax(outputs["logits"].float(), dim=-1)[0].topk(min(topk, len(trained.classes)))
    first = top.indices[:1]
    predictions = [(trained.classes[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    if source == "gradcam":
        maps = [(f"Grad-CAM: {trained.classes[first.item()]}", model.grad_cam(features, first)[0])]
    elif "attention_maps" in outputs:
        attention = outputs["attention_maps"][0].float()
        order = attention.sum(dim=(1, 2)).argsort(descending=True)[:max_maps].tolist()
        maps = [(f"attention map {m}", attention[m]) for m in order] + [("mean of all maps", attention.mean(0))]
    else:
        cam = model.class_activation_maps(images, first, features=features)[0]
        maps = [(f"class activation: {trained.classes[first.item()]}", cam)]
    boxes = model.test_crop_boxes(outputs, images.shape[-2:])
    crop_box = tuple(boxes[0].tolist()) if boxes is not None else None
    return Looked([(title, m.detach().float().cpu().numpy()) for title, m in maps], predictions, crop_box)
