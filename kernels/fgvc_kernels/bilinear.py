"""Bilinear pooling: outer product over positions, signed square root, L2 normalization -- one fused op.

Per sample, with X (C1 x N) and Y (C2 x N) the features at N positions:

    p     = scale * X Y^T                                  (scale defaults to 1/N; Y = X in the self case)
    sigma = sign(p) sqrt(|p| + eps)                         sqrt_mode="signed"
            sign(p) (sqrt(|p| + eps) - sqrt(eps))           sqrt_mode="smooth" (sqrt(relu(p)+eps) - sqrt(relu(-p)+eps))
            p                                               sqrt_mode="none"
    z     = sigma / max(||sigma||_2, 1e-12)                 normalize=True (over the flattened C1 x C2 matrix)

Backward from the saved output z (no C1 x C2 temporary survives the forward), g = dL/dz, d = max(||sigma||, 1e-12):

    dL/dsigma = (g - z <z, g>) / d                          (the projection vanishes where the norm was clamped)
    dL/dp     = dL/dsigma / (2 (|sigma| + c)),  |sigma| = |z| d,  c = 0 (signed) or sqrt(eps) (smooth); 0 where p == 0
    dX = scale G Y,  dY = scale G^T X  (G = dL/dp);  self case: dX = scale (G + G^T) X, one GEMM

The [p != 0] mask is what autograd computes at an exact zero (dead ReLU channels are common); without it the gradient
there would be 1 / (2 sqrt(eps)). The layout follows one op per file: the Triton kernels, their host launchers, the
torch path used on the CPU (and on CUDA without Triton), the torch.library registration with autograd, the public
API, and the naive composition that tests and benchmarks compare against. Numerics: shared/REFERENCE.md section 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (macOS, Windows): the torch path serves every device
    triton = None

SQRT_MODES = ("signed", "smooth", "none")
NORM_FLOOR = 1e-12  # the clamp of F.normalize: an all-zero sample normalizes to zeros, not NaN
DEFAULT_EPS = 1e-12  # WS-DAN's; B-CNN code in the wild uses 1e-5 ... 1e-10. After L2 only eps (not scale) matters.


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA)
# ----------------------------------------------------------------------------------------------------------------

SQRT_CODES = {"none": 0, "signed": 1, "smooth": 2}
NORMALIZE_BLOCK = 1024  # elements per program in the normalization and <z, g> passes
PARTIAL_BLOCK = 1024  # partial sums reduced per step when a program totals a sample's partials

if triton is not None:

    @triton.jit
    def _signed_sqrt(p, eps, eps_root, SQRT_MODE: tl.constexpr):
        """The sqrt_mode epilogue on an fp32 tile; exactly 0 where p == 0, as sign(p) makes it."""
        if SQRT_MODE == 0:
            return p
        magnitude = tl.sqrt_rn(tl.abs(p) + eps)  # IEEE sqrt, not the approximate one
        if SQRT_MODE == 2:
            magnitude = magnitude - eps_root
        return tl.where(p > 0, magnitude, tl.where(p < 0, -magnitude, 0.0))

    @triton.jit
    def _bilinear_forward_kernel(
        x_ptr, y_ptr, out_ptr, partial_ptr,
        C1, C2, N,
        stride_xb, stride_xc, stride_xn,
        stride_yb, stride_yc, stride_yn,
        scale, eps, eps_root,
        SELF: tl.constexpr, SQRT_MODE: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One (BLOCK_1 x BLOCK_2) tile of sigma = epilogue(scale X Y^T) for one sample, and its sum of squares.

        Self case: tiles below the diagonal are skipped and the tiles above it are also written mirrored.
        Partial sums go to a fixed slot per tile (zeros where skipped), so the norm is summed in a fixed order.
        """
        tile = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        tiles_2 = tl.cdiv(C2, BLOCK_2)
        tile_1 = tile // tiles_2
        tile_2 = tile % tiles_2
        squares = 0.0
        if not SELF or tile_1 <= tile_2:
            offs_1 = tile_1 * BLOCK_1 + tl.arange(0, BLOCK_1)
            offs_2 = tile_2 * BLOCK_2 + tl.arange(0, BLOCK_2)
            offs_n = tl.arange(0, BLOCK_N)
            x_rows = x_ptr + b * stride_xb + offs_1[:, None] * stride_xc
            y_cols = y_ptr + b * stride_yb + offs_2[None, :] * stride_yc
            acc = tl.zeros((BLOCK_1, BLOCK_2), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                n = start + offs_n
                a = tl.load(x_rows + n[None, :] * stride_xn, mask=(offs_1[:, None] < C1) & (n[None, :] < N), other=0.0)
                bt = tl.load(y_cols + n[:, None] * stride_yn, mask=(offs_2[None, :] < C2) & (n[:, None] < N), other=0.0)
                acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
            # Scale in the fp32 accumulator: an unscaled X X^T overflows fp16 for post-ReLU features.
            sigma = _signed_sqrt(acc * scale, eps, eps_root, SQRT_MODE)
            out_base = out_ptr + b * C1 * C2
            inside = (offs_1[:, None] < C1) & (offs_2[None, :] < C2)
            tl.store(out_base + offs_1[:, None] * C2 + offs_2[None, :], sigma.to(out_ptr.dtype.element_ty), mask=inside)
            squares = tl.sum(tl.sum(sigma * sigma, axis=1), axis=0)
            if SELF and tile_1 < tile_2:
                mirrored = (offs_2[:, None] < C2) & (offs_1[None, :] < C1)
                tl.store(out_base + offs_2[:, None] * C2 + offs_1[None, :],
                         tl.trans(sigma).to(out_ptr.dtype.element_ty), mask=mirrored)
                squares = squares * 2.0
        if NORMALIZE:
            tl.store(partial_ptr + b * tl.num_programs(0) + tile, squares)

    @triton.jit
    def _sample_total(partial_ptr, b, num_partials, BLOCK: tl.constexpr):
        """Sum of one sample's partials in a fixed order (no atomics: bitwise reproducible)."""
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, num_partials, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(partial_ptr + b * num_partials + offs, mask=offs < num_partials, other=0.0)
        return tl.sum(acc, axis=0)

    @triton.jit
    def _normalize_kernel(out_ptr, partial_ptr, norm_ptr, numel, num_partials,
                          BLOCK: tl.constexpr, PARTIAL_BLOCK: tl.constexpr):
        """Second forward pass: total the sample's partial sums, store its norm, divide one chunk of its output."""
        chunk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        norm = tl.sqrt_rn(_sample_total(partial_ptr, b, num_partials, PARTIAL_BLOCK))
        if chunk == 0:
            tl.store(norm_ptr + b, norm)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < numel
        values = tl.load(out_ptr + b * numel + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * numel + offs, (values / tl.maximum(norm, 1e-12)).to(out_ptr.dtype.element_ty),
                 mask=inside)

    @triton.jit
    def _dot_partials_kernel(z_ptr, g_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
        """Backward pre-pass: per-chunk partial sums of <z, g> (like flash-attention's rowsum(dO * O))."""
        chunk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < numel
        z = tl.load(z_ptr + b * numel + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * numel + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(partial_ptr + b * tl.num_programs(0) + chunk, tl.sum(z * g, axis=0))

    @triton.jit
    def _bilinear_backward_kernel(
        g_ptr, z_ptr, partial_ptr, norm_ptr, w_ptr, dw_ptr,
        R, J, N, num_partials,
        stride_gr, stride_gj,
        stride_wb, stride_wj, stride_wn,
        stride_db, stride_dr, stride_dn,
        scale, eps_root,
        SYMMETRIC: tl.constexpr, SQRT_MODE: tl.constexpr, NORMALIZE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, PARTIAL_BLOCK: tl.constexpr,
    ):
        """One (BLOCK_R x BLOCK_N) tile of an input gradient, dW = scale * G W, where the G tiles are formed from
        g and z as they are needed and never stored.

        Rows r and the reduction index j address g and z through (stride_gr, stride_gj): (C2, 1) gives G for dX,
        (1, C2) gives G^T for dY. SYMMETRIC (self case) uses G + G^T; z is symmetric there, so only g is read twice.
        """
        tile_r = tl.program_id(0)
        tile_n = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        if NORMALIZE:
            norm = tl.load(norm_ptr + b)
            divisor = tl.maximum(norm, 1e-12)
            # Below the floor the divisor is a constant, so there is no projection term.
            zg = tl.where(norm > 1e-12, _sample_total(partial_ptr, b, num_partials, PARTIAL_BLOCK), 0.0)
            if SYMMETRIC:
                zg = zg * 2.0  # <z, g + g^T> = 2 <z, g> for a symmetric z
        else:
            divisor = 1.0
            zg = 0.0
        offs_r = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, BLOCK_J)
        gz_base = b * R * J
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for start in range(0, J, BLOCK_J):
            j = start + offs_j
            inside = (offs_r[:, None] < R) & (j[None, :] < J)
            along = offs_r[:, None] * stride_gr + j[None, :] * stride_gj
            g = tl.load(g_ptr + gz_base + along, mask=inside, other=0.0).to(tl.float32)
            if SYMMETRIC:
                across = offs_r[:, None] * stride_gj + j[None, :] * stride_gr
                g += tl.load(g_ptr + gz_base + across, mask=inside, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + gz_base + along, mask=inside, other=0.0).to(tl.float32)
            grad = (g - z * zg) / divisor  # dL/dsigma
            if SQRT_MODE != 0:
                # |sigma| = |z| * divisor; smooth mode adds sqrt(eps); masked where p (hence z) is exactly 0
                grad = tl.where(z != 0.0, grad / (2.0 * (tl.abs(z) * divisor + eps_root)), 0.0)
            w = tl.load(w_ptr + b * stride_wb + j[:, None] * stride_wj + offs_n[None, :] * stride_wn,
                        mask=(j[:, None] < J) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(grad.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        tl.store(dw_ptr + b * stride_db + offs_r[:, None] * stride_dr + offs_n[None, :] * stride_dn,
                 (acc * scale).to(dw_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_n[None, :] < N))

    # Autotuned over what does not change the result's layout; the forward's tile sizes are chosen on the host
    # (they fix the number of partial sums the normalization pass reads).
    # Each config compiles for sm_80 and sm_90 without register spills (python -m fgvc_kernels.compile_report).
    FORWARD_CONFIGS = [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n, warps, stages in [(32, 8, 4), (64, 8, 3), (128, 8, 3)]
    ]
    BACKWARD_CONFIGS = [
        triton.Config({"BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_J": block_j}, num_warps=warps,
                      num_stages=stages)
        for block_r, block_n, block_j, warps, stages in [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3)]
    ]
    _bilinear_forward_tuned = triton.autotune(FORWARD_CONFIGS, key=["C1", "C2", "N"])(_bilinear_forward_kernel)
    _bilinear_backward_tuned = triton.autotune(BACKWARD_CONFIGS, key=["R", "J", "N"])(_bilinear_backward_kernel)


def _dot_settings(dtype: torch.dtype) -> tuple[object, str]:
    """(operand dtype, input precision) of the backward GEMM.

    bf16 inputs: G in bf16 (same range as fp32). fp16: G can exceed fp16's range (it carries 1/sqrt(eps) near
    p = 0), so the GEMM runs in TF32, whose mantissa equals fp16's. fp32: IEEE unless torch allows TF32 matmuls.
    """
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    if dtype == torch.float16:
        return tl.float32, "tf32"
    return tl.float32, _fp32_precision()


def _fp32_precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _forward_tiles(c1: int, c2: int, self_case: bool) -> tuple[int, int]:
    """Output tile sizes: 64 x 64, narrowed for few channels (WS-DAN's 32 maps); square in the self case."""
    block_1 = min(64, max(16, triton.next_power_of_2(c1)))
    block_2 = min(64, max(16, triton.next_power_of_2(c2)))
    return (max(block_1, block_2),) * 2 if self_case else (block_1, block_2)


@dataclass
class Launch:
    """One kernel launch: `kernel` is a JITFunction or an autotuner over one; `grid` a tuple or f(meta)."""

    kernel: object
    grid: tuple | Callable[[dict], tuple]
    args: tuple
    constants: dict

    def run(self, config: dict | None = None) -> None:
        """`config` (block sizes, num_warps, num_stages) replaces autotuning on the tuned kernels (tests)."""
        tuned = isinstance(self.kernel, triton.runtime.Autotuner)
        kernel = self.kernel.fn if tuned and config is not None else self.kernel
        extra = config if tuned and config is not None else {}
        torch.library.wrap_triton(kernel)[self.grid](*self.args, **self.constants, **extra)


@dataclass
class Plan:
    """The launches of one direction, what they return, and the buffers they fill completely (which tests poison
    with NaN beforehand to prove it)."""

    launches: list[Launch]
    results: list[Tensor]
    written: list[Tensor]

    def run(self, config: dict | None = None) -> list[Tensor]:
        for launch in self.launches:
            launch.run(config)
        return self.results


def forward_plan(x: Tensor, y: Tensor | None, scale: float, sqrt_mode: str, eps: float, normalize: bool,
                 out_dtype: torch.dtype | None) -> Plan:
    """The GEMM-with-epilogue launch, then (normalize) the deterministic norm pass. Results: [z, norm]."""
    batch, c1, n = x.shape
    other = x if y is None else y
    c2 = other.shape[1]
    block_1, block_2 = _forward_tiles(c1, c2, y is None)
    num_tiles = triton.cdiv(c1, block_1) * triton.cdiv(c2, block_2)
    out = torch.empty((batch, c1, c2), device=x.device, dtype=out_dtype or x.dtype)
    partial = torch.empty((batch, num_tiles), device=x.device, dtype=torch.float32)
    norm = (torch.empty if normalize else torch.ones)((batch,), device=x.device, dtype=torch.float32)
    launches = [Launch(
        _bilinear_forward_tuned, (num_tiles, batch),
        (x, other, out, partial, c1, c2, n, *x.stride(), *other.stride(), scale, eps, math.sqrt(eps)),
        dict(SELF=y is None, SQRT_MODE=SQRT_CODES[sqrt_mode], NORMALIZE=normalize,
             DOT_PRECISION=_fp32_precision() if x.dtype == torch.float32 else "tf32", BLOCK_1=block_1,
             BLOCK_2=block_2))]
    if not normalize:
        return Plan(launches, [out, norm], [out])
    numel = c1 * c2
    launches.append(Launch(_normalize_kernel, (triton.cdiv(numel, NORMALIZE_BLOCK), batch),
                           (out, partial, norm, numel, num_tiles),
                           dict(BLOCK=NORMALIZE_BLOCK, PARTIAL_BLOCK=PARTIAL_BLOCK)))
    return Plan(launches, [out, norm], [out, partial, norm])


def backward_plan(grad: Tensor, out: Tensor, norm: Tensor, x: Tensor, y: Tensor | None, scale: float,
                  sqrt_mode: str, eps: float, normalize: bool) -> Plan:
    """The <z, g> pre-pass, then one GEMM launch per input gradient. Results: [dX] (self) or [dX, dY]."""
    batch, c1, c2 = out.shape
    grad = grad.contiguous()  # autograd may hand over an expanded or transposed gradient
    numel = c1 * c2
    chunks = triton.cdiv(numel, NORMALIZE_BLOCK)
    partial = torch.empty((batch, chunks), device=out.device, dtype=torch.float32)
    launches = []
    if normalize:
        launches.append(Launch(_dot_partials_kernel, (chunks, batch), (out, grad, partial, numel),
                               dict(BLOCK=NORMALIZE_BLOCK)))
    dot_dtype, precision = _dot_settings(x.dtype)

    def input_grad(w: Tensor, rows: int, g_strides: tuple[int, int], symmetric: bool) -> Tensor:
        dw = torch.empty((batch, rows, w.shape[2]), device=w.device, dtype=w.dtype)

        def grid(meta: dict) -> tuple:
            return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(w.shape[2], meta["BLOCK_N"]), batch

        launches.append(Launch(
            _bilinear_backward_tuned, grid,
            (grad, out, partial, norm, w, dw, rows, w.shape[1], w.shape[2], chunks, *g_strides, *w.stride(),
             *dw.stride(), scale, math.sqrt(eps) if sqrt_mode == "smooth" else 0.0),
            dict(SYMMETRIC=symmetric, SQRT_MODE=SQRT_CODES[sqrt_mode], NORMALIZE=normalize, DOT_DTYPE=dot_dtype,
                 DOT_PRECISION=precision, PARTIAL_BLOCK=PARTIAL_BLOCK)))
        return dw

    if y is None:
        grads = [input_grad(x, c1, (c1, 1), True)]
    else:
        grads = [input_grad(y, c1, (c2, 1), False), input_grad(x, c2, (1, c2), False)]
    return Plan(launches, grads, [*grads, partial] if normalize else grads)


# ----------------------------------------------------------------------------------------------------------------
# Torch path (CPU; CUDA without Triton): the same math, the epilogue in place, one GEMM for the self backward
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The torch path's elementwise epilogues run over blocks of whole samples of about this many bytes: a block stays in
# the CPU's L2 cache through its several passes, and its temporaries are small enough for the allocator to reuse
# (a fresh C1 x C2 temporary is page-faulted in afresh). Small matrices stay one block. (experiments/README.md
# has the measurement.)
EPILOGUE_BLOCK_BYTES = 1 << 20


def _cache_sized_rows(t: Tensor) -> list[slice]:
    """Slices of t's first (sample) dimension, each covering about EPILOGUE_BLOCK_BYTES (at least one sample)."""
    per_block = max(1, EPILOGUE_BLOCK_BYTES // max(1, t.shape[1:].numel() * t.element_size()))
    return [slice(start, start + per_block) for start in range(0, len(t), per_block)]


def _torch_forward(x: Tensor, y: Tensor | None, scale: float, sqrt_mode: str, eps: float, normalize: bool,
                   out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    out_dtype = out_dtype or x.dtype
    compute = _compute_dtype(x.dtype)
    x = x.to(compute)
    other = x if y is None else y.to(compute)
    sigma = _scaled_bmm(x, other.transpose(1, 2), scale)
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


def _torch_backward(grad: Tensor, out: Tensor, norm: Tensor, x: Tensor, y: Tensor | None, scale: float,
                    sqrt_mode: str, eps: float, normalize: bool) -> list[Tensor]:
    compute = _compute_dtype(x.dtype)
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
    if y is None:
        return [_scaled_bmm(g, x.to(compute), scale, like=x).to(x.dtype)]
    dx = _scaled_bmm(g, y.to(compute), scale, like=x).to(x.dtype)
    dy = _scaled_bmm(g.transpose(1, 2), x.to(compute), scale, like=y).to(y.dtype)
    return [dx, dy]


def _scaled_bmm(a: Tensor, b: Tensor, scale: float, like: Tensor | None = None) -> Tensor:
    """scale * a @ b with the scale applied inside the GEMM, laid out like `like`: a (B, C, N) view of (B, N, C)
    tokens gets its gradient as such a view too, so autograd need not transpose it afterwards."""
    if like is not None and like.stride(1) == 1 and like.stride(2) != 1:
        return torch.baddbmm(a.new_empty(()), b.transpose(1, 2), a.transpose(1, 2), beta=0, alpha=scale).transpose(1, 2)
    return torch.baddbmm(a.new_empty(()), a, b, beta=0, alpha=scale)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: one op for each direction, autograd between them
# ----------------------------------------------------------------------------------------------------------------


def _runs_triton(x: Tensor) -> bool:
    return triton is not None and x.device.type == "cuda"


@torch.library.triton_op("fgvc_kernels::bilinear_pool_forward", mutates_args=())
def _forward_op(x: Tensor, y: Tensor | None, scale: float, sqrt_mode: str, eps: float, normalize: bool,
                out_dtype: torch.dtype | None, recompute: bool) -> tuple[Tensor, Tensor]:
    """(B, C1, N) x (B, C2, N) -> (z: B x C1 x C2, norm: B, the norm of sigma before the clamp; ones without
    normalization). `recompute` only tells autograd what to keep."""
    if _runs_triton(x):
        return tuple(forward_plan(x, y, scale, sqrt_mode, eps, normalize, out_dtype).run())
    return _torch_forward(x, y, scale, sqrt_mode, eps, normalize, out_dtype)


@torch.library.triton_op("fgvc_kernels::bilinear_pool_backward", mutates_args=())
def _backward_op(grad: Tensor, out: Tensor, norm: Tensor, x: Tensor, y: Tensor | None, scale: float,
                 sqrt_mode: str, eps: float, normalize: bool) -> list[Tensor]:
    """[dX] in the self case, [dX, dY] otherwise."""
    if _runs_triton(x):
        return backward_plan(grad, out, norm, x, y, scale, sqrt_mode, eps, normalize).run()
    return _torch_backward(grad, out, norm, x, y, scale, sqrt_mode, eps, normalize)


def _setup_context(ctx, inputs, output) -> None:
    x, y, scale, sqrt_mode, eps, normalize, out_dtype, recompute = inputs
    ctx.options = (scale, sqrt_mode, eps, normalize)
    ctx.out_dtype, ctx.recompute, ctx.cross = out_dtype, recompute, y is not None
    # Saved: the inputs, plus the output and B norms unless recomputing (then the backward runs the forward again).
    ctx.save_for_backward(x, y, *(() if recompute else output))


def _backward(ctx, grad_out: Tensor, grad_norm: Tensor | None):
    x, y, *saved = ctx.saved_tensors
    if ctx.recompute:
        saved = torch.ops.fgvc_kernels.bilinear_pool_forward(x, y, *ctx.options, ctx.out_dtype, False)
    out, norm = saved
    grads = torch.ops.fgvc_kernels.bilinear_pool_backward(grad_out, out, norm, x, y, *ctx.options)
    return grads[0], grads[1] if ctx.cross else None, None, None, None, None, None, None


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
    xs = _channels_by_positions(x, "x")
    ys = None if y is None else _channels_by_positions(y, "y")
    _check(xs, ys, x, y, sqrt_mode, eps)
    if center:
        xs = xs - xs.mean(dim=2, keepdim=True)
        ys = None if ys is None else ys - ys.mean(dim=2, keepdim=True)
    scale = 1.0 / xs.shape[2] if scale is None else float(scale)
    out, _ = torch.ops.fgvc_kernels.bilinear_pool_forward(xs, ys, scale, sqrt_mode, float(eps), normalize,
                                                          out_dtype, recompute)
    return out.flatten(1)


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


def bilinear_pool_naive(x: Tensor, y: Tensor | None = None, *, scale: float | None = None, center: bool = False,
                        sqrt_mode: str = "signed", eps: float = DEFAULT_EPS, normalize: bool = True) -> Tensor:
    """The plain autograd composition (bmm, sign, sqrt, normalize) the op must equal: tests' oracle and the
    benchmarks' baseline. It keeps four C1 x C2 tensors alive for backward."""
    xs = _channels_by_positions(x, "x")
    ys = xs if y is None else _channels_by_positions(y, "y")
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


def _channels_by_positions(t: Tensor, name: str) -> Tensor:
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
