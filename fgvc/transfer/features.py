"""Cached backbone features for the linear probe: the frozen backbone runs once over a split's (evaluation-transform,
un-augmented) images, and the head trains on what it gave at the speed of the head alone.

A cache keeps what the head's output depends on (Head.sufficient_features): a linear head's position average (C
numbers an image), the whole final map for heads that read positions (bilinear, isqrt). Batches come in the order
of the image loader -- a function of (seed, epoch) over the dataset's indices -- so a cached probe steps exactly as
an uncached one fed the same features would, and resumes mid-epoch the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fgvc.data.loader import EpochSampler, Shard, UnreadableImages
from fgvc.engine.loop import Runtime
from fgvc.errors import FGVCError
from fgvc.files import write_atomically
from fgvc.models import FGVCModel
from fgvc.models.model import FEATURES_KEY

CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class FeatureCacheError(FGVCError, ValueError):
    """A feature cache that cannot be made or read: too large for its memory budget, or a damaged file."""


@dataclass
class CachedFeatures:
    """One split's features (N x C x h x w, in the cache dtype) with each row's label and dataset index."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: torch.dtype) -> CachedFeatures:
        """No image's features (a rank whose shard of a small split is empty)."""
        return cls(torch.empty((0, *shape), dtype=dtype), torch.empty(0, dtype=torch.int64),
                   torch.empty(0, dtype=torch.int64))

    @classmethod
    def joined(cls, parts: list[CachedFeatures]) -> CachedFeatures:
        """One cache of every rank's shard, its rows in dataset-index order."""
        indices = torch.cat([part.indices for part in parts])
        order = indices.argsort()
        features, labels = torch.cat([part.features for part in parts]), torch.cat([part.labels for part in parts])
        return cls(features[order], labels[order], indices[order])

    def save(self, path: Path) -> None:
        """Whole or absent (a safetensors file: tensors only, nothing a load could execute)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, save({"features": self.features.contiguous(), "labels": self.labels,
                                     "indices": self.indices}))

    @classmethod
    def load(cls, path: Path, *, dtype: torch.dtype, shape: tuple[int, ...]) -> CachedFeatures:
        """A cache that save() wrote, checked to hold `dtype` features of `shape` an image."""
        try:
            tensors = load_file(path)
            cache = cls(tensors["features"], tensors["labels"], tensors["indices"])
        except (SafetensorError, KeyError, OSError) as error:
            raise FeatureCacheError(f"feature cache {path} is damaged ({error}); delete it to extract anew") from None
        if cache.features.dtype != dtype or tuple(cache.features.shape[1:]) != shape:
            raise FeatureCacheError(f"feature cache {path} holds {tuple(cache.features.shape[1:])} "
                                    f"{cache.features.dtype} features an image, not {shape} {dtype}; delete it to "
                                    "extract anew")
        return cache


def image_feature_shape(model: FGVCModel, image_size: int, runtime: Runtime) -> tuple[int, ...]:
    """The shape of one image's cached features, from a pass of one blank image."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), runtime.autocast():
        blank = runtime.images(torch.zeros(1, 3, image_size, image_size))
        shape = tuple(model.head.sufficient_features(model.forward_features(blank)).shape[1:])
    model.train(was_training)
    return shape


def check_budget(num_images: int, shape: tuple[int, ...], dtype: torch.dtype, max_gib: float, split: str) -> None:
    """Refuse a cache larger than `max_gib` before any image is read."""
    size = num_images * math.prod(shape) * dtype.itemsize
    if size <= max_gib * 2**30:
        return
    smaller = "transfer.cache_dtype=float16, " if dtype.itemsize > 2 else ""
    raise FeatureCacheError(
        f"the {split} feature cache would take {size / 2**20:.1f} MiB ({num_images} images x "
        f"{' x '.join(map(str, shape))} {str(dtype).removeprefix('torch.')}), more than transfer.cache_max_gib="
        f"{max_gib:g} GiB; raise it, or use {smaller}a linear head (one vector an image), a smaller data.image_size "
        "or transfer.cache_features=false")


@torch.no_grad()
def extract_features(model: FGVCModel, loader: Iterable[dict], runtime: Runtime, *, shape: tuple[int, ...],
                     dtype: torch.dtype = torch.float16) -> CachedFeatures:
    """The model's cached features (Head.sufficient_features of its backbone's output, in eval mode; `shape` an
    image) for every readable image of an evaluation loader, in its order; empty when it has none (a rank's shard
    may be)."""
    was_training = model.training
    model.eval()
    features, labels, indices = [], [], []
    for batch in loader:
        if not batch:  # every image of the batch was unreadable (the loader reported them)
            continue
        with runtime.autocast():
            maps = model.head.sufficient_features(model.forward_features(runtime.images(batch["image"])))
        features.append(maps.to("cpu", dtype).contiguous())
        labels.append(batch["label"].to(torch.int64))
        indices.append(batch["index"].to(torch.int64))
    model.train(was_training)
    if not features:
        return CachedFeatures.empty(shape, dtype)
    return CachedFeatures(torch.cat(features), torch.cat(labels), torch.cat(indices))


class FeatureLoader:
    """Batches of cached features, as a SplitLoader gives batches of images: {"features", "label", "index"}, the
    order of epoch e a function of (seed, e) over the dataset's indices (train: shuffled, the last incomplete batch
    dropped), set_epoch before each epoch. An image the cache lacks (unreadable when it was made) is left out of its
    batch, as the image loader leaves it out, so batches, steps and order are those of the image loader; a batch
    with nothing cached comes as {}. The features reach the device in float32."""

    def __init__(self, cache: CachedFeatures, *, dataset, unreadable: UnreadableImages, batch_size: int, seed: int,
                 train: bool, shard: Shard | None = None) -> None:
        self.cache, self.dataset, self.unreadable = cache, dataset, unreadable
        self.batch_size, self.drop_last = batch_size, train
        self.sampler = EpochSampler(len(dataset), seed=seed, shuffle=train,
                                    shard=dataclasses.replace(shard or Shard(), batch_size=batch_size), drop_last=train)
        self.rows = torch.full((len(dataset),), -1, dtype=torch.int64)  # dataset index -> cache row (-1: none)
        self.rows[cache.indices] = torch.arange(len(cache))

    @property
    def batches_per_epoch(self) -> int:
        count, size = len(self.dataset), self.sampler.global_batch
        return count // size if self.drop_last else -(-count // size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start=start_batch * self.sampler.global_batch)

    def __len__(self) -> int:
        remaining = len(self.sampler)
        return remaining // self.batch_size if self.drop_last else -(-remaining // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        rows = self.rows[torch.tensor([index for _, index in self.sampler], dtype=torch.int64)]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch_rows = rows[start : start + self.batch_size]
            batch_rows = batch_rows[batch_rows >= 0]
            if len(batch_rows) == 0:
                yield {}
                continue
            yield {FEATURES_KEY: self.cache.features[batch_rows].float(), "label": self.cache.labels[batch_rows],
                   "index": self.cache.indices[batch_rows]}
