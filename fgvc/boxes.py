"""The one box convention inside fgvc, and the conversions at its edges.

Inside the code every box is (x0, y0, x1, y1) in pixel edges: pixel k spans [k, k + 1), so a box covers columns
x0..x1-1 and rows y0..y1-1 when its corners are integers, and `image[..., y0:y1, x0:x1]` is its content. An absent
box (one that left the frame) is all zeros. Files and pictures use other conventions and are converted where they
are read or drawn: CUB's bounding_boxes.txt holds (x, y, width, height), Stanford Cars and FGVC-Aircraft 1-based
inclusive corners, matplotlib's Rectangle an origin and a size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Region = tuple[float, float, float, float]  # x0, y0, x1, y1


def clip_boxes(boxes: torch.Tensor, region: Region) -> torch.Tensor:
    """Boxes (..., 4) cut to `region` ((0, 0, width, height) for an image); all zeros where nothing is left."""
    x0, y0, x1, y1 = region
    start = torch.maximum(boxes[..., :2], boxes.new_tensor([x0, y0]))
    end = torch.minimum(boxes[..., 2:], boxes.new_tensor([x1, y1]))
    clipped = torch.cat([start, end], dim=-1)
    empty = (end <= start).any(dim=-1, keepdim=True)
    return torch.where(empty, torch.zeros_like(clipped), clipped)


def box_area(box: Region) -> float:
    """The area of one box; 0 when it is empty."""
    x0, y0, x1, y1 = box
    return max(x1 - x0, 0) * max(y1 - y0, 0)


def from_xywh(boxes: np.ndarray) -> np.ndarray:
    """(x, y, width, height) -> (x0, y0, x1, y1), e.g. CUB's bounding_boxes.txt."""
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def to_xywh(boxes: np.ndarray | Sequence[float]) -> np.ndarray:
    """(x0, y0, x1, y1) -> (x, y, width, height), for files in CUB's format and for drawing."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def from_inclusive_corners(x1: float, y1: float, x2: float, y2: float) -> Region:
    """MATLAB-style 1-based inclusive pixel corners (Stanford Cars, FGVC-Aircraft) -> 0-based pixel edges."""
    return x1 - 1.0, y1 - 1.0, float(x2), float(y2)
