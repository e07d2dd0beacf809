"""Datasets, part-aware transforms and deterministic loaders.

Datasets are registered by name (`fgvc.list_datasets()`); each builder takes the dataset's root folder, a split
name and keyword options named after the data.* config keys they correspond to (val_fraction, split_seed,
download, annotation_level, remove_banner; synthbirds takes its generation `spec`). Items are raw samples: a dict
with the decoded image (H x W x 3 uint8), label, index and, where the dataset has them, bbox (fgvc.boxes), parts
and attributes. A dataset also offers `classes`, `targets`, `part_names`, `image_path(i)` and, for the localization
metrics, `has_boxes` and `discriminative_parts` (per class, the indices of the parts that tell it apart, or None).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fgvc.data import aircraft, cars, generic
from fgvc.data.annotations import AnnotationError
from fgvc.data.cub import CUBAnnotations, CUBDataset, resolve_root
from fgvc.data.download import download_dataset
from fgvc.data.image_list import ImageListDataset, ImageTable
from fgvc.data.splits import check_split, split_rows
from fgvc.errors import OptionError
from fgvc.registry import Registry

if TYPE_CHECKING:
    from fgvc.data.synthbirds import SynthBirdsSpec

DATASETS = Registry("dataset")
DATA_ROOT_ENV = "FGVC_DATA_ROOT"
Dataset = CUBDataset | ImageListDataset | generic.ArrayDataset


@DATASETS.register("cub200")
def cub200(root: str | os.PathLike | None, split: str = "train", *, val_fraction: float = 0.1, split_seed: int = 0,
           download: bool = False) -> CUBDataset:
    root = _required_root(root, "CUB_200_2011 (or the folder that contains it)")
    check_split(split)
    if download:
        try:
            resolve_root(root)
        except AnnotationError:
            download_dataset("cub200", root)
    return CUBDataset(root, split, val_fraction=val_fraction, split_seed=split_seed,
                      annotations=_cached_annotations(root))


@DATASETS.register("cars196")
def cars196(root: str | os.PathLike | None, split: str = "train", *, val_fraction: float = 0.1,
            split_seed: int = 0, download: bool = False) -> ImageListDataset:
    if download:
        raise AnnotationError("Stanford Cars has no working download (the official URL is dead); "
                              + cars.EXPECTED_LAYOUTS)
    root = _required_root(root, "the Stanford Cars folder (or the folder that contains stanford_cars/)")
    return ImageListDataset(_cached_table(cars.load_cars, root), split, val_fraction=val_fraction,
                            split_seed=split_seed)


@DATASETS.register("aircraft100")
def aircraft100(root: str | os.PathLike | None, split: str = "train", *, annotation_level: str = "variant",
                remove_banner: bool = True, download: bool = False) -> ImageListDataset:
    """FGVC-Aircraft's own splits: there is no val_fraction, the official val split is used."""
    root = _required_root(root, "fgvc-aircraft-2013b (or the folder that contains it)")
    check_split(split)
    if download:
        try:
            aircraft.resolve_data_dir(root)
        except AnnotationError:
            download_dataset("aircraft100", root)
    table = _cached_table(aircraft.load_aircraft, root, split, level=annotation_level, remove_banner=remove_banner)
    return ImageListDataset(table, split)


@DATASETS.register("folder")
def image_folder(root: str | os.PathLike | None, split: str = "train", *, val_fraction: float = 0.1,
                 split_seed: int = 0) -> ImageListDataset:
    root = _required_root(root, "an ImageFolder tree: " + generic.FOLDER_LAYOUT)
    check_split(split)
    return ImageListDataset(_cached_table(generic.load_image_folder, root, split), split,
                            val_fraction=val_fraction, split_seed=split_seed)


@DATASETS.register("unlabeled")
def unlabeled_images(root: str | os.PathLike | None, split: str = "train") -> ImageListDataset:
    """Every image under root, at any depth, without labels: data for self-supervised pretraining
    (python -m fgvc.pretrain), whose train split (and trainval) is all of them; there is no val or test split."""
    root = _required_root(root, "a folder of images (at any depth)")
    check_split(split)
    if split not in ("train", "trainval"):
        raise AnnotationError(f"{root}: unlabeled images have no {split} split (only train, all of them)")
    return ImageListDataset(_cached_table(generic.load_unlabeled, root), split)


