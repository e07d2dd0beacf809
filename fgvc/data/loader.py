"""DataLoaders whose results depend on positions, not on hidden state.

The order of an epoch is a function of (seed, epoch); the augmentation of sample i in epoch e a function of
(seed, e, i). The sampler yields (epoch, index) keys, so every worker -- persistent or not -- knows the epoch
without reading a mutable dataset attribute. Batches are therefore the same with 0, 2 or 16 workers, and a run
can be resumed exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fgvc.data.transforms import PartAwareTransform


def derived_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (run seed, epoch, index, ...)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) for every index of the dataset, shuffled by (seed, epoch) when `shuffle`."""

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool) -> None:
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from position `start` of its order (a resumed run skips what it has seen)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside 0..{self.num_samples}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.order(epoch)[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class AugmentedDataset(Dataset):
    """A raw dataset seen through a PartAwareTransform, indexed by (epoch, index) keys from EpochSampler."""

    def __init__(self, dataset, transform: PartAwareTransform, *, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        return self.transform(self.dataset[index], derived_seed(self.seed, epoch, index))


def build_loader(dataset, transform: PartAwareTransform, *, batch_size: int, seed: int, train: bool,
                 workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `dataset` with position-derived order and augmentation.

    train=True shuffles and drops the last incomplete batch (stable batch statistics); evaluation keeps every
    sample in order. Call `loader.sampler.set_epoch(epoch)` before each epoch. len(loader) follows the sampler's
    start position; a full epoch has len(dataset) // batch_size batches in training.
    """
    sampler = EpochSampler(len(dataset), seed=seed, shuffle=train)
    return DataLoader(
        AugmentedDataset(dataset, transform, seed=seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=train,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        # The loader draws its workers' base seed from this generator instead of the global RNG, whose stream
        # must stay exactly as in an uninterrupted run when a run is resumed mid-epoch.
        generator=torch.Generator().manual_seed(seed),
    )
