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


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|, in float64 on the CPU: the error measure of every parity check."""
    return ((got.double().cpu() - want.double().cpu()).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def naive_fp32_errors(x: Tensor, y: Tensor | None, grad: Tensor, **options) -> tuple[float, float]:
    """How far torch's own fp32 autograd of the naive composition lands from float64 on these inputs, forward and
    backward: the conditioning that parity tolerances must allow (the gradient is ill-conditioned near p = 0).
    x and y as bilinear_pool takes them; grad shaped like the output."""
    def run(dtype: torch.dtype) -> list[Tensor]:
        inputs = [t.detach().cpu().to(dtype).requires_grad_() for t in (x, y) if t is not None]
        out = bilinear_pool_naive(*inputs, **options)
        return [out, *torch.autograd.grad(out, inputs, grad.cpu().to(dtype).flatten(1))]

    errors = [relative_error(a, b) for a, b in zip(run(torch.float32), run(torch.float64), strict=True)]
    return errors[0], max(errors[1:])


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
