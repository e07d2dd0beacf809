"""DataLoaders whose results depend on positions, not on hidden state.

The order of an epoch is a function of (seed, epoch); the augmentation of sample i in epoch e a function of
(seed, e, i). The sampler yields (epoch, index) keys, so every worker -- persistent or not -- knows the epoch
without reading a mutable dataset attribute. Batches are therefore the same with 0, 2 or 16 workers, and a run
can be resumed exactly.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fgvc.data.images import ImageReadError
from fgvc.data.transforms import PartAwareTransform
from fgvc.errors import FGVCError, OptionError

UNREADABLE = "unreadable"  # the batch key listing the (path, reason) of samples left out of the batch


def derived_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (run seed, epoch, index, ...)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Shard:
    """This process's part of each global batch under torchrun: a global batch of `batch_size` x `world_size`
    consecutive positions of the epoch's order is cut into `world_size` consecutive slices of `batch_size`, rank r
    taking the r-th. One process (the default) takes everything; `batch_size` is then immaterial."""

    rank: int = 0
    world_size: int = 1
    batch_size: int = 1  # per rank

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def taken(self, positions: np.ndarray) -> np.ndarray:
        """The positions (of an epoch's order) this rank takes."""
        if self.world_size == 1:
            return positions
        return positions[(positions % self.global_batch) // self.batch_size == self.rank]


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) for every index of the dataset, shuffled by (seed, epoch) when `shuffle`; under
    torchrun only this rank's `shard` of it, every rank a disjoint part of the same order. `drop_last` leaves out
    the last incomplete global batch, so that every rank has the same number of batches."""

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool, shard: Shard = Shard(),
                 drop_last: bool = False) -> None:
        self.num_samples, self.seed, self.shuffle, self.shard = num_samples, seed, shuffle, shard
        self.end = num_samples - num_samples % shard.global_batch if drop_last else num_samples
        self.epoch, self.start = 0, 0

    @property
    def global_batch(self) -> int:
        return self.shard.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from position `start` of its order (a resumed run skips what it has seen, whatever
        the world size it had)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside 0..{self.num_samples}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def positions(self) -> np.ndarray:
        """The positions of the epoch's order this rank takes, from `start` on."""
        return self.shard.taken(np.arange(self.start, max(self.start, self.end)))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, order = self.epoch, self.order(self.epoch)
        return ((epoch, order[position]) for position in self.positions().tolist())

    def __len__(self) -> int:
        return len(self.positions())


class AugmentedDataset(Dataset):
    """A raw dataset seen through a PartAwareTransform, indexed by (epoch, index) keys from EpochSampler."""

    def __init__(self, dataset, transform: PartAwareTransform, *, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict | UnreadableImage:
        epoch, index = key
        try:
            sample = self.dataset[index]
        except ImageReadError as error:
            return UnreadableImage(error.path, error.reason)
        return self.transform(sample, derived_seed(self.seed, epoch, index))


@dataclass(frozen=True)
class UnreadableImage:
    """Stands in for a sample whose image could not be decoded; collate leaves it out of the batch (never
    substituting another sample) and lists it under batch["unreadable"]."""

    path: str
    reason: str


def collate_readable(samples: list[dict | UnreadableImage]) -> dict:
    """default_collate over the readable samples; unreadable ones are listed under UNREADABLE. A batch of nothing
    but unreadable images has only that key."""
    readable = [sample for sample in samples if not isinstance(sample, UnreadableImage)]
    batch = default_collate(readable) if readable else {}
    if len(readable) < len(samples):
        batch[UNREADABLE] = [(s.path, s.reason) for s in samples if isinstance(s, UnreadableImage)]
    return batch


class TooManyUnreadableImages(FGVCError, RuntimeError):
    """More unreadable images in a split than data.max_bad_fraction allows; the message names the latest one."""


class UnreadableImages:
    """The distinct unreadable images met in one split: each is reported once, and the run stops when they exceed
    `max_fraction` of the split."""

    def __init__(self, split: str, num_images: int, max_fraction: float,
                 echo: Callable[[str], None] = print) -> None:
        if not 0 <= max_fraction <= 1:
            raise OptionError("max_bad_fraction", f"must be in [0, 1], got {max_fraction}")
        self.split, self.echo = split, echo
        self.allowed = math.floor(max_fraction * num_images)
        self.num_images = num_images
        self.reasons: dict[str, str] = {}

    def add(self, reports: Iterable[tuple[str, str]]) -> None:
        for path, reason in reports:
            if path in self.reasons:
                continue
            self.reasons[path] = reason
            self.echo(f"left out of its batch, unreadable {self.split} image {path}: {reason} "
                      f"({len(self.reasons)} so far, at most {self.allowed} allowed by data.max_bad_fraction)")
            self.check_total(len(self.reasons), f"; the latest: {path}: {reason}")

    def check_total(self, count: int, latest: str = "") -> None:
        """Stop when `count` distinct unreadable images (this one's, or every rank's together) exceed the budget."""
        if count > self.allowed:
            raise TooManyUnreadableImages(
                f"{count} of the {self.num_images} {self.split} images are unreadable, more than "
                f"data.max_bad_fraction allows ({self.allowed}){latest}. "
                "List every bad file with: python -m fgvc.data.check --dataset ... --data-dir ...")


class SplitLoader:
    """The batches of one split, with its unreadable images accounted for.

    Iterating gives the DataLoader's batch dicts after counting the images left out of each against the split's
    `unreadable` budget (which stops the run when exceeded); a batch whose images were all unreadable comes as {}
    and still counts as a batch, so a schedule never shifts. Batches follow EpochSampler's order: call
    set_epoch(epoch, start_batch) before each epoch (a resumed run starts mid-epoch)."""

    def __init__(self, loader: DataLoader, unreadable: UnreadableImages) -> None:
        self.loader, self.unreadable = loader, unreadable

    @property
    def dataset(self):
        """The raw dataset (its classes, part names, ...)."""
        return self.loader.dataset.dataset

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in a whole epoch: incomplete last batches are dropped in training, kept in evaluation."""
        size, count = self.loader.sampler.global_batch, len(self.loader.dataset)
        return count // size if self.loader.drop_last else -(-count // size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch `epoch` from global batch `start_batch` on."""
        self.loader.sampler.set_epoch(epoch, start=start_batch * self.loader.sampler.global_batch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.unreadable.add(batch.pop(UNREADABLE, ()))
            yield batch


def build_loader(dataset, transform: PartAwareTransform, *, batch_size: int, seed: int, train: bool,
                 unreadable: UnreadableImages | None = None, workers: int = 0, pin_memory: bool = False,
                 shard: Shard | None = None) -> SplitLoader:
    """A loader over `dataset` with position-derived order and augmentation.

    train=True shuffles and drops the last incomplete batch (stable batch statistics); evaluation keeps every
    sample in order. A full epoch has len(dataset) // batch_size batches in training. `unreadable`: the budget of
    unreadable images (default: none, the first one stops the loader). Under torchrun, `shard` says which part of
    each global batch (of batch_size x world_size images) this rank loads; batch_size is then the rank's part.
    """
    if unreadable is None:
        unreadable = UnreadableImages(getattr(dataset, "split", "dataset"), len(dataset), 0.0)
    shard = dataclasses.replace(shard or Shard(), batch_size=batch_size)
    sampler = EpochSampler(len(dataset), seed=seed, shuffle=train, shard=shard, drop_last=train)
    loader = DataLoader(
        AugmentedDataset(dataset, transform, seed=seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=train,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=collate_readable,
        worker_init_fn=_ignore_stop_signals,
        # The loader draws its workers' base seed from this generator instead of the global RNG, whose stream
        # must stay exactly as in an uninterrupted run when a run is resumed mid-epoch.
        generator=torch.Generator().manual_seed(seed),
    )
    return SplitLoader(loader, unreadable)


def _ignore_stop_signals(worker: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the training process, which stops at a step and checkpoints:
    a Ctrl-C reaches the whole foreground process group, and torchrun signals each rank's whole process group, so
    a worker killed by it would fail the batch being checkpointed. Workers still end with their loader, or when
    the training process dies (torch's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
