"""Loaders: order from (seed, epoch), augmentation from (seed, epoch, index), so worker count changes nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from fgvc.data.cub import CUBDataset
from fgvc.data.loader import EpochSampler, UnreadableImages, build_loader, derived_seed
from fgvc.data.transforms import PartAwareTransform, eval_transform, train_transform


def batches(loader, epochs: int) -> list[dict]:
    seen = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        seen.extend(loader)
    return seen


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_batches_identical_with_0_and_2_workers(small_birds: Path) -> None:
    dataset = CUBDataset(small_birds, "trainval")
    transform = PartAwareTransform(train_transform(48), dataset.part_names)
    runs = [batches(build_loader(dataset, transform, batch_size=8, seed=3, train=True, workers=w,
                                 unreadable=strict(dataset)), epochs=2) for w in (0, 2)]
    assert_same_batches(*runs)
    assert not torch.equal(runs[0][0]["index"], runs[0][len(runs[0]) // 2]["index"])  # epochs differ


def test_order_depends_on_seed_and_epoch_only() -> None:
    sampler = EpochSampler(50, seed=7, shuffle=True)
    order = {epoch: sampler.order(epoch) for epoch in range(3)}
    assert all(sorted(o) == list(range(50)) for o in order.values())
    assert order[0] != order[1] != order[2]
    assert EpochSampler(50, seed=7, shuffle=True).order(1) == order[1]
    assert EpochSampler(50, seed=8, shuffle=True).order(1) != order[1]
    sampler.set_epoch(2)
    assert [index for epoch, index in sampler] == order[2] and {epoch for epoch, _ in sampler} == {2}
    assert EpochSampler(5, seed=7, shuffle=False).order(4) == list(range(5))


def test_a_sample_is_the_same_alone_or_in_a_batch(small_birds: Path) -> None:
    dataset = CUBDataset(small_birds, "train")
    transform = PartAwareTransform(train_transform(48), dataset.part_names)
    loader = build_loader(dataset, transform, batch_size=4, seed=1, train=True, unreadable=strict(dataset))
    loader.set_epoch(5)
    batch = next(iter(loader))
    first = int(batch["index"][0])
    alone = transform(dataset[first], derived_seed(1, 5, first))
    assert torch.equal(batch["image"][0], alone["image"]) and torch.equal(batch["parts"][0], alone["parts"])


def test_evaluation_loader_keeps_every_sample_in_order(small_birds: Path) -> None:
    dataset = CUBDataset(small_birds, "test")
    loader = build_loader(dataset, PartAwareTransform(eval_transform(48), dataset.part_names), batch_size=7,
                          seed=0, train=False, unreadable=strict(dataset))
    indices = torch.cat([b["index"] for b in loader]).tolist()
    assert indices == list(range(len(dataset)))
    assert loader.batches_per_epoch == len(loader) == -(-len(dataset) // 7)  # the last, incomplete batch is kept


def test_a_resumed_epoch_starts_at_its_batch(small_birds: Path) -> None:
    dataset = CUBDataset(small_birds, "trainval")
    loader = build_loader(dataset, PartAwareTransform(train_transform(32), dataset.part_names), batch_size=4,
                          seed=2, train=True, unreadable=strict(dataset))
    loader.set_epoch(1)
    whole = [b["index"].tolist() for b in loader]
    loader.set_epoch(1, start_batch=3)
    assert [b["index"].tolist() for b in loader] == whole[3:]
    assert loader.batches_per_epoch == len(dataset) // 4 and len(loader) == len(whole) - 3


def strict(dataset) -> UnreadableImages:
    """An unreadable-image budget of none: the small tree has no bad files."""
    return UnreadableImages("test", len(dataset), 0.0)


def test_derived_seeds_differ_per_position() -> None:
    seeds = {derived_seed(0, epoch, index) for epoch in range(10) for index in range(100)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
