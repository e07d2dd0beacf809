"""The views self-supervised methods compare: each method's published augmentation recipe, one per view, and the
FGVC option of drawing every crop inside the object box.

    transform = MultiViewTransform(method_views("byol"), 96, views_in_box=True)
    transform(sample, seed)  ->  {"views": [3 x 96 x 96, 3 x 96 x 96], "index": i}    (no label: it is never read)

    transform = MultiViewTransform(method_views("dino"), 224, local=LocalCrops(LOCAL_VIEW, 96, 8, on_parts=True))
    transform(sample, seed)  ->  {"views": [2 global 3 x 224 x 224, then 8 local 3 x 96 x 96], "index": i}

A view is a random resized crop, a flip, colour jitter (at p 0.8), greyscale (0.2), Gaussian blur and, where the
method uses it, solarization; the strengths are the papers' (SimCLR: s = 1 jitter and blur at p 0.5; MoCo v2 and
SimSiam: crops from 20% of the image, jitter 0.4/0.4/0.4/0.1; BYOL: asymmetric blur 1.0/0.1 and solarization
0/0.2; DINO's global crops: the same, from 40% of the image; MAE: a crop and a flip only). With views_in_box the
crop is drawn from the object's box instead of the whole image (CUB, Cars, Aircraft and synthbirds have boxes): a
crop of background teaches nothing about the bird.

Multi-crop (DINO) adds local crops: small crops (5-40% of the image) at their own smaller size. With `on_parts`
each local crop is centred on one of the sample's visible part keypoints (CUB's and synthbirds' 15), jittered by
up to `part_jitter` x the crop's side and always containing the part, so the student must match a beak or a wing
to the whole bird; a sample with no visible part gets random local crops.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from fgvc.data.loader import derived_seed
from fgvc.data.transforms import INTERPOLATIONS, Preprocessing
from fgvc.errors import OptionError


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation: crop scale range, flip chance, colour jitter (brightness, contrast, saturation, hue
    as torchvision's ColorJitter takes them) at `jitter_prob`, greyscale, blur and solarize chances."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_prob: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.5
    solarize: float = 0.0


RATIOS = (3 / 4, 4 / 3)  # the aspect ratios of random resized crops
IMAGENET = Preprocessing()  # ImageNet's statistics, bilinear: a network trained from scratch
MOCO_VIEW = ViewRecipe(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1))
DINO_VIEW = ViewRecipe(crop_scale=(0.4, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
LOCAL_VIEW = dataclasses.replace(DINO_VIEW, crop_scale=(0.05, 0.4))  # DINO's local crops: blur at p 0.5
RECIPES: dict[str, tuple[ViewRecipe, ...]] = {
    "simclr": (ViewRecipe(), ViewRecipe()),
    "moco": (MOCO_VIEW, MOCO_VIEW),
    "simsiam": (MOCO_VIEW, MOCO_VIEW),
    "byol": (ViewRecipe(jitter=(0.4, 0.4, 0.2, 0.1), blur=1.0),
             ViewRecipe(jitter=(0.4, 0.4, 0.2, 0.1), blur=0.1, solarize=0.2)),
    "dino": (dataclasses.replace(DINO_VIEW, blur=1.0), dataclasses.replace(DINO_VIEW, blur=0.1, solarize=0.2)),
    "mae": (ViewRecipe(crop_scale=(0.2, 1.0), jitter_prob=0.0, grayscale=0.0, blur=0.0),),
}


def method_views(method: str, *, crop_scale: tuple[float, float] | None = None, hue: float | None = None,
                 grayscale: float | None = None) -> tuple[ViewRecipe, ...]:
    """The method's view recipes (DINO's: its two global crops), with the given values in place of the published
    ones (None keeps them): `hue` 0 and `grayscale` 0 keep colours, which in fine-grained data are often the
    class."""
    if method not in RECIPES:
        raise OptionError("method", f"{method!r} has no view recipe; known: {', '.join(RECIPES)}")
    return tuple(adjusted(recipe, crop_scale=crop_scale, hue=hue, grayscale=grayscale) for recipe in RECIPES[method])


def adjusted(recipe: ViewRecipe, *, crop_scale: tuple[float, float] | None = None, hue: float | None = None,
             grayscale: float | None = None) -> ViewRecipe:
    """`recipe` with the values given in place of its own (None keeps them)."""
    changes: dict = {}
    if crop_scale is not None:
        changes["crop_scale"] = tuple(crop_scale)
    if hue is not None:
        changes["jitter"] = (*recipe.jitter[:3], hue)
    if grayscale is not None:
        changes["grayscale"] = grayscale
    return dataclasses.replace(recipe, **changes)


def view_transform(recipe: ViewRecipe, size: int, preprocessing: Preprocessing = IMAGENET, *,
                   crop: bool = True) -> A.Compose:
    """The Albumentations pipeline of one view at `size` px (crop False: the image is already cropped, and is
    resized). The blur kernel is 10% of the view's side (odd), sigma in [0.1, 2], as SimCLR's."""
    kernel = max(3, 2 * math.floor(0.1 * size / 2) + 1)
    brightness, contrast, saturation, hue = recipe.jitter
    interpolation = INTERPOLATIONS[preprocessing.interpolation]
    resize = (A.RandomResizedCrop(size=(size, size), scale=recipe.crop_scale, ratio=RATIOS, interpolation=interpolation)
              if crop else A.Resize(size, size, interpolation=interpolation))
    return A.Compose([
        resize,
        A.HorizontalFlip(p=recipe.hflip),
        A.ColorJitter(brightness, contrast, saturation, hue, p=recipe.jitter_prob),
        A.ToGray(p=recipe.grayscale),
        A.GaussianBlur(blur_limit=(kernel, kernel), sigma_limit=(0.1, 2.0), p=recipe.blur),
        A.Solarize(threshold_range=(0.5, 0.5), p=recipe.solarize),
        A.Normalize(mean=preprocessing.mean, std=preprocessing.std),
        ToTensorV2(),
    ])


def box_pixels(shape: tuple[int, int], box: np.ndarray) -> tuple[int, int, int, int]:
    """The whole pixels (x0, y0, x1, y1; x1 and y1 exclusive) of an image of `shape` (H, W) that `box` (pixel
    edges, fgvc.boxes) covers, at least one."""
    height, width = shape
    x0 = min(max(math.floor(box[0]), 0), width - 1)
    y0 = min(max(math.floor(box[1]), 0), height - 1)
    x1 = min(max(math.ceil(box[2]), x0 + 1), width)
    y1 = min(max(math.ceil(box[3]), y0 + 1), height)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class LocalCrops:
    """Multi-crop's local crops: `count` crops of the `recipe` (its crop_scale: of the image's area) at `size` px;
    `on_parts`: centred on visible part keypoints, moved by up to `part_jitter` x the crop's side (below 0.5, so
    the part stays inside)."""

    recipe: ViewRecipe
    size: int
    count: int
    on_parts: bool = False
    part_jitter: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.part_jitter < 0.5:
            raise OptionError("part_jitter", f"{self.part_jitter} is not in [0, 0.5): a crop centred further from its "
                                             "part than half its side could miss it")


def part_crop_box(shape: tuple[int, int], parts: np.ndarray, scale: tuple[float, float], jitter: float,
                  rng: np.random.Generator) -> tuple[tuple[int, int, int, int], int] | None:
    """A crop box (x0, y0, x1, y1 in whole pixels, x1 and y1 exclusive) on an image of `shape` (H, W), centred on
    a visible part chosen at random among `parts` (P x 3: x, y, visible) and jittered, with the area of a random
    resized crop (`scale` of the image's, aspect ratio 3/4 to 4/3); the part's pixel always lies inside it. Returns
    (box, the part's index), or None when no part is visible in the image."""
    height, width = shape
    parts = np.asarray(parts, dtype=np.float64).reshape(-1, 3)
    visible = np.flatnonzero((parts[:, 2] > 0) & (parts[:, 0] >= 0) & (parts[:, 0] < width)
                             & (parts[:, 1] >= 0) & (parts[:, 1] < height))
    if len(visible) == 0:
        return None
    part = int(rng.choice(visible))
    area = rng.uniform(*scale) * height * width
    ratio = math.exp(rng.uniform(math.log(RATIOS[0]), math.log(RATIOS[1])))
    sides = (min(width, max(1, round(math.sqrt(area * ratio)))), min(height, max(1, round(math.sqrt(area / ratio)))))
    box = []
    for axis, (side, limit) in enumerate(zip(sides, (width, height), strict=True)):
        pixel = math.floor(parts[part, axis])
        start = round(parts[part, axis] + rng.uniform(-jitter, jitter) * side - side / 2)
        box.append(min(max(start, pixel - side + 1, 0), pixel, limit - side))  # inside the image, the part inside
    return (box[0], box[1], box[0] + sides[0], box[1] + sides[1]), part


class MultiViewTransform:
    """A raw sample (fgvc.data) -> {"views": one tensor per recipe, then the local crops, "index"}; the label is
    dropped, so pretraining never reads it. Each view's randomness is fixed by (seed, its position). views_in_box:
    crops come from the object box (a sample without one is an error: the dataset must have boxes). local: DINO's
    local crops (on parts: a sample without part keypoints is an error)."""

    def __init__(self, recipes: tuple[ViewRecipe, ...], size: int, *, local: LocalCrops | None = None,
                 views_in_box: bool = False, preprocessing: Preprocessing = IMAGENET) -> None:
        self.composes = [view_transform(recipe, size, preprocessing) for recipe in recipes]
        self.local = local
        if local is not None:
            self.local_compose = view_transform(local.recipe, local.size, preprocessing)
            self.part_compose = view_transform(local.recipe, local.size, preprocessing, crop=False)
        self.views_in_box = views_in_box

    def __call__(self, sample: dict, seed: int) -> dict:
        image, parts = sample["image"], sample.get("parts")
        if self.views_in_box:
            if "bbox" not in sample:
                raise OptionError("views_in_box", f"sample {sample['index']} has no object box")
            x0, y0, x1, y1 = box_pixels(image.shape[:2], np.asarray(sample["bbox"]))
            image = image[y0:y1, x0:x1]
            if parts is not None:  # in the box's pixels (part_crop_box takes only those inside)
                parts = np.asarray(parts, dtype=np.float64) - np.array([x0, y0, 0.0])
        views = []
        for position, compose in enumerate(self.composes):
            compose.set_random_seed(derived_seed(seed, position))
            views.append(compose(image=image)["image"])
        if self.local is not None:
            views += [self.local_crop(image, parts, sample["index"], derived_seed(seed, position))
                      for position in range(len(views), len(views) + self.local.count)]
        return {"views": views, "index": sample["index"]}

    def local_crop(self, image: np.ndarray, parts: np.ndarray | None, index: int, seed: int) -> torch.Tensor:
        """One local crop: on a visible part when asked and there is one, else a random resized crop."""
        if self.local.on_parts:
            if parts is None:
                raise OptionError("local_crops_on_parts", f"sample {index} has no part keypoints")
            found = part_crop_box(image.shape[:2], parts, self.local.recipe.crop_scale, self.local.part_jitter,
                                  np.random.default_rng(seed))
            if found is not None:
                (x0, y0, x1, y1), _ = found
                self.part_compose.set_random_seed(seed)
                return self.part_compose(image=image[y0:y1, x0:x1])["image"]
        self.local_compose.set_random_seed(seed)
        return self.local_compose(image=image)["image"]
