"""Datasets, part-aware transforms and deterministic loaders."""

from fgvc.data.cub import CUBDataset
from fgvc.registry import Registry

DATASETS = Registry("dataset")
DATASETS.register("cub200")(CUBDataset)


def build_dataset(name: str, **kwargs):
    """Build a dataset by its registered name, e.g. build_dataset("cub200", root=..., split="train")."""
    return DATASETS.build(name, **kwargs)
