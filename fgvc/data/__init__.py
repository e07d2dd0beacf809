"""Datasets, part-aware transforms and deterministic loaders.

Datasets are registered by name; each builder takes the data config and a split name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fgvc.config import DataConfig
from fgvc.data import aircraft, cars, generic
from fgvc.data.annotations import AnnotationError
from fgvc.data.cub import SPLITS, CUBAnnotations, CUBDataset, resolve_root, split_rows
from fgvc.data.download import download_dataset
from fgvc.data.image_list import ImageListDataset, ImageTable
from fgvc.registry import Registry

if TYPE_CHECKING:
    from fgvc.data.synthbirds import SynthBirdsSpec

DATASETS = Registry("dataset")
DATA_ROOT_ENV = "FGVC_DATA_ROOT"


@DATASETS.register("cub200")
def cub200(cfg: DataConfig, split: str) -> CUBDataset:
    root = _required_root(cfg, "CUB_200_2011 (or the folder that contains it)")
    if cfg.download:
        try:
            resolve_root(root)
        except AnnotationError:
            download_dataset("cub200", root)
    return CUBDataset(root, split, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                      annotations=_cached_annotations(root))


@DATASETS.register("cars196")
def cars196(cfg: DataConfig, split: str) -> ImageListDataset:
    if cfg.download:
        raise AnnotationError("Stanford Cars has no working download (the official URL is dead); "
                              + cars.EXPECTED_LAYOUTS)
    root = _required_root(cfg, "the Stanford Cars folder (or the folder that contains stanford_cars/)")
    return ImageListDataset(_cached_table(cars.load_cars, root), split, val_fraction=cfg.val_fraction,
                            split_seed=cfg.split_seed)


@DATASETS.register("aircraft100")
def aircraft100(cfg: DataConfig, split: str) -> ImageListDataset:
    """FGVC-Aircraft's own splits: data.val_fraction does not apply, the official val split is used."""
    root = _required_root(cfg, "fgvc-aircraft-2013b (or the folder that contains it)")
    if cfg.download:
        try:
            aircraft.resolve_data_dir(root)
        except AnnotationError:
            download_dataset("aircraft100", root)
    table = _cached_table(aircraft.load_aircraft, root, split, level=cfg.annotation_level,
                          remove_banner=cfg.remove_banner)
    return ImageListDataset(table, split)


@DATASETS.register("folder")
def image_folder(cfg: DataConfig, split: str) -> ImageListDataset:
    root = _required_root(cfg, "an ImageFolder tree: " + generic.FOLDER_LAYOUT)
    return ImageListDataset(_cached_table(generic.load_image_folder, root, split), split,
                            val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)


@DATASETS.register("imagenet")
def imagenet(cfg: DataConfig, split: str) -> ImageListDataset:
    root = _required_root(cfg, "ILSVRC-2012 as torchvision's ImageNet stores it (meta.bin, train/, val/)")
    return ImageListDataset(_cached_table(generic.load_imagenet, root), split, val_fraction=cfg.val_fraction,
                            split_seed=cfg.split_seed)


def _torchvision_arrays(name: str) -> Callable[[DataConfig, str], generic.ArrayDataset]:
    def build(cfg: DataConfig, split: str) -> generic.ArrayDataset:
        root = _required_root(cfg, f"the folder torchvision's {name} dataset was stored in")
        images, labels, classes, is_train = _cached_table(generic.load_torchvision_arrays, name, root)
        rows = split_rows(labels, is_train, split, cfg.val_fraction, cfg.split_seed)
        return generic.ArrayDataset(images, labels, classes, rows)

    return build


for _name in ("mnist", "cifar10", "cifar100"):
    DATASETS.register(_name)(_torchvision_arrays(_name))


@DATASETS.register("synthbirds")
def synthbirds_dataset(cfg: DataConfig, split: str) -> CUBDataset:
    """synthbirds from data.root, or generated once into the cache folder named by its spec."""
    if cfg.root is not None:
        root = Path(cfg.root)
    else:
        from fgvc.data.synthbirds import SynthBirdsSpec

        root = ensure_synthbirds(SynthBirdsSpec(**asdict(cfg.synthbirds)))
    return CUBDataset(root, split, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                      annotations=_cached_annotations(root))


def build_dataset(cfg: DataConfig, split: str) -> CUBDataset | ImageListDataset | generic.ArrayDataset:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return DATASETS.get(cfg.dataset)(cfg, split)


def _required_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise ValueError(f"data.root (--data-dir) must point at {what}")
    return Path(cfg.root).expanduser()


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

    key = json.dumps({"version": synthbirds.GENERATOR_VERSION, **asdict(spec)}, sort_keys=True)
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
