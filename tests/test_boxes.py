"""The one box convention (x0, y0, x1, y1 in pixel edges) and its conversions, against torchvision.ops."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert, clip_boxes_to_image

from fgvc.boxes import box_area, clip_boxes, from_inclusive_corners, from_xywh, to_xywh


def test_clipping_to_an_image_is_torchvisions_and_empty_boxes_are_zeros() -> None:
    boxes = torch.tensor([[-3.0, 2.0, 10.0, 50.0], [5.0, 5.0, 8.0, 9.0], [20.0, 1.0, 30.0, 4.0]])
    clipped = clip_boxes(boxes, (0, 0, 16, 12))
    expected = clip_boxes_to_image(boxes, (12, 16))  # torchvision takes (height, width)
    torch.testing.assert_close(clipped[:2], expected[:2])
    assert clipped[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # entirely outside: no box, not a sliver on the border
    assert [box_area(box) for box in clipped.tolist()] == [10 * 10, 3 * 4, 0]
    inside = clip_boxes(boxes, (4, 4, 9, 10))  # any region, not only an image
    assert inside[1].tolist() == [5.0, 5.0, 8.0, 9.0] and inside[0].tolist() == [4.0, 4.0, 9.0, 10.0]


def test_file_conventions_convert_at_the_edges() -> None:
    xywh = np.array([[1.5, 2.0, 10.0, 4.5], [0.0, 0.0, 3.0, 3.0]])
    xyxy = from_xywh(xywh)
    np.testing.assert_allclose(xyxy, box_convert(torch.from_numpy(xywh), "xywh", "xyxy").numpy())
    np.testing.assert_allclose(to_xywh(xyxy), xywh)
    # 1-based inclusive corners: pixels 2..20 (1-based) are 0-based pixels 1..19, edges 1 and 20.
    assert from_inclusive_corners(2, 3, 20, 12) == (1.0, 2.0, 20.0, 12.0)
