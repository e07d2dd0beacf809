"""Checks that back the op's claims, for our tests and benchmarks and for users checking their own models."""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_tensor_bytes(fn: Callable[..., object], *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps alive for backward while running fn(*inputs), not counting the inputs' own storage
    (which the caller holds anyway). Each storage is counted once, however many views of it are saved."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())
