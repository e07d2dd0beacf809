"""The views self-supervised methods compare: each method's published augmentation recipe, one per view, and the
FGVC option of drawing every crop inside the object box.

    transform = MultiViewTransform(method_views("byol"), 96, views_in_box=True)
    transform(sample, seed)  ->  {"views": [3 x 96 x 96, 3 x 96 x 96], "index": i}    (no label: it is never read)

A view is a random resized crop, a flip, colour jitter (at p 0.8), greyscale (0.2), Gaussian blur and, where the
method uses it, solarization; the strengths are the papers' (SimCLR: s = 1 jitter and blur at p 0.5; MoCo v2 and
SimSiam: crops from 20% of the image, jitter 0.4/0.4/0.4/0.1; BYOL: asymmetric blur 1.0/0.1 and solarization
0/0.2). With views_in_box the crop is drawn from the object's box instead of the whole image (CUB, Cars, Aircraft
and synthbirds have boxes): a crop of background teaches nothing about the bird.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import albumentations as A
import numpy as np
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


IMAGENET = Preprocessing()  # ImageNet's statistics, bilinear: a network trained from scratch
MOCO_VIEW = ViewRecipe(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1))
RECIPES: dict[str, tuple[ViewRecipe, ViewRecipe]] = {
    "simclr": (ViewRecipe(), ViewRecipe()),
    "moco": (MOCO_VIEW, MOCO_VIEW),
    "simsiam": (MOCO_VIEW, MOCO_VIEW),
    "byol": (ViewRecipe(jitter=(0.4, 0.4, 0.2, 0.1), blur=1.0),
             ViewRecipe(jitter=(0.4, 0.4, 0.2, 0.1), blur=0.1, solarize=0.2)),
}


def method_views(method: str, *, crop_scale: tuple[float, float] | None = None, hue: float | None = None,
                 grayscale: float | None = None) -> tuple[ViewRecipe, ...]:
    """The method's two view recipes, with the given values in place of the published ones (None keeps them):
    `hue` 0 and `grayscale` 0 keep colours, which in fine-grained data are often the class."""
    if method not in RECIPES:
        raise OptionError("method", f"{method!r} has no view recipe; known: {', '.join(RECIPES)}")
    changes = {}
    if crop_scale is not None:
        changes["crop_scale"] = tuple(crop_scale)
    if grayscale is not None:
        changes["grayscale"] = grayscale
    views = []
    for recipe in RECIPES[method]:
        if hue is not None:
            recipe = dataclasses.replace(recipe, jitter=(*recipe.jitter[:3], hue))
        views.append(dataclasses.replace(recipe, **changes))
    return tuple(views)


def view_transform(recipe: ViewRecipe, size: int, preprocessing: Preprocessing = IMAGENET) -> A.Compose:
    """The Albumentations pipeline of one view at `size` px. The blur kernel is 10% of the view's side (odd), sigma
    in [0.1, 2], as SimCLR's."""
    kernel = max(3, 2 * math.floor(0.1 * size / 2) + 1)
    brightness, contrast, saturation, hue = recipe.jitter
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=recipe.crop_scale, ratio=(3 / 4, 4 / 3),
                            interpolation=INTERPOLATIONS[preprocessing.interpolation]),
        A.HorizontalFlip(p=recipe.hflip),
        A.ColorJitter(brightness, contrast, saturation, hue, p=recipe.jitter_prob),
        A.ToGray(p=recipe.grayscale),
        A.GaussianBlur(blur_limit=(kernel, kernel), sigma_limit=(0.1, 2.0), p=recipe.blur),
        A.Solarize(threshold_range=(0.5, 0.5), p=recipe.solarize),
        A.Normalize(mean=preprocessing.mean, std=preprocessing.std),
        ToTensorV2(),
    ])


def box_region(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The pixels of `image` that the box (x0, y0, x1, y1 in pixel edges, fgvc.boxes) covers, at least one."""
    height, width = image.shape[:2]
    x0 = min(max(math.floor(box[0]), 0), width - 1)
    y0 = min(max(math.floor(box[1]), 0), height - 1)
    x1 = min(max(math.ceil(box[2]), x0 + 1), width)
    y1 = min(max(math.ceil(box[3]), y0 + 1), height)
    return image[y0:y1, x0:x1]


class MultiViewTransform:
    """A raw sample (fgvc.data) -> {"views": one tensor per recipe, "index"}; the label is dropped, so pretraining
    never reads it. Each view's randomness is fixed by (seed, its position). views_in_box: crops come from the
    object box (a sample without one is an error: the dataset must have boxes)."""

    def __init__(self, recipes: tuple[ViewRecipe, ...], size: int, *, views_in_box: bool = False,
                 preprocessing: Preprocessing = IMAGENET) -> None:
        self.composes = [view_transform(recipe, size, preprocessing) for recipe in recipes]
        self.views_in_box = views_in_box

    def __call__(self, sample: dict, seed: int) -> dict:
        image = sample["image"]
        if self.views_in_box:
            if "bbox" not in sample:
                raise OptionError("views_in_box", f"sample {sample['index']} has no object box")
            image = box_region(image, np.asarray(sample["bbox"]))
        views = []
        for position, compose in enumerate(self.composes):
            compose.set_random_seed(derived_seed(seed, position))
            views.append(compose(image=image)["image"])
        return {"views": views, "index": sample["index"]}
