"""Bilinear pooling's math, and the torch path that computes it (CPU; CUDA without Triton; float64 anywhere).

Per sample, with X (C1 x N) and Y (C2 x N) the features at N positions (centred over positions first if asked:
X <- X - mean_n X, which is covariance pooling):

    p     = scale * X Y^T                                  (scale defaults to 1/N; Y = X in the self case)
    sigma = sign(p) sqrt(|p| + eps)                         sqrt_mode="signed"
            sign(p) (sqrt(|p| + eps) - sqrt(eps))           sqrt_mode="smooth" (sqrt(relu(p)+eps) - sqrt(relu(-p)+eps))
            p                                               sqrt_mode="none"
    z     = sigma / max(||sigma||_2, 1e-12)                 normalize=True (over the flattened C1 x C2 matrix)

Backward from the saved output z (no C1 x C2 temporary survives the forward), g = dL/dz, d = max(||sigma||, 1e-12):

    dL/dsigma = (g - z <z, g>) / d                          (the projection vanishes where the norm was clamped)
    dL/dp     = dL/dsigma / (2 (|sigma| + c)),  |sigma| = |z| d,  c = 0 (signed) or sqrt(eps) (smooth); 0 where p == 0
    dX = scale G Y,  dY = scale G^T X  (G = dL/dp);  self case: dX = scale (G + G^T) X, one GEMM

With centring, X and Y above are the centred features, and dX needs no correction: the rows of scale G Y_centred
already have zero mean over positions, so projecting them onto zero-mean rows changes nothing.

The [p != 0] mask is what autograd computes at an exact zero (dead ReLU channels are common); without it the gradient
there would be 1 / (2 sqrt(eps)). The backward reads both the mask and |sigma| from z, so z must keep tiny entries
exactly: the op saves z in fp32 for fp16 inputs (bilinear.py). Numerics: shared/REFERENCE.md section 4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SQRT_MODES = ("signed", "smooth", "none")
NORM_FLOOR = 1e-12  # the clamp of F.normalize: an all-zero sample normalizes to zeros, not NaN
DEFAULT_EPS = 1e-12  # WS-DAN's; B-CNN code in the wild uses 1e-5 ... 1e-10. After L2 only eps (not scale) matters.

# The epilogues run over blocks of whole samples of about this many bytes: a block stays in the CPU's L2 cache
# through its several passes, and its temporaries are small enough for the allocator to reuse (a fresh C1 x C2
# temporary is page-faulted in afresh). Small matrices stay one block. (experiments/README.md has the measurement.)
EPILOGUE_BLOCK_BYTES = 1 << 20


def backward_reads_output(sqrt_mode: str, normalize: bool) -> bool:
    """Whether the backward needs z: for the projection of the L2 norm and for 1 / |sigma|. Without either (iSQRT's
    covariance) G = g, and z need not be kept."""
    return normalize or sqrt_mode != "none"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and epilogue precision: fp32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def centred(t: Tensor, center: bool) -> Tensor:
    """(B, C, N) features in the compute dtype, minus each channel's mean over positions when `center`."""
    t = t.to(compute_dtype(t.dtype))
    return t - t.mean(dim=2, keepdim=True) if center else t


