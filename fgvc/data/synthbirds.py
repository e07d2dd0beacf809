"""synthbirds: a procedural fine-grained bird dataset, written in the exact CUB-200-2011 layout.

A class is a combination of small part attributes (bill shape, crown colour, wing pattern, eye ring, tail shape);
classes are picked by a walk that changes one attribute at a time, so many class pairs differ in exactly one small
part. Everything else -- pose, size, body colours, bill colour, background clutter, occluders, lighting -- is drawn
per image independently of the class, so global colour statistics carry (almost) no class information.

Each image is drawn from its own random stream, seeded by (seed, image id) (and the class offset, when not 0):
generation is deterministic, byte for byte, whatever the number of worker processes.

Two settings serve transfer experiments; at their defaults the files are exactly those written before they existed.

- class_offset: the classes are positions [class_offset, class_offset + num_classes) of one fixed walk over all 216
  attribute combinations (the walk of `seed`), so specs with the same seed and non-overlapping ranges share no class,
  and a class has the same name (its folder, numbered by its position in the walk) in every draw.
- domain: how an image is rendered around the class evidence (DOMAINS): the background (clutter, plain, stripes),
  the body-colour palette (standard, shifted in hue) and the lighting (day, dusk). A domain draws the same random
  numbers as the standard one, so an image id keeps its pose, colours, box, parts and attributes in every domain --
  only the pixels change -- and the class-defining parts are drawn exactly as in the standard domain.

    python -m fgvc.data.synthbirds --out data/synthbirds --num-classes 10 --images-per-class 60
    python -m fgvc.data.synthbirds --out data/target --num-classes 10 --class-offset 10 --domain shifted
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
from PIL import Image, ImageDraw

from fgvc.boxes import clip_boxes, to_xywh
from fgvc.data.cub import CUBAnnotations, CUBDataset
from fgvc.data.parts import CUB_PART_NAMES
from fgvc.errors import FGVCError, OutputExists, command
from fgvc.progress import progress_bar

# Part of the cache key of generated trees: bump it whenever the files written for a spec change.
GENERATOR_VERSION = 2
METADATA_FILE = "synthbirds.json"

# The class-defining part attributes, in CUB's "has_<part>_<property>::<value>" naming.
CLASS_FACTORS: dict[str, tuple[str, ...]] = {
    "has_bill_shape": ("cone", "dagger", "hooked"),
    "has_crown_color": ("red", "yellow", "blue", "black"),
    "has_wing_pattern": ("plain", "single_bar", "double_bar"),
    "has_eye_ring": ("absent", "present"),
    "has_tail_shape": ("forked", "rounded", "pointed"),
}
CLASS_CAPACITY = math.prod(len(values) for values in CLASS_FACTORS.values())
# Per-image attributes that are drawn independently of the class (useful multi-label targets, useless for the class).
NUISANCE_FACTORS: dict[str, tuple[str, ...]] = {
    "has_primary_color": ("brown", "grey", "olive", "rufous", "slate", "buff"),
    "has_bill_color": ("black", "grey", "yellow", "horn"),
}
# The part that carries each attribute; its visibility decides the attribute's certainty.
FACTOR_PART = {
    "has_bill_shape": "beak",
    "has_crown_color": "crown",
    "has_wing_pattern": "left wing",  # whichever wing faces the camera; see _near_side_part
    "has_eye_ring": "left eye",
    "has_tail_shape": "tail",
    "has_primary_color": "back",
    "has_bill_color": "beak",
}

CROWN_RGB = {"red": (205, 30, 35), "yellow": (240, 205, 35), "blue": (35, 80, 215), "black": (22, 22, 24)}
BODY_RGB = {
    "brown": (125, 88, 58),
    "grey": (135, 135, 130),
    "olive": (112, 118, 62),
    "rufous": (170, 95, 52),
    "slate": (88, 98, 115),
    "buff": (192, 162, 122),
}


def _hue_shifted(rgb: tuple[int, int, int], turn: float = 1 / 3, saturation: float = 0.2) -> tuple[int, int, int]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb((h + turn) % 1.0, min(0.9, s + saturation), v))


# The "shifted" palette: the same body colours turned a third of the way round the hue circle and a little more
# saturated (browns become greens, slate a mauve); no crown colour is green, so the crown stays as distinct.
PALETTES = {"standard": BODY_RGB, "shifted": {name: _hue_shifted(rgb) for name, rgb in BODY_RGB.items()}}
BILL_RGB = {"black": (28, 26, 26), "grey": (105, 105, 110), "yellow": (225, 190, 60), "horn": (190, 170, 140)}
PALE_RGB = ((245, 245, 240), (240, 232, 200), (238, 238, 170))  # wing bars: white, cream, pale yellow
PUPIL_RGB = (14, 14, 16)
EYE_RING_RGB = (246, 246, 240)
SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing

# Lighting: a fixed colour cast on top of the per-image exposure, and a factor on the sensor noise.
LIGHTING = {"day": ((1.0, 1.0, 1.0), 1.0), "dusk": ((0.62, 0.55, 0.80), 1.6)}
BACKGROUNDS = ("clutter", "plain", "stripes")


@dataclass(frozen=True)
class Domain:
    """How an image is rendered around the class evidence: background (BACKGROUNDS), palette (PALETTES, the body
    colours) and lighting (LIGHTING)."""

    background: str = "clutter"
    palette: str = "standard"
    lighting: str = "day"


# The rendering domains, by name (SynthBirdsSpec.domain): the standard one, one per changed knob, and "shifted",
# which changes all three together (a visibly different target domain).
DOMAINS = {
    "standard": Domain(),
    "plain": Domain(background="plain"),  # the sky gradient only, no clutter
    "stripes": Domain(background="stripes"),  # regular stripes instead of scattered clutter
    "recolored": Domain(palette="shifted"),
    "dusk": Domain(lighting="dusk"),  # darker, with a violet cast and more noise
    "shifted": Domain(background="stripes", palette="shifted", lighting="dusk"),
}

# certainties.txt of CUB; a part that cannot be seen makes its attribute "not visible".
CERTAINTIES = ("not visible", "guessing", "probably", "definitely")
CERTAIN, NOT_VISIBLE = 4, 1


# --------------------------------------------------------------------------------------------------------------
# Bird geometry, in a local frame: x forward (towards the beak), y down, one unit = the bird's body length.
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _unit_circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0, n: int = 28) -> np.ndarray:
    cos_t, sin_t = _unit_circle(n)
    a = math.radians(angle_deg)
    x, y = rx * cos_t, ry * sin_t
    points = np.empty((n, 2))
    points[:, 0] = cx + x * math.cos(a) - y * math.sin(a)
    points[:, 1] = cy + x * math.sin(a) + y * math.cos(a)
    return points


def _disc_cap(cx: float, cy: float, r: float, y_cut: float, n: int = 20) -> np.ndarray:
    """The part of a disc above the horizontal line y = y_cut (y points down)."""
    half = math.acos((cy - y_cut) / r)  # angle from straight up to where the line meets the circle
    t = np.linspace(-math.pi / 2 - half, -math.pi / 2 + half, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _bar(p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
    """A rectangle of the given width around the segment p0-p1 (legs, feet, branches)."""
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    nx, ny = -(y1 - y0) / length * width / 2, (x1 - x0) / length * width / 2
    return np.array([(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)])


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


HEAD_CENTER, HEAD_RADIUS = (0.36, -0.17), 0.135
EYE_CENTER = (0.41, -0.14)
BODY = _ellipse(0.0, 0.0, 0.36, 0.21)
BELLY = _ellipse(0.04, 0.09, 0.27, 0.11)
HEAD = _ellipse(*HEAD_CENTER, HEAD_RADIUS, HEAD_RADIUS)
CROWN = _disc_cap(*HEAD_CENTER, HEAD_RADIUS, HEAD_CENTER[1] - 0.045)
WING = _ellipse(-0.06, -0.04, 0.25, 0.10, angle_deg=-6.0)
PUPIL = _ellipse(*EYE_CENTER, 0.032, 0.032, n=16)
EYE_RING = _ellipse(*EYE_CENTER, 0.075, 0.075, n=24)
LEGS = (  # (near leg, far leg): shank and foot
    (_bar((0.04, 0.15), (0.06, 0.37), 0.032), _bar((0.00, 0.37), (0.13, 0.37), 0.026)),
    (_bar((-0.04, 0.15), (-0.02, 0.37), 0.032), _bar((-0.08, 0.37), (0.05, 0.37), 0.026)),
)
PERCH = _bar((-0.9, 0.40), (0.9, 0.40), 0.05)
BILLS = {
    "cone": np.array([(0.47, -0.21), (0.60, -0.15), (0.47, -0.09)]),
    "dagger": np.array([(0.47, -0.175), (0.78, -0.15), (0.47, -0.125)]),
    "hooked": np.array([(0.47, -0.20), (0.58, -0.195), (0.65, -0.14), (0.64, -0.05), (0.60, -0.10), (0.55, -0.12),
                        (0.47, -0.11)]),
}
BILL_KEYPOINT = {"cone": (0.52, -0.15), "dagger": (0.55, -0.15), "hooked": (0.54, -0.15)}
WING_BARS = {
    "plain": (),
    "single_bar": (_ellipse(0.03, -0.045, 0.024, 0.088, angle_deg=-6.0, n=16),),
    "double_bar": (
        _ellipse(-0.01, -0.04, 0.022, 0.090, angle_deg=-6.0, n=16),
        _ellipse(0.08, -0.05, 0.022, 0.075, angle_deg=-6.0, n=16),
    ),
}
_fan = np.linspace(math.radians(130), math.radians(230), 11)
TAILS = {  # three silhouettes that differ in length as well as outline
    "forked": np.array([(-0.30, -0.06), (-0.74, -0.16), (-0.50, -0.01), (-0.74, 0.11), (-0.30, 0.04)]),
    "rounded": np.concatenate([[(-0.28, -0.05)], np.stack([-0.28 + 0.22 * np.cos(_fan), 0.22 * np.sin(_fan)], 1),
                               [(-0.28, 0.05)]]),
    "pointed": np.array([(-0.30, -0.06), (-0.80, -0.01), (-0.30, 0.04)]),
}
# Where each CUB part is annotated. Sided parts sit on the near side; the far eye and far wing are hidden.
KEYPOINTS = {
    "back": (-0.12, -0.17),
    "belly": (0.04, 0.13),
    "breast": (0.27, -0.02),
    "crown": (0.36, -0.255),
    "forehead": (0.44, -0.235),
    "eye": EYE_CENTER,
    "leg": ((0.05, 0.29), (-0.03, 0.29)),  # near, far
    "wing": (-0.14, -0.04),
    "nape": (0.26, -0.17),
    "tail": (-0.42, -0.01),
    "throat": (0.38, -0.05),
}
# The drawn region that holds each class factor (for the "discriminative part is small" measurement). For a factor
# the region of the variant with the largest area is used, so the figure is an upper bound.
FACTOR_REGION_AREA = {
    "has_bill_shape": max(_polygon_area(p) for p in BILLS.values()),
    "has_crown_color": _polygon_area(CROWN),
    "has_wing_pattern": _polygon_area(WING),
    "has_eye_ring": _polygon_area(EYE_RING),
    "has_tail_shape": max(_polygon_area(p) for p in TAILS.values()),
}
# Extent used to keep the bird in frame: beak tip to tail tip, crown to perch.
BIRD_EXTENT = np.array([(-0.81, -0.31), (0.79, -0.31), (0.79, 0.42), (-0.81, 0.42)])


# --------------------------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------------------------


def class_attributes(num_classes: int, seed: int, offset: int = 0) -> list[dict[str, str]]:
    """Pick `num_classes` distinct attribute combinations, each new one a single-attribute change of an earlier one.

    The walk makes every class (after the first) a one-part neighbour of another class, so the set is fine-grained
    by construction, not by luck. The walk is one fixed sequence per seed (the first n classes are the first n of any
    longer draw); `offset` skips its first `offset` classes, so [offset, offset + num_classes) of that sequence are
    returned. Classes of an offset draw are one-part neighbours of classes of the walk, not always of each other.
    """
    if not 1 <= num_classes <= CLASS_CAPACITY:
        raise InvalidSpec(f"synthbirds supports 1 to {CLASS_CAPACITY} classes, got {num_classes}")
    if not 0 <= offset <= CLASS_CAPACITY - num_classes:
        raise InvalidSpec(f"class_offset + num_classes must be at most {CLASS_CAPACITY} (the attribute combinations) "
                          f"with class_offset >= 0, got {offset} + {num_classes}")
    num_classes += offset
    rng = np.random.default_rng([seed, 1])
    sizes = [len(values) for values in CLASS_FACTORS.values()]
    chosen = [tuple(int(rng.integers(n)) for n in sizes)]
    usage = [np.zeros(n) for n in sizes]  # how many chosen classes use each value of each factor
    for f, v in enumerate(chosen[0]):
        usage[f][v] += 1
    while len(chosen) < num_classes:
        taken = set(chosen)
        # (usage of the value the step introduces, usage of all the child's values): the least used wins, so every
        # value appears as early as a one-step walk allows and classes spread over the attribute space.
        steps = {}
        for parent in chosen:
            for f, n in enumerate(sizes):
                for v in range(n):
                    child = parent[:f] + (v,) + parent[f + 1 :]
                    if child not in taken:
                        score = (usage[f][v], sum(usage[g][w] for g, w in enumerate(child)))
                        steps[child] = min(score, steps.get(child, score))
        best = min(steps.values())
        candidates = sorted(c for c, score in steps.items() if score == best)
        child = candidates[int(rng.integers(len(candidates)))]
        chosen.append(child)
        for f, v in enumerate(child):
            usage[f][v] += 1
    names = list(CLASS_FACTORS)
    return [{n: CLASS_FACTORS[n][v] for n, v in zip(names, combo, strict=True)} for combo in chosen[offset:]]


def class_name(attributes: dict[str, str]) -> str:
    """A readable CUB-style class name such as 'Redcap_Twobar_Ringeye_Forktail_Hookbill'."""
    wing = {"plain": "Plainwing", "single_bar": "Barwing", "double_bar": "Twobar"}[attributes["has_wing_pattern"]]
    words = [
        attributes["has_crown_color"].capitalize() + "cap",
        wing,
        "Ringeye" if attributes["has_eye_ring"] == "present" else "",
        {"forked": "Forktail", "rounded": "Roundtail", "pointed": "Spiketail"}[attributes["has_tail_shape"]],
        attributes["has_bill_shape"].capitalize() + "bill",
    ]
    return "_".join(w for w in words if w)


# --------------------------------------------------------------------------------------------------------------
# Rendering one image
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RenderedBird:
    """One drawn image with its annotations, in pixel coordinates of the image (x right, y down).

    Keypoints use the pixel-centre convention (pixel k has its centre at k) as Albumentations does; the box is
    fgvc's (x0, y0, x1, y1) in pixel edges (fgvc.boxes), written as CUB's (x, y, width, height).
    """

    image: np.ndarray  # H x W x 3 uint8
    bbox: np.ndarray  # (4,) x0, y0, x1, y1 (fgvc.boxes)
    parts: np.ndarray  # (15, 3) x, y, visible; invisible parts are (0, 0, 0)
    part_colors: np.ndarray  # (15, 3) the RGB the generator painted at each part's keypoint (before lighting)
    nuisance: dict[str, str]
    scale_px: float  # the bird's body length in pixels


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    offsets = rng.integers(-amount, amount + 1, 3).tolist()
    return tuple(min(255, max(0, c + o)) for c, o in zip(rgb, offsets, strict=True))


def _random_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.15, 0.95), rng.uniform(0.2, 0.95))
    return int(r * 255), int(g * 255), int(b * 255)


class _Canvas:
    """A PIL canvas that takes polygons in output-pixel coordinates. The background is drawn at output resolution
    (large fills, no need for smooth edges), then the canvas is supersampled for the bird, whose small parts need
    anti-aliasing, and box-downsampled at the end."""

    def __init__(self, size: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> None:
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
        column = np.float32(top) + (np.float32(bottom) - np.float32(top)) * ramp + np.float32(0.5)
        # A one-pixel-wide gradient stretched sideways: far cheaper than compositing two full images.
        self.image = Image.fromarray(column.astype(np.uint8)[:, None, :]).resize((size, size), Image.NEAREST)
        self.scale = 1
        self.draw = ImageDraw.Draw(self.image)

    def supersample(self) -> None:
        self.scale = SUPERSAMPLE
        self.image = self.image.resize((self.image.width * self.scale,) * 2, Image.NEAREST)
        self.draw = ImageDraw.Draw(self.image)

    def polygon(self, points: np.ndarray, color: tuple[int, int, int]) -> None:
        scaled = (points + 0.5) * self.scale - 0.5  # pixel centres stay pixel centres after the box downsample
        self.draw.polygon(scaled.ravel().tolist(), fill=color)

    def result(self) -> np.ndarray:
        return np.asarray(self.image.reduce(self.scale), dtype=np.uint8)


def _background_draws(rng: np.random.Generator, size: int, count: int) -> tuple[np.ndarray, ...]:
    """The random numbers of the background: every background style draws exactly these, so the bird drawn after
    it is the same bird whatever the style."""
    kinds = rng.integers(3, size=count)
    centers = rng.uniform(-0.1, 1.1, (count, 2)) * size
    extents = rng.uniform(0.04, 0.25, count) * size
    shape_params = rng.random((count, 13))  # each kind reads the few it needs
    hsv = rng.random((count, 3)) * (1.0, 0.8, 0.75) + (0.0, 0.15, 0.2)
    return kinds, centers, extents, shape_params, hsv


def _hsv_rgb(hsv: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(*hsv))


def _draw_background(canvas: _Canvas, rng: np.random.Generator, size: int, count: int, style: str) -> None:
    draws = _background_draws(rng, size, count)
    if style == "clutter":
        _draw_clutter(canvas, size, *draws)
    elif style == "stripes":
        _draw_stripes(canvas, size, *draws)
    # "plain": the gradient alone (the draws are made all the same, see _background_draws)


def _draw_stripes(canvas: _Canvas, size: int, kinds, centers, extents, shape_params, hsv) -> None:
    """Parallel stripes across the whole frame at one random angle, each its own hue: a regular texture where the
    standard domain has scattered shapes, with colours as uninformative."""
    angle = math.pi * shape_params[0, 0]
    along = np.array([math.cos(angle), math.sin(angle)]) * size
    across = np.array([-math.sin(angle), math.cos(angle)])
    period = 1.5 * size / len(hsv)  # the stripes cover the frame's diagonal whatever the angle
    centre = np.array([size / 2, size / 2]) + across * period * (shape_params[0, 1] - 0.5)
    for k, colour in enumerate(hsv):
        middle = centre + across * period * (k - (len(hsv) - 1) / 2)
        width = period * (0.35 + 0.3 * shape_params[k, 2])
        canvas.polygon(_bar(tuple(middle - along), tuple(middle + along), width), _hsv_rgb(colour))


def _draw_clutter(canvas: _Canvas, size: int, kinds, centers, extents, shape_params, hsv) -> None:
    """Leaves, stones and branches in every hue (the crown colours included), so colour says little."""
    for kind, center, extent, u, (h, s, v) in zip(kinds, centers, extents, shape_params, hsv, strict=True):
        if kind == 0:
            shape = _ellipse(*center, extent, extent * (0.3 + 0.7 * u[0]), 180 * u[1])
        elif kind == 1:
            n = 3 + int(u[0] * 4)
            angles = np.sort(u[1 : 1 + n]) * 2 * math.pi
            radii = extent * (0.4 + 0.6 * u[7 : 7 + n])
            shape = center + np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        else:
            offset = 2 * extent * np.array([math.cos(2 * math.pi * u[0]), math.sin(2 * math.pi * u[0])])
            shape = _bar(tuple(center - offset), tuple(center + offset), (0.01 + 0.03 * u[1]) * size)
        canvas.polygon(shape, tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)))


def _pose(rng: np.random.Generator, size: int, difficulty: float) -> tuple[np.ndarray, np.ndarray, bool, float]:
    """Random scale, rotation, mirror and position; returns (linear map, translation, mirrored, body length)."""
    length = size * rng.uniform(0.50 - 0.16 * difficulty, 0.62)
    angle = math.radians(rng.uniform(-1, 1) * (8 + 32 * difficulty))
    mirrored = bool(rng.random() < 0.5)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    linear = length * rotation @ np.diag([-1.0 if mirrored else 1.0, 1.0])
    corners = BIRD_EXTENT @ linear.T
    low, high = corners.min(0), corners.max(0)
    # Usually the whole bird is in frame; at higher difficulty it may be cut by the border (those parts go invisible).
    slack = (high - low) * (0.3 if rng.random() < 0.35 * difficulty else 0.0)
    lo, hi = -low - slack, (size - 1) - high + slack
    translation = np.where(lo <= hi, rng.uniform(np.minimum(lo, hi), np.maximum(lo, hi)), (lo + hi) / 2)
    return linear, translation, mirrored, length


def render_bird(
    attributes: dict[str, str], rng: np.random.Generator, image_size: int = 128, difficulty: float = 0.5,
    domain: str = "standard",
) -> RenderedBird:
    """Draw one bird of the class given by `attributes` over a cluttered background, rendered in `domain`
    (DOMAINS). Every domain draws the same random numbers from `rng`: only the pixels differ."""
    if domain not in DOMAINS:
        raise InvalidSpec(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    size = image_size
    style = DOMAINS[domain]
    background = [_random_rgb(rng) for _ in range(2)]
    canvas = _Canvas(size, *background)
    _draw_background(canvas, rng, size, round(6 + 18 * difficulty), style.background)
    canvas.supersample()

    linear, translation, mirrored, length = _pose(rng, size, difficulty)

    def place(points: np.ndarray | tuple[float, float]) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) @ linear.T + translation

    primary = NUISANCE_FACTORS["has_primary_color"][int(rng.integers(6))]
    bill_color_name = NUISANCE_FACTORS["has_bill_color"][int(rng.integers(4))]
    body = _jitter(PALETTES[style.palette][primary], rng, 12)
    belly = tuple(int(c + (255 - c) * rng.uniform(0.35, 0.6)) for c in body)
    wing = tuple(int(c * rng.uniform(0.55, 0.75)) for c in body)
    crown = _jitter(CROWN_RGB[attributes["has_crown_color"]], rng, 8)
    bill = _jitter(BILL_RGB[bill_color_name], rng, 8)
    leg = _jitter((70, 62, 60), rng, 20)
    bar = _jitter(PALE_RGB[int(rng.integers(len(PALE_RGB)))], rng, 6)
    branch = _jitter((92, 70, 50), rng, 25)

    if rng.random() < 0.8:
        canvas.polygon(place(PERCH), branch)
    bill_shape, tail_shape = attributes["has_bill_shape"], attributes["has_tail_shape"]
    drawn: list[np.ndarray] = []  # every bird polygon, for the bounding box

    def paint(points: np.ndarray, color: tuple[int, int, int]) -> None:
        placed = place(points)
        drawn.append(placed)
        canvas.polygon(placed, color)

    for shank, foot in LEGS[::-1]:  # far leg first, so the near leg is on top
        paint(shank, leg)
        paint(foot, leg)
    paint(TAILS[tail_shape], wing)
    paint(BODY, body)
    paint(BELLY, belly)
    paint(WING, wing)
    for stripe in WING_BARS[attributes["has_wing_pattern"]]:
        paint(stripe, bar)
    paint(HEAD, body)
    paint(CROWN, crown)
    if attributes["has_eye_ring"] == "present":
        paint(EYE_RING, EYE_RING_RGB)
    paint(PUPIL, PUPIL_RGB)
    paint(BILLS[bill_shape], bill)

    occluder = None
    if rng.random() < 0.3 * difficulty:  # a leafy twig in front of the bird hides whatever it covers
        anchor = place(KEYPOINTS[["back", "tail", "belly", "wing"][int(rng.integers(4))]])
        radius = length * rng.uniform(0.12, 0.22)
        occluder = (anchor + rng.uniform(-0.5, 0.5, 2) * radius, radius)
        canvas.polygon(_ellipse(*occluder[0], radius, radius), _jitter((60, 120, 50), rng, 30))

    image = _light(canvas.result(), rng, difficulty, style.lighting)
    colors = {"body": body, "belly": belly, "crown": crown, "wing": wing, "bill": bill, "leg": leg}
    parts, part_colors = _keypoints(place, mirrored, occluder, size, bill_shape, colors)
    return RenderedBird(
        image=image,
        bbox=_bounding_box(np.concatenate(drawn), size),
        parts=parts,
        part_colors=part_colors,
        nuisance={"has_primary_color": primary, "has_bill_color": bill_color_name},
        scale_px=length,
    )


def _keypoints(
    place: Callable[[tuple[float, float]], np.ndarray],
    mirrored: bool,
    occluder: tuple[np.ndarray, float] | None,
    size: int,
    bill_shape: str,
    colors: dict[str, tuple[int, int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """The 15 CUB keypoints: near-side parts visible, far eye and wing hidden, out-of-frame or covered -> invisible."""
    near, far = ("right", "left") if mirrored else ("left", "right")
    where = {
        "back": (KEYPOINTS["back"], colors["body"]),
        "beak": (BILL_KEYPOINT[bill_shape], colors["bill"]),
        "belly": (KEYPOINTS["belly"], colors["belly"]),
        "breast": (KEYPOINTS["breast"], colors["body"]),
        "crown": (KEYPOINTS["crown"], colors["crown"]),
        "forehead": (KEYPOINTS["forehead"], colors["crown"]),
        f"{near} eye": (KEYPOINTS["eye"], PUPIL_RGB),
        f"{near} leg": (KEYPOINTS["leg"][0], colors["leg"]),
        f"{far} leg": (KEYPOINTS["leg"][1], colors["leg"]),
        f"{near} wing": (KEYPOINTS["wing"], colors["wing"]),
        "nape": (KEYPOINTS["nape"], colors["body"]),
        "tail": (KEYPOINTS["tail"], colors["wing"]),
        "throat": (KEYPOINTS["throat"], colors["body"]),
    }
    parts = np.zeros((len(CUB_PART_NAMES), 3))
    part_colors = np.zeros((len(CUB_PART_NAMES), 3), dtype=np.uint8)
    for i, name in enumerate(CUB_PART_NAMES):
        if name not in where:  # the far eye and the far wing are behind the bird
            continue
        local, color = where[name]
        x, y = place(local)
        # Inside the grid of pixel centres, as CUB's visible parts are: the written coordinates (one decimal) stay
        # in [0, size - 1] too.
        in_frame = 0 <= x <= size - 1 and 0 <= y <= size - 1
        covered = occluder is not None and math.dist((x, y), occluder[0]) < occluder[1]
        if in_frame and not covered:
            parts[i] = (x, y, 1)
        part_colors[i] = color
    return parts, part_colors


def _bounding_box(points: np.ndarray, size: int) -> np.ndarray:
    """Tight box around the drawn bird's pixel-centre points, in pixel edges, clipped to the frame."""
    box = torch.from_numpy(np.concatenate([points.min(0), points.max(0)]) + 0.5)
    return clip_boxes(box, (0, 0, size, size)).numpy()


