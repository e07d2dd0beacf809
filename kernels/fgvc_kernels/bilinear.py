"""Bilinear pooling as one op: the public API, and its torch.library registration with autograd.

The math and the torch path are in bilinear_torch.py, the Triton kernels in bilinear_triton.py; this module picks
between them per call and is the only one a user imports. Numerics: shared/REFERENCE.md section 4.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from fgvc_kernels.bilinear_torch import DEFAULT_EPS, SQRT_MODES, backward_reads_output, torch_backward, torch_forward

__all__ = ["SQRT_MODES", "BilinearPool", "bilinear_pool", "runs_triton"]

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # CPU-only installs (macOS, Windows) lack it
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels read and write (fp32 accumulation)
# Triton's tl.dot is tensor-core MMA from sm_80 on; on Turing and older it is FMA, slower than the torch path's cuBLAS.
TRITON_MIN_CAPABILITY = (8, 0)
MAX_GRID_BATCH = 65535  # the kernels put the batch on a CUDA grid dimension, which holds at most this many


def runs_triton(device_type: str, dtype: torch.dtype, out_dtype: torch.dtype | None = None,
                capability: tuple[int, int] | None = None, triton_installed: bool = TRITON_INSTALLED) -> bool:
    """Whether the Triton kernels serve an input: on a CUDA GPU of sm_80 or later with Triton, reading and writing
    fp32, bf16 or fp16. Everything else -- float64 above all, which an fp32 accumulator would silently round --
    takes the torch path."""
    on_gpu = device_type == "cuda" and capability is not None and capability >= TRITON_MIN_CAPABILITY
    return triton_installed and on_gpu and dtype in TRITON_DTYPES and (out_dtype or dtype) in TRITON_DTYPES


def _served_by_triton(x: Tensor, out_dtype: torch.dtype | None) -> bool:
    """runs_triton for this input, on an NVIDIA GPU (the configs and precisions are NVIDIA's; ROCm takes the torch
    path), with a batch the launch grid holds."""
    nvidia = x.device.type == "cuda" and torch.version.hip is None
    capability = torch.cuda.get_device_capability(x.device) if nvidia else None
    return x.shape[0] <= MAX_GRID_BATCH and runs_triton(x.device.type, x.dtype, out_dtype, capability)


def _on_current_device(x: Tensor) -> None:
    """Triton launches on the current CUDA device, so inputs elsewhere would be read at wrong addresses."""
    if x.device.index != torch.cuda.current_device():
        raise ValueError(f"bilinear_pool: the input is on {x.device} but the current CUDA device is "
                         f"cuda:{torch.cuda.current_device()}; call torch.cuda.set_device({x.device.index}) first")


def saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the z the backward reads. fp16's smallest normal is 6e-5: the small |z| entries -- the ones with
    the largest gradients, 1 / (2 |sigma|) -- would lose their digits or round to 0 and be masked, so an fp16 z the
    backward needs is kept in fp32 (bf16 has fp32's range and keeps them)."""
    return torch.float32 if dtype == torch.float16 else dtype


def produced_dtype(wanted: torch.dtype, needs_grad: bool, sqrt_mode: str, normalize: bool,
                   recompute: bool) -> torch.dtype:
    """The dtype the forward writes before the cast to `wanted`: fp32 instead of fp16 where the backward reads z
    (saved_dtype), and wherever the L2 norm divides afterwards, because the unnormalized sigma is first written in
    the output dtype and can exceed fp16's range (65504)."""
    keeps_z = needs_grad and not recompute and backward_reads_output(sqrt_mode, normalize)
    return saved_dtype(wanted) if keeps_z or normalize else wanted


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: one op for each direction, autograd between them
# ----------------------------------------------------------------------------------------------------------------


@torch.library.triton_op("fgvc_kernels::bilinear_pool_forward", mutates_args=())
def _forward_op(x: Tensor, y: Tensor | None, scale: float, sqrt_mode: str, eps: float, normalize: bool,
                center: bool, out_dtype: torch.dtype | None, recompute: bool) -> tuple[Tensor, Tensor]:
    """(B, C1, N) x (B, C2, N) -> (z: B x C1 x C2, norm: B, the norm of sigma before the clamp; ones without
    normalization). `recompute` only tells autograd what to keep."""
    if _served_by_triton(x, out_dtype):
        from fgvc_kernels import bilinear_triton

        _on_current_device(x)
        plan = bilinear_triton.forward_plan(x, y, scale, sqrt_mode, eps, normalize, center, out_dtype)
        return tuple(plan.run())
    return torch_forward(x, y, scale, sqrt_mode, eps, normalize, center, out_dtype)


@torch.library.triton_op("fgvc_kernels::bilinear_pool_backward", mutates_args=())
def _backward_op(grad: Tensor, out: Tensor, norm: Tensor, x: Tensor, y: Tensor | None, scale: float,
                 sqrt_mode: str, eps: float, normalize: bool, center: bool) -> list[Tensor]:
    """[dX] in the self case, [dX, dY] otherwise. `out` is empty where the backward does not read z."""
    if _served_by_triton(x, grad.dtype):
        from fgvc_kernels import bilinear_triton

        _on_current_device(x)
        return bilinear_triton.backward_plan(grad, out, norm, x, y, scale, sqrt_mode, eps, normalize, center).run()
    return torch_backward(grad, out, norm, x, y, scale, sqrt_mode, eps, normalize, center)


