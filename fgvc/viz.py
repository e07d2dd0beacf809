"""Pictures of where a model looks: heat-map overlays, per-image attention grids, the confusion matrix.

`overlay` is the building block for anyone's own maps: an RGB image and any h x w map in, an RGB image with the map
laid over it out. Every map of one figure shares one colour map and one scale (0 to the largest value among the
figure's maps), and the figure has one colour bar, so panels can be compared at a glance. Figures are drawn with
matplotlib's object API (no pyplot, no global backend), so this works in scripts, servers and notebooks alike.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fgvc.boxes import to_xywh
from fgvc.data.transforms import IMAGENET_MEAN, IMAGENET_STD

COLOR_MAP = "inferno"
MIN_FIGURE_INCHES = 7.0


def resize_map(heatmap: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An h x w map resized (bilinear, as the model's maps are meant to be read) to `size` (H, W)."""
    tensor = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray | torch.Tensor, *, alpha: float = 0.5, cmap: str = COLOR_MAP,
            vmin: float = 0.0, vmax: float | None = None) -> np.ndarray:
    """`image` (H x W x 3 uint8) with `heatmap` (any h x w) resized onto it and coloured by `cmap` between vmin and
    vmax (default: the map's maximum), blended with weight `alpha`. Returns H x W x 3 uint8."""
    resized = resize_map(heatmap, image.shape[:2])
    top = float(resized.max()) if vmax is None else vmax
    scaled = np.clip((resized - vmin) / max(top - vmin, 1e-12), 0.0, 1.0)
    colours = colormaps[cmap](scaled)[..., :3] * 255.0
    return np.clip((1 - alpha) * image.astype(np.float64) + alpha * colours + 0.5, 0, 255).astype(np.uint8)


def to_uint8_image(tensor: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A normalized 3 x H x W model input back to an H x W x 3 uint8 picture."""
    image = tensor.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


def attention_figure(image: np.ndarray, maps: Sequence[tuple[str, np.ndarray]], *, title: str = "",
                     box: Sequence[float] | None = None, crop_box: Sequence[float] | None = None,
                     parts: np.ndarray | None = None, predictions: Sequence[tuple[str, float]] = (),
                     columns: int = 6, panel_inches: float = 2.2, dpi: int = 100) -> Figure:
    """One image's grid: the input (with the object box in green, the attention crop box in cyan and visible part
    keypoints as white dots, where given) and each titled map overlaid, all on one scale with one colour bar.
    Boxes are fgvc's (x0, y0, x1, y1) in image pixel edges; parts P x 3 (x, y, visible)."""
    panels = 1 + len(maps)
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    width = max(columns * panel_inches + 0.8, MIN_FIGURE_INCHES)  # room for the title lines
    figure = Figure(figsize=(width, rows * panel_inches + 0.9), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    top = max((float(resize_map(m, image.shape[:2]).max()) for _, m in maps), default=1.0)
    norm = Normalize(0.0, max(top, 1e-12))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    first = axes.flat[0]
    first.imshow(image)
    first.set_title("input", fontsize=8)
    for rectangle, colour in ((box, "lime"), (crop_box, "cyan")):
        if rectangle is None:
            continue
        x, y, w, h = (float(v) for v in to_xywh(rectangle))
        if w > 0 and h > 0:
            # Boxes are in pixel edges; imshow centres pixel k on k, so edge e is drawn at e - 0.5.
            first.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=colour, linewidth=1.5))
    if parts is not None:
        visible = parts[:, 2] > 0
        first.scatter(parts[visible, 0], parts[visible, 1], s=9, c="white", edgecolors="black", linewidths=0.5)
    for ax, (name, heatmap) in zip(list(axes.flat)[1:], maps, strict=False):
        ax.imshow(overlay(image, heatmap, vmax=norm.vmax))
        ax.set_title(textwrap.fill(name, 30), fontsize=7)
    figure.colorbar(ScalarMappable(norm=norm, cmap=COLOR_MAP), ax=list(axes.flat), fraction=0.03, pad=0.01,
                    label="map value", shrink=0.9)
    # One line per prediction, so that wrapping never parts a rank from its class name.
    ranked = [f"{rank}. {name} {100 * p:.1f}%" for rank, (name, p) in enumerate(predictions, start=1)]
    lines = [textwrap.fill(line, round(width * 13)) for line in (title, *ranked) if line]
    if lines:
        figure.suptitle("\n".join(lines), fontsize=8)
    return figure


def image_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], column_titles: Sequence[str], *,
               panel_inches: float = 1.6, dpi: int = 100) -> Figure:
    """Pictures in a grid, one row per (label, images), the columns titled: e.g. MAE's input, masked input and
    reconstructions of a few images."""
    columns = len(column_titles)
    figure = Figure(figsize=(columns * panel_inches + 1.2, len(rows) * panel_inches + 0.4), dpi=dpi,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (label, images) in enumerate(rows):
        for column, (ax, image) in enumerate(zip(axes[row], images, strict=True)):
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(column_titles[column], fontsize=8)
        axes[row][0].set_ylabel(textwrap.fill(label, 18), fontsize=7)
    return figure


def confusion_figure(confusion: np.ndarray | torch.Tensor, classes: Sequence[str], *, dpi: int = 100) -> Figure:
    """Row-normalized confusion matrix (each true class sums to 1), class names on the axes up to 40 classes."""
    counts = np.asarray(confusion, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.22 * len(classes) + 2.5), 24.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=dpi)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    shown = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(classes) <= 40:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write a PNG atomically (a temporary file beside it, then a rename): no half-written pictures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png")
    partial.replace(path)
    return path
