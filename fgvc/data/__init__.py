"""Datasets, part-aware transforms and deterministic loaders.

Datasets are registered by name; each builder takes the data config and a split name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fgvc.config import DataConfig
from fgvc.data.cub import CUBAnnotations, CUBDataset
from fgvc.registry import Registry

if TYPE_CHECKING:
    from fgvc.data.synthbirds import SynthBirdsSpec

DATASETS = Registry("dataset")
DATA_ROOT_ENV = "FGVC_DATA_ROOT"


@DATASETS.register("cub200")
def cub200(cfg: DataConfig, split: str) -> CUBDataset:
    if cfg.root is None:
        raise ValueError("data.root (--data-dir) must point at CUB_200_2011 (or the folder that contains it)")
    return CUBDataset(cfg.root, split, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                      annotations=_cached_annotations(cfg.root))


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


def build_dataset(cfg: DataConfig, split: str) -> CUBDataset:
    return DATASETS.get(cfg.dataset)(cfg, split)


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