def _setup_context(ctx, inputs, output) -> None:
    x, y, scale, sqrt_mode, eps, normalize, center, out_dtype, recompute = inputs
    ctx.options = (scale, sqrt_mode, eps, normalize, center)
    ctx.out_dtype, ctx.recompute, ctx.cross = out_dtype or x.dtype, recompute, y is not None
    # Saved: the inputs, plus the output (where the backward reads it) and B norms unless recomputing (then the
    # backward runs the forward again).
    out, norm = output
    if recompute:
        ctx.save_for_backward(x, y)
    else:
        ctx.save_for_backward(x, y, out if backward_reads_output(sqrt_mode, normalize) else None, norm)


def _backward(ctx, grad_out: Tensor, grad_norm: Tensor | None):
    x, y, *saved = ctx.saved_tensors
    if ctx.recompute:
        saved = torch.ops.fgvc_kernels.bilinear_pool_forward(x, y, *ctx.options, saved_dtype(ctx.out_dtype), False)
    out, norm = saved
    if out is None:
        out = grad_out.new_empty(0)
    grads = torch.ops.fgvc_kernels.bilinear_pool_backward(grad_out, out, norm, x, y, *ctx.options)
    return grads[0], grads[1] if ctx.cross else None, None, None, None, None, None, None, None


torch.library.register_autograd("fgvc_kernels::bilinear_pool_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def bilinear_pool(x: Tensor, y: Tensor | None = None, *, scale: float | None = None, center: bool = False,
                  sqrt_mode: str = "signed", eps: float = DEFAULT_EPS, normalize: bool = True,
                  out_dtype: torch.dtype | None = None, recompute: bool = False) -> Tensor:
    """Bilinear pooling of x with y (or with itself when y is None) -> (B, C1 * C2).

    x: (B, C1, H, W) feature maps (any memory format; channels-last is read natively) or (B, N, C1) tokens.
    y: likewise with C2 channels and the same B and N.
    scale: multiplies X Y^T; default 1/N. center: subtract each channel's mean over positions first
    (covariance pooling, as iSQRT-COV uses). sqrt_mode: "signed", "smooth" or "none". eps: inside the square
    root. normalize: L2 over each sample's flattened C1 x C2 matrix (clamped at 1e-12, so zeros stay zeros).
    Accumulation and epilogue run in fp32 (float64 stays float64); the output has the input dtype unless
    `out_dtype` says otherwise. recompute: keep nothing but the inputs for backward and recompute the forward there.
    """
    xs = channels_by_positions(x, "x")
    ys = None if y is None else channels_by_positions(y, "y")
    _check(xs, ys, x, y, sqrt_mode, eps)
    scale = 1.0 / xs.shape[2] if scale is None else float(scale)
    wanted = out_dtype or x.dtype
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y))
    produced = produced_dtype(wanted, needs_grad, sqrt_mode, normalize, recompute)
    out, _ = torch.ops.fgvc_kernels.bilinear_pool_forward(xs, ys, scale, sqrt_mode, float(eps), normalize, center,
                                                          produced, recompute)
    return out.flatten(1).to(wanted)


class BilinearPool(nn.Module):
    """Module form of `bilinear_pool`: `BilinearPool()(x)` (self) or `BilinearPool()(x, y)` (cross)."""

    def __init__(self, *, scale: float | None = None, center: bool = False, sqrt_mode: str = "signed",
                 eps: float = DEFAULT_EPS, normalize: bool = True, out_dtype: torch.dtype | None = None,
                 recompute: bool = False) -> None:
        super().__init__()
        if sqrt_mode not in SQRT_MODES:
            raise ValueError(f"sqrt_mode must be one of {SQRT_MODES}, got {sqrt_mode!r}")
        self.scale, self.center, self.sqrt_mode, self.eps = scale, center, sqrt_mode, eps
        self.normalize, self.out_dtype, self.recompute = normalize, out_dtype, recompute

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return bilinear_pool(x, y, scale=self.scale, center=self.center, sqrt_mode=self.sqrt_mode, eps=self.eps,
                             normalize=self.normalize, out_dtype=self.out_dtype, recompute=self.recompute)

    def extra_repr(self) -> str:
        scale = "1/N" if self.scale is None else f"{self.scale:g}"
        parts = [f"scale={scale}", f"center={self.center}", f"sqrt_mode={self.sqrt_mode!r}", f"eps={self.eps:g}",
                 f"normalize={self.normalize}"]
        if self.out_dtype is not None:
            parts.append(f"out_dtype={self.out_dtype}")
        if self.recompute:
            parts.append("recompute=True")
        return ", ".join(parts)


def channels_by_positions(t: Tensor, name: str) -> Tensor:
    """(B, C, H, W) or (B, N, C) -> a (B, C, N) view (a copy only when H and W cannot be merged)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 4:
        return t.flatten(2)
    if t.dim() == 3:
        return t.transpose(1, 2)
    raise ValueError(f"{name} must be (B, C, H, W) feature maps or (B, N, C) tokens, got shape {tuple(t.shape)}")


def _check(xs: Tensor, ys: Tensor | None, x: Tensor, y: Tensor | None, sqrt_mode: str, eps: float) -> None:
    if sqrt_mode not in SQRT_MODES:
        raise ValueError(f"sqrt_mode must be one of {SQRT_MODES}, got {sqrt_mode!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    for name, t in (("x", x), ("y", y)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if xs.shape[2] == 0:
        raise ValueError(f"x has no positions to pool over (shape {tuple(x.shape)})")
    if ys is None:
        return
    if x.dim() != y.dim():
        raise ValueError(f"x and y must have the same layout, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"x and y differ in batch size: {xs.shape[0]} vs {ys.shape[0]}")
    if xs.shape[2] != ys.shape[2]:
        raise ValueError(f"x and y differ in the number of positions N: {xs.shape[2]} vs {ys.shape[2]} "
                         f"(shapes {tuple(x.shape)} and {tuple(y.shape)})")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device, got {x.device} and {y.device}")