def _light(image: np.ndarray, rng: np.random.Generator, difficulty: float, lighting: str = "day") -> np.ndarray:
    """Global exposure and colour cast, a shading ramp across the frame, and sensor noise; `lighting` (LIGHTING)
    adds a fixed cast and more noise, drawing the same random numbers."""
    size = image.shape[0]
    gain = rng.uniform(1 - 0.35 * difficulty, 1 + 0.2 * difficulty) * (1 + rng.uniform(-0.1, 0.1, 3) * difficulty)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(size, dtype=np.float32) / max(size - 1, 1) - 0.5) * (0.4 * difficulty * rng.uniform(-1, 1))
    shading = 1 + math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]
    sigma = np.float32(1 + 5 * difficulty)
    if lighting != "day":  # day: the arithmetic exactly as before lighting existed
        cast, noise_factor = LIGHTING[lighting]
        gain = gain * np.array(cast)
        sigma = sigma * np.float32(noise_factor)
    lit = np.empty_like(image)
    # Channel by channel: each float32 temporary stays small enough for the heap (whole-image temporaries are
    # mmapped and page-faulted afresh on every call, which doubles the cost of this function).
    for c in range(3):
        # Gaussian noise through a quantile table of random bytes: 3x cheaper than standard_normal, same look.
        noise = _GAUSSIAN_QUANTILES[np.frombuffer(rng.bytes(size * size), dtype=np.uint8)].reshape(size, size)
        channel = image[..., c] * (shading * np.float32(gain[c])) + (noise * sigma + np.float32(0.5))
        lit[..., c] = np.clip(channel, 0, 255)
    return lit


