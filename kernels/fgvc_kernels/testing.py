"""The op's reference and the checks that back its claims, for our tests and benchmarks and for users checking
their own models."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fgvc_kernels.bilinear import channels_by_positions
from fgvc_kernels.bilinear_torch import DEFAULT_EPS, NORM_FLOOR


def bilinear_pool_naive(x: Tensor, y: Tensor | None = None, *, scale: float | None = None, center: bool = False,
                        sqrt_mode: str = "signed", eps: float = DEFAULT_EPS, normalize: bool = True) -> Tensor:
    """The plain autograd composition (bmm, sign, sqrt, normalize) the op must equal: tests' oracle and the
    benchmarks' baseline. It keeps four C1 x C2 tensors alive for backward."""
    xs = channels_by_positions(x, "x")
    ys = xs if y is None else channels_by_positions(y, "y")
    if center:
        xs = xs - xs.mean(dim=2, keepdim=True)
        ys = xs if y is None else ys - ys.mean(dim=2, keepdim=True)
    p = torch.bmm(xs, ys.transpose(1, 2)) * (1.0 / xs.shape[2] if scale is None else scale)
    if sqrt_mode == "signed":
        p = torch.sign(p) * torch.sqrt(p.abs() + eps)
    elif sqrt_mode == "smooth":
        p = torch.sqrt(torch.relu(p) + eps) - torch.sqrt(torch.relu(-p) + eps)
    p = p.flatten(1)
    return nn.functional.normalize(p, dim=1, eps=NORM_FLOOR) if normalize else p


def saved_tensor_bytes(fn: Callable[..., object], *inputs: Tensor) -> int:
    """Bytes autograd keeps alive for backward while running fn(*inputs), not counting the inputs' own storage
    (which the caller holds anyway). Each storage is counted once, however many views of it are saved."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())