def _cache_sized_rows(t: Tensor) -> list[slice]:
    """Slices of t's first (sample) dimension, each covering about EPILOGUE_BLOCK_BYTES (at least one sample)."""
    per_block = max(1, EPILOGUE_BLOCK_BYTES // max(1, t.shape[1:].numel() * t.element_size()))
    return [slice(start, start + per_block) for start in range(0, len(t), per_block)]


def torch_forward(x: Tensor, y: Tensor | None, scale: float, sqrt_mode: str, eps: float, normalize: bool,
                  center: bool, out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """(z, norm of sigma before the clamp; ones without normalization), with the epilogue in place."""
    out_dtype = out_dtype or x.dtype
    xs = centred(x, center)
    other = xs if y is None else centred(y, center)
    sigma = _scaled_bmm(xs, other.transpose(1, 2), scale)
    if sqrt_mode != "none":
        for rows in _cache_sized_rows(sigma):
            block = sigma[rows]
            sign = torch.sign(block)
            block.abs_().add_(eps).sqrt_()
            if sqrt_mode == "smooth":
                block.sub_(math.sqrt(eps))
            block.mul_(sign)  # sign(0) = 0: exactly zero where p is
    if normalize:
        norm = torch.linalg.vector_norm(sigma.flatten(1), dim=1)
        sigma.div_(norm.clamp_min(NORM_FLOOR)[:, None, None])
    else:
        norm = sigma.new_ones(sigma.shape[0])
    return sigma.to(out_dtype), norm


def torch_backward(grad: Tensor, out: Tensor, norm: Tensor, x: Tensor, y: Tensor | None, scale: float,
                   sqrt_mode: str, eps: float, normalize: bool, center: bool) -> list[Tensor]:
    """[dX] in the self case, [dX, dY] otherwise, with one GEMM per input gradient. `out` may be empty where
    backward_reads_output says z is not needed."""
    compute = compute_dtype(x.dtype)
    z = out.to(compute)
    grad = grad.to(compute)
    # Self case: dX = scale (G + G^T) X, and every factor of G below is symmetric in (i, j) because z is, so
    # G + G^T is the same expression applied to g + g^T.
    g = grad + grad.transpose(1, 2) if y is None else grad.clone(memory_format=torch.contiguous_format)
    divisors = norm.clamp_min(NORM_FLOOR).view(-1, 1, 1) if normalize else torch.ones_like(norm).view(-1, 1, 1)
    blocks = _cache_sized_rows(g)
    scratch = torch.empty_like(g[blocks[0]]) if blocks else None  # one block's worth serves every temporary
    for rows in blocks:
        g_block, z_block, divisor = g[rows], z[rows], divisors[rows]
        buffer = scratch[: len(g_block)]
        if normalize:  # <z, g> per sample; 0 where the norm was clamped
            zg = torch.mul(z_block, g_block, out=buffer).flatten(1).sum(1) * (norm[rows] > NORM_FLOOR)
            g_block.addcmul_(z_block, zg.view(-1, 1, 1), value=-1)
        if sqrt_mode != "none":
            # The [p != 0] mask as a multiplication by |sign(z)|: on the CPU, eq + masked_fill_ cost twice as much.
            # It comes first so that 0 / (tiny) below is 0 (an upstream NaN stays NaN, as autograd's would).
            g_block.mul_(torch.sign(z_block, out=buffer).abs_())
            # dL/dp = (g - z <z, g>) / (2 d (|sigma| + c)) with |sigma| = |z| d: one denominator, d folded in;
            # clamped above zero only where z == 0 (elsewhere |sigma| >= sqrt(eps) or |p|, far above the smallest
            # normal float).
            denominator = torch.abs(z_block, out=buffer).mul_(2 * divisor * divisor)
            if sqrt_mode == "smooth":
                denominator.add_(2 * divisor * math.sqrt(eps))
            g_block.div_(denominator.clamp_min_(torch.finfo(denominator.dtype).tiny))
        elif normalize:
            g_block.div_(divisor)
    del scratch
    xs = centred(x, center)
    if y is None:
        return [_scaled_bmm(g, xs, scale, like=x).to(x.dtype)]
    dx = _scaled_bmm(g, centred(y, center), scale, like=x).to(x.dtype)
    dy = _scaled_bmm(g.transpose(1, 2), xs, scale, like=y).to(y.dtype)
    return [dx, dy]


def _scaled_bmm(a: Tensor, b: Tensor, scale: float, like: Tensor | None = None) -> Tensor:
    """scale * a @ b with the scale applied inside the GEMM, laid out like `like`: a (B, C, N) view of (B, N, C)
    tokens gets its gradient as such a view too, so autograd need not transpose it afterwards."""
    if like is not None and like.stride(1) == 1 and like.stride(2) != 1:
        return torch.baddbmm(a.new_empty(()), b.transpose(1, 2), a.transpose(1, 2), beta=0, alpha=scale).transpose(1, 2)
    return torch.baddbmm(a.new_empty(()), a, b, beta=0, alpha=scale)