@DATASETS.register("imagenet")
def imagenet(root: str | os.PathLike | None, split: str = "train", *, val_fraction: float = 0.1,
             split_seed: int = 0) -> ImageListDataset:
    root = _required_root(root, "ILSVRC-2012 as torchvision's ImageNet stores it (meta.bin, train/, val/)")
    return ImageListDataset(_cached_table(generic.load_imagenet, root), split, val_fraction=val_fraction,
                            split_seed=split_seed)


def _torchvision_arrays(name: str) -> Callable[..., generic.ArrayDataset]:
    def build(root: str | os.PathLike | None, split: str = "train", *, val_fraction: float = 0.1,
              split_seed: int = 0) -> generic.ArrayDataset:
        root = _required_root(root, f"the folder torchvision's {name} dataset was stored in")
        images, labels, classes, is_train = _cached_table(generic.load_torchvision_arrays, name, root)
        return generic.ArrayDataset(images, labels, classes, split_rows(labels, is_train, split, val_fraction,
                                                                        split_seed))

    build.__doc__ = f"torchvision's {name}, read from where torchvision stored it (nothing is downloaded)."
    return build


for _name in ("mnist", "cifar10", "cifar100"):
    DATASETS.register(_name)(_torchvision_arrays(_name))


@DATASETS.register("synthbirds")
def synthbirds_dataset(root: str | os.PathLike | None = None, split: str = "train", *, val_fraction: float = 0.1,
                       split_seed: int = 0, spec: SynthBirdsSpec | None = None) -> CUBDataset:
    """synthbirds from `root`, or (root None) generated once into the cache folder named by `spec`. The dataset
    knows which parts tell each class from its one-attribute neighbours (discriminative_parts)."""
    from fgvc.data import synthbirds  # the generator, only when needed (see ensure_synthbirds)

    root = Path(root).expanduser() if root is not None else ensure_synthbirds(spec or synthbirds.SynthBirdsSpec())
    annotations = _cached_annotations(root)
    return CUBDataset(root, split, val_fraction=val_fraction, split_seed=split_seed, annotations=annotations,
                      discriminative_parts=synthbirds.discriminative_part_indices(root, annotations))


def _required_root(root: str | os.PathLike | None, what: str) -> Path:
    if root is None:
        raise OptionError("root", f"must point at {what}")
    return Path(root).expanduser()


@functools.lru_cache(maxsize=8)
def _cached_table(load: Callable, *args, **kwargs) -> ImageTable:
    """A loader's result once per process, not once per split (and its layout message once)."""
    return load(*args, **kwargs)


def data_root() -> Path:
    """Where generated data is cached: $FGVC_DATA_ROOT, else ~/.cache/fgvc."""
    return Path(os.environ.get(DATA_ROOT_ENV) or Path.home() / ".cache" / "fgvc").expanduser()


def ensure_synthbirds(spec: SynthBirdsSpec, echo: Callable[[str], None] = print) -> Path:
    """The cached synthbirds tree for `spec`, generated first if absent. The folder name is a digest of the spec and
    the generator version, so a changed spec or generator never reuses stale images."""
    # Imported here, not at the top: `python -m fgvc.data.synthbirds` must not find itself already imported.
    from fgvc.data import synthbirds

    key = json.dumps({"version": synthbirds.GENERATOR_VERSION, **spec.identity()}, sort_keys=True)
    root = data_root() / f"synthbirds-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (root / synthbirds.METADATA_FILE).is_file():
        echo(f"generating synthbirds into {root} ({spec.num_classes} classes x {spec.images_per_class} images, "
             f"{spec.image_size} px) ...")
        # Every core draws (the output is byte-identical whatever the number of processes), but a worker costs about
        # 3 s to start, so small trees are drawn by this process alone.
        workers = max(1, min(os.cpu_count() or 1, spec.num_classes * spec.images_per_class // 1000))
        report = synthbirds.generate(root, spec, workers=workers, overwrite=root.exists())
        echo(f"  {report.num_images} images in {report.seconds:.1f} s")
    return root


_ANNOTATIONS: dict[tuple, CUBAnnotations] = {}


def _cached_annotations(root: str | os.PathLike) -> CUBAnnotations:
    """Read a tree's annotation files once per process, not once per split; an edited file is read again."""
    resolved = Path(root).resolve()
    files = sorted([*resolved.glob("*.txt"), *resolved.glob("parts/*.txt"), *resolved.glob("attributes/*.txt")])
    stamps = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    key = (resolved, stamps)
    if key not in _ANNOTATIONS:
        _ANNOTATIONS[key] = CUBAnnotations.load(resolved)
    return _ANNOTATIONS[key]
