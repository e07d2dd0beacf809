"""The Python API, in timm's style: `import fgvc`, then

    model = fgvc.create_model("isqrt", backbone="resnet50", num_classes=200, pretrained=True)
    fgvc.list_heads(); fgvc.list_datasets()
    train_set = fgvc.create_dataset("cub200", "~/data/CUB_200_2011", "train")      # dict samples
    result = fgvc.train(fgvc.load_config("cub200/isqrt_resnet50", ["optim.lr=0.01"]))
    trained = fgvc.load_model(result.run_dir / "best.pt")    # eval mode, class names, its evaluation transform

Each function is a thin door into the build layer (fgvc.build), so the API, the recipes and the command line build
exactly the same objects. `fgvc.train(config)` is the module behind `python -m fgvc.train`, which is callable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from fgvc import build, config
from fgvc.data import DATASETS, Dataset
from fgvc.models import HEADS, FGVCModel


def create_model(head: str, backbone: str = "resnet50", *, num_classes: int, pretrained: bool = False,
                 pretrained_file: str | os.PathLike | None = None, image_size: int | None = None,
                 **options: Any) -> FGVCModel:
    """A timm backbone with an fgvc head (`list_heads()`), in training mode, as a run would build it.

    pretrained: ImageNet (or the tag's) weights from the timm / Hugging Face hub; pretrained_file: the same from a
    local file, offline. image_size: the input size, for backbones built for one (ViTs). options: any other model.*
    config key, e.g. output_stride=16, head_dim=64, drop_rate=0.2, num_attention_maps=16,
    wsdan={"crop_threshold": [0.4, 0.6]}, backbone_args={"stem_width": 8}.
    """
    settings = {"head": head, "backbone": backbone, "pretrained": pretrained,
                "pretrained_file": None if pretrained_file is None else str(pretrained_file), **options}
    model = config.model_config(settings, "fgvc.create_model")
    return build.build_model(model, num_classes, image_size=image_size)


def list_heads() -> list[str]:
    """The registered head names (model.head): linear, bilinear, isqrt, wsdan, ..."""
    return HEADS.list()


def list_datasets() -> list[str]:
    """The registered dataset names (data.dataset): cub200, cars196, aircraft100, synthbirds, folder, ..."""
    return DATASETS.list()


def create_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", **options: Any) -> Dataset:
    """One split ("train", "val", "trainval", "test") of a registered dataset read from `root` (synthbirds without
    a root is generated once into the cache). Items are raw samples: dicts with the decoded RGB image (H x W x 3
    uint8), label, index and, where the dataset has them, bbox (x0, y0, x1, y1), parts and attributes. options:
    the dataset's own (val_fraction, split_seed, download, annotation_level, remove_banner; synthbirds: spec)."""
    return DATASETS.get(name)(root, split, **options)


def load_model(checkpoint: str | os.PathLike, device: str = "auto") -> build.LoadedModel:
    """A run's checkpoint as trained: `.model` in eval mode, `.classes`, `.transform()` (its evaluation
    preprocessing), `.predict(image)` and `.config`."""
    return build.load_model(checkpoint, device=device)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> config.Config:
    """A run's config: the schema defaults (path None) or a recipe (a file, or a name under configs/ such as
    "synthbirds/quickstart"), with `key=value` overrides on top."""
    return config.load_config(path, overrides)


__all__ = ["create_dataset", "create_model", "list_datasets", "list_heads", "load_config", "load_model"]