_GAUSSIAN_QUANTILES = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Writing a dataset in the CUB_200_2011 layout
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthBirdsSpec:
    """Everything that determines a synthbirds dataset; equal specs give byte-identical files.

    class_offset: the classes are [class_offset, class_offset + num_classes) of the seed's walk over all 216
    attribute combinations (class_attributes); same seed, non-overlapping ranges: no class in common. Images of an
    offset draw come from their own random streams (image_rng), not from those of the draw at offset 0.
    domain: the rendering domain (DOMAINS): "standard" (clutter, standard palette, day light), "plain" (no clutter),
    "stripes" (striped background), "recolored" (body colours shifted in hue), "dusk" (dark, violet cast, noisier),
    "shifted" (stripes + recolored + dusk together). Class parts, poses, boxes, parts and attributes are those of the
    standard domain, image for image; only the pixels around the class evidence change.
    """

    num_classes: int = 10
    images_per_class: int = 60
    train_fraction: float = 0.5
    image_size: int = 128
    difficulty: float = 0.5
    seed: int = 0
    class_offset: int = 0
    domain: str = "standard"

    def __post_init__(self) -> None:
        problems = []
        if self.images_per_class < 2:
            problems.append(f"images_per_class must be at least 2 (one train, one test), got {self.images_per_class}")
        if not 0 < self.train_fraction < 1:
            problems.append(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if self.image_size < 32:
            problems.append(f"image_size must be at least 32 pixels, got {self.image_size}")
        if not 0 <= self.difficulty <= 1:
            problems.append(f"difficulty must be in [0, 1], got {self.difficulty}")
        if not 1 <= self.num_classes <= CLASS_CAPACITY:
            problems.append(f"num_classes must be in [1, {CLASS_CAPACITY}], got {self.num_classes}")
        if self.class_offset < 0:
            problems.append(f"class_offset must be at least 0, got {self.class_offset}")
        elif self.class_offset + self.num_classes > CLASS_CAPACITY:
            problems.append(f"class_offset + num_classes must be at most {CLASS_CAPACITY} (the attribute "
                            f"combinations), got {self.class_offset} + {self.num_classes}")
        if self.domain not in DOMAINS:
            problems.append(f"domain must be one of {', '.join(DOMAINS)}, got {self.domain!r}")
        if problems:
            raise InvalidSpec("invalid synthbirds spec: " + "; ".join(problems))

    def identity(self) -> dict:
        """The fields as a dict, less those added later (FIELDS_ADDED_LATER) that hold their defaults: the spec as
        synthbirds.json records it, and what a cache key should digest -- a default spec keeps the key and metadata
        it had before those fields existed, and any other value gives another key."""
        values = asdict(self)
        for name in FIELDS_ADDED_LATER:
            if values[name] == SynthBirdsSpec.__dataclass_fields__[name].default:
                del values[name]
        return values


# Fields whose default reproduces the trees written before the field existed; identity() leaves them out there.
FIELDS_ADDED_LATER = ("class_offset", "domain")


class InvalidSpec(FGVCError, ValueError):
    """A synthbirds spec outside what the generator supports; the message names each bad field."""


@dataclass
class _Job:
    image_id: int
    attributes: dict[str, str]
    path: Path
    spec: SynthBirdsSpec


@dataclass
class _Drawn:
    image_id: int
    bbox: np.ndarray
    parts: np.ndarray
    nuisance: dict[str, str]
    scale_px: float


def image_rng(seed: int, image_id: int, class_offset: int = 0) -> np.random.Generator:
    """The random stream of one image: a function of (seed, image id) only, and of the class offset when there is
    one (the draws of disjoint class ranges do not repeat each other's poses and backgrounds). Not of the domain:
    an image id is the same bird in every domain."""
    return np.random.default_rng([seed, 0, image_id] if class_offset == 0 else [seed, 0, image_id, class_offset])


def _draw_and_save(job: _Job) -> _Drawn:
    spec = job.spec
    bird = render_bird(job.attributes, image_rng(spec.seed, job.image_id, spec.class_offset), spec.image_size,
                       spec.difficulty, spec.domain)
    # 4:4:4 chroma: the default 4:2:0 would smear the few-pixel colour patches that tell classes apart.
    Image.fromarray(bird.image).save(job.path, format="JPEG", quality=95, subsampling=0)
    return _Drawn(job.image_id, bird.bbox, bird.parts, bird.nuisance, bird.scale_px)


@dataclass
class GenerationReport:
    spec: SynthBirdsSpec
    num_images: int
    num_train: int
    seconds: float
    visible_part_fraction: float
    factor_area_fraction: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds


def generate(out_dir: str | os.PathLike, spec: SynthBirdsSpec, *, workers: int = 1,
             overwrite: bool = False) -> GenerationReport:
    """Write a synthbirds dataset to `out_dir` in the CUB_200_2011 layout.

    The files are written into a temporary folder beside `out_dir` and moved into place only when complete, so an
    interrupted run never leaves a half-written dataset behind.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        report = _write_dataset(staging, spec, workers)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    return report


def _write_dataset(root: Path, spec: SynthBirdsSpec, workers: int) -> GenerationReport:
    classes = class_attributes(spec.num_classes, spec.seed, spec.class_offset)
    # Numbered by the class's place in the walk, not in this tree: a class has one name in every draw of the seed.
    folders = [f"{spec.class_offset + c + 1:03d}.{class_name(attrs)}" for c, attrs in enumerate(classes)]
    jobs, labels, is_train = [], [], []
    for c, folder in enumerate(folders):
        (root / "images" / folder).mkdir(parents=True)
        n_train = min(spec.images_per_class - 1, max(1, round(spec.train_fraction * spec.images_per_class)))
        train_slots = set(np.random.default_rng([spec.seed, 2, c]).permutation(spec.images_per_class)[:n_train])
        for k in range(spec.images_per_class):
            image_id = c * spec.images_per_class + k + 1
            path = root / "images" / folder / f"{folder[4:]}_{image_id:05d}.jpg"
            jobs.append(_Job(image_id, classes[c], path, spec))
            labels.append(c + 1)
            is_train.append(k in train_slots)

    bar = progress_bar(len(jobs), "drawing synthbirds", unit="img")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            drawn = [_advanced(bar, d) for d in pool.imap(_draw_and_save, jobs, chunksize=16)]
    else:
        drawn = [_advanced(bar, _draw_and_save(job)) for job in jobs]
    if bar is not None:
        bar.close()

    _write_lines(root / "classes.txt", (f"{c + 1} {folder}" for c, folder in enumerate(folders)))
    _write_lines(root / "images.txt", (f"{j.image_id} {j.path.relative_to(root / 'images').as_posix()}" for j in jobs))
    _write_lines(root / "image_class_labels.txt",
                 (f"{j.image_id} {label}" for j, label in zip(jobs, labels, strict=True)))
    _write_lines(root / "train_test_split.txt", (f"{j.image_id} {int(t)}" for j, t in zip(jobs, is_train, strict=True)))
    _write_lines(root / "bounding_boxes.txt",
                 (f"{d.image_id} " + " ".join(f"{v:.1f}" for v in to_xywh(d.bbox)) for d in drawn))
    (root / "parts").mkdir()
    _write_lines(root / "parts" / "parts.txt", (f"{i + 1} {name}" for i, name in enumerate(CUB_PART_NAMES)))
    _write_lines(root / "parts" / "part_locs.txt", (
        f"{d.image_id} {p + 1} {x:.1f} {y:.1f} {int(v)}" for d in drawn for p, (x, y, v) in enumerate(d.parts)))
    _write_attributes(root / "attributes", jobs, drawn)
    report = GenerationReport(
        spec=spec,
        num_images=len(jobs),
        num_train=sum(is_train),
        seconds=0.0,
        visible_part_fraction=float(np.mean([d.parts[:, 2].mean() for d in drawn])),
        factor_area_fraction={
            factor: float(np.mean([area * (d.scale_px / spec.image_size) ** 2 for d in drawn]))
            for factor, area in FACTOR_REGION_AREA.items()
        },
    )
    metadata = {"generator": "synthbirds", "version": GENERATOR_VERSION, "spec": spec.identity(),
                "classes": [{"name": f, **a} for f, a in zip(folders, classes, strict=True)],
                "factor_area_fraction": report.factor_area_fraction}
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return report


def _advanced(bar, item):
    if bar is not None:
        bar.update()
    return item


def discriminative_part_indices(root: str | os.PathLike, annotations: CUBAnnotations) -> list[list[int]] | None:
    """discriminative_parts as indices into the tree's part list (what fgvc.engine.localization reads), or None."""
    by_class = discriminative_parts(root, annotations.classes)
    if by_class is None or annotations.part_names is None:
        return None
    index = {name: i for i, name in enumerate(annotations.part_names)}
    return [[index[name] for name in names] for names in by_class]


def discriminative_parts(root: str | os.PathLike, class_names: Sequence[str]) -> list[list[str]] | None:
    """Per class of `class_names` (classes.txt), the CUB part names that tell it from a class differing in one
    attribute only -- where a model must look to separate the pair. None when `root` is not a synthbirds tree or
    its classes are no longer the generated ones (an edited tree)."""
    metadata_file = Path(root) / METADATA_FILE
    if not metadata_file.is_file():
        return None
    generated = json.loads(metadata_file.read_text())["classes"]
    if [c["name"] for c in generated] != list(class_names):
        return None
    classes = [{factor: c[factor] for factor in CLASS_FACTORS} for c in generated]
    result = []
    for mine in classes:
        factors = {next(f for f in CLASS_FACTORS if other[f] != mine[f]) for other in classes
                   if sum(other[f] != mine[f] for f in CLASS_FACTORS) == 1}
        parts = [FACTOR_PART[f] for f in CLASS_FACTORS if f in factors]
        result.append([name for part in parts for name in (
            (part, "right " + part.removeprefix("left ")) if part.startswith("left ") else (part,))])
    return result


def attribute_names() -> list[str]:
    """The attribute vocabulary, in the order of attributes.txt."""
    factors = {**CLASS_FACTORS, **NUISANCE_FACTORS}
    return [f"{factor}::{value}" for factor, values in factors.items() for value in values]


def _write_attributes(folder: Path, jobs: list[_Job], drawn: list[_Drawn]) -> None:
    folder.mkdir()
    names = attribute_names()
    _write_lines(folder / "attributes.txt", (f"{i + 1} {name}" for i, name in enumerate(names)))
    _write_lines(folder / "certainties.txt", (f"{i + 1} {name}" for i, name in enumerate(CERTAINTIES)))
    part_index = {name: i for i, name in enumerate(CUB_PART_NAMES)}

    def lines():
        for job, d in zip(jobs, drawn, strict=True):
            truth = {**job.attributes, **d.nuisance}
            for a, name in enumerate(names):
                factor, value = name.split("::")
                part = FACTOR_PART[factor]
                if part.startswith("left "):  # sided parts: visible on whichever side faces the camera
                    visible = d.parts[part_index[part], 2] or d.parts[part_index["right " + part[5:]], 2]
                else:
                    visible = d.parts[part_index[part], 2]
                certainty = CERTAIN if visible else NOT_VISIBLE
                yield f"{d.image_id} {a + 1} {int(truth[factor] == value)} {certainty} 0.0"

    _write_lines(folder / "image_attribute_labels.txt", lines())


def _write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.data.synthbirds", description=__doc__.split("\n\n")[0])
    defaults = SynthBirdsSpec()
    parser.add_argument("--out", required=True, help="folder to create (the CUB_200_2011 root)")
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes)
    parser.add_argument("--images-per-class", type=int, default=defaults.images_per_class)
    parser.add_argument("--train-fraction", type=float, default=defaults.train_fraction)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--difficulty", type=float, default=defaults.difficulty, help="0 (easy) to 1 (hard)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--class-offset", type=int, default=defaults.class_offset,
                        help="skip the seed's first classes: classes [offset, offset + num-classes) of its walk")
    parser.add_argument("--domain", default=defaults.domain, help=f"rendering domain: {', '.join(DOMAINS)}")
    parser.add_argument("--workers", type=int, default=1, help="processes that draw images (output is identical)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    spec = SynthBirdsSpec(args.num_classes, args.images_per_class, args.train_fraction, args.image_size,
                          args.difficulty, args.seed, args.class_offset, args.domain)
    report = generate(args.out, spec, workers=args.workers, overwrite=args.overwrite)
    print(summarize(args.out, report))
    return 0


def summarize(root: str | os.PathLike, report: GenerationReport) -> str:
    """A short human-readable account of a generated dataset, read back through the CUB loader (which proves the
    files are a valid CUB tree)."""
    splits = {name: CUBDataset(root, split=name) for name in ("train", "val", "test")}
    first = splits["train"]
    areas = ", ".join(f"{k.removeprefix('has_')} {v:.1%}" for k, v in report.factor_area_fraction.items())
    return "\n".join([
        f"synthbirds -> {root}",
        f"  {report.num_images} images ({report.spec.image_size} px) of {len(first.classes)} classes in "
        f"{report.seconds:.1f} s ({report.images_per_second:.0f} images/s)",
        "  splits: " + ", ".join(f"{name} {len(ds)}" for name, ds in splits.items()),
        f"  parts: {len(first.part_names)} named as in CUB, {report.visible_part_fraction:.0%} visible; "
        f"attributes: {len(first.attribute_names)}",
        f"  image area of the part that tells classes apart: {areas}",
        f"  example classes: {', '.join(first.classes[:3])}",
    ])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
