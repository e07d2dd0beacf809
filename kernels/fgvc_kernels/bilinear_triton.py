"""Bilinear pooling's Triton kernels and their host launchers (CUDA).

Imported only where the op runs them (bilinear.py, on CUDA with Triton) and by the checks that need them: the compile
report and the tests, which plan launches on the meta device or run them in Triton's interpreter. The math is in
bilinear_torch.py; numerics in shared/REFERENCE.md section 4.

Forward: one GEMM-with-epilogue launch writes sigma and one sum of squares per output tile, then a second pass totals
each sample's partial sums in a fixed order (bitwise reproducible, no atomics) and divides. Backward: a pre-pass of
<z, g> partial sums, then one GEMM launch per input gradient that forms G from g and z tile by tile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fgvc_kernels.bilinear_torch import backward_reads_output

SQRT_CODES = {"none": 0, "signed": 1, "smooth": 2}
NORMALIZE_BLOCK = 1024  # elements per program in the normalization and <z, g> passes
PARTIAL_BLOCK = 1024  # partial sums reduced per step when a program totals a sample's partials
# The forward's partial sums have one slot per tile of this size, the smallest a tl.dot takes: enough for any tile
# an autotune config chooses (the shipped ones start at 32; tests use 16), so the tile sizes can be tuned. The kernel
# records how many slots it filled.
PARTIAL_TILE = 16


@dataclass(frozen=True)
class Target:
    """What a launch is planned for: the GPU's compute capability (90 for sm_90) and the most shared memory one
    program may use."""

    capability: int
    shared_bytes: int

    @staticmethod
    @functools.cache
    def of(device: torch.device) -> Target:
        index = torch.cuda.current_device() if device.index is None else device.index
        major, minor = torch.cuda.get_device_capability(index)
        properties = triton.runtime.driver.active.utils.get_device_properties(index)
        return Target(10 * major + minor, properties["max_shared_mem"])


# The opt-in shared memory per block of each architecture the kernels are built for (CUDA programming guide).
# Turing (sm_75, 64 KB) is not among them: Triton emits no tensor-core MMA there, so the op runs cuBLAS instead.
TARGETS = {80: Target(80, 163 << 10), 86: Target(86, 99 << 10), 89: Target(89, 99 << 10), 90: Target(90, 227 << 10)}


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


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
def _upper_triangle_tile(index, tiles):
    """(row, column) of tile `index` in the row-major upper triangle (diagonal included) of a tiles x tiles grid."""
    # Row r starts at r * tiles - r (r - 1) / 2: invert that with the quadratic formula, then undo fp32 rounding.
    b = 2 * tiles + 1
    row = ((b - tl.sqrt((b * b - 8 * index).to(tl.float32))) * 0.5).to(tl.int32)
    row = tl.where(row * tiles - row * (row - 1) // 2 > index, row - 1, row)
    row = tl.where((row + 1) * tiles - (row + 1) * row // 2 <= index, row + 1, row)
    return row, row + index - (row * tiles - row * (row - 1) // 2)


@triton.jit
def _bilinear_forward_kernel(
    x_ptr, y_ptr, mean_x_ptr, mean_y_ptr, out_ptr, partial_ptr, tiles_ptr,
    C1, C2, N, num_slots,
    stride_xb, stride_xc, stride_xn,
    stride_yb, stride_yc, stride_yn,
    scale, eps, eps_root,
    batch_bucket, n_bucket,  # only for the autotune key: B and N rounded up to powers of two, tuned once per bucket
    SELF: tl.constexpr, CENTER: tl.constexpr, SQRT_MODE: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (BLOCK_1 x BLOCK_2) tile of sigma = epilogue(scale X Y^T) for one sample, and its sum of squares.

    Centring (CENTER, see centring()): 16-bit operands stream to the MMA untouched and the rank-one mean term leaves
    the fp32 accumulator; fp32 operands are centred as loaded. Self case: the grid covers
    only the upper triangle of tiles; off-diagonal tiles are also written mirrored.
    """
    index = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if SELF:
        tile_1, tile_2 = _upper_triangle_tile(index, tl.cdiv(C1, BLOCK_1))
    else:
        tiles_2 = tl.cdiv(C2, BLOCK_2)
        tile_1 = index // tiles_2
        tile_2 = index % tiles_2
    offs_1 = tile_1 * BLOCK_1 + tl.arange(0, BLOCK_1)
    offs_2 = tile_2 * BLOCK_2 + tl.arange(0, BLOCK_2)
    offs_n = tl.arange(0, BLOCK_N)
    inside_1 = offs_1 < C1
    inside_2 = offs_2 < C2
    if CENTER != 0:
        mean_1 = tl.load(mean_x_ptr + b * C1 + offs_1, mask=inside_1, other=0.0)
        mean_2 = tl.load(mean_y_ptr + b * C2 + offs_2, mask=inside_2, other=0.0)
    x_rows = x_ptr + b * stride_xb + offs_1[:, None] * stride_xc
    y_cols = y_ptr + b * stride_yb + offs_2[None, :] * stride_yc
    acc = tl.zeros((BLOCK_1, BLOCK_2), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + offs_n
        mask_a = inside_1[:, None] & (n[None, :] < N)
        mask_b = inside_2[None, :] & (n[:, None] < N)
        a = tl.load(x_rows + n[None, :] * stride_xn, mask=mask_a, other=0.0)
        bt = tl.load(y_cols + n[:, None] * stride_yn, mask=mask_b, other=0.0)
        if CENTER == 2:
            a = tl.where(mask_a, a - mean_1[:, None], 0.0)
            bt = tl.where(mask_b, bt - mean_2[None, :], 0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    if CENTER == 1:  # X_c Y_c^T = X Y^T - N mu_x mu_y^T
        acc = acc - N * mean_1[:, None] * mean_2[None, :]
    # Scale in the fp32 accumulator: an unscaled X X^T overflows fp16 for post-ReLU features.
    sigma = _signed_sqrt(acc * scale, eps, eps_root, SQRT_MODE)
    out_base = out_ptr + b * C1 * C2
    inside = inside_1[:, None] & inside_2[None, :]
    tl.store(out_base + offs_1[:, None] * C2 + offs_2[None, :], sigma.to(out_ptr.dtype.element_ty), mask=inside)
    if NORMALIZE:
        squares = tl.sum(tl.sum(sigma * sigma, axis=1), axis=0)
    if SELF and tile_1 < tile_2:
        tl.store(out_base + offs_2[:, None] * C2 + offs_1[None, :],
                 tl.trans(sigma).to(out_ptr.dtype.element_ty), mask=inside_2[:, None] & inside_1[None, :])
        if NORMALIZE:
            squares = squares * 2.0
    if NORMALIZE:
        tl.store(partial_ptr + b * num_slots + index, squares)
        if index == 0:
            tl.store(tiles_ptr, tl.num_programs(0))


@triton.jit
def _sample_total(partials_ptr, count, BLOCK: tl.constexpr):
    """Sum of one sample's `count` partial sums in a fixed order (no atomics: bitwise reproducible)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _normalize_kernel(out_ptr, partial_ptr, tiles_ptr, norm_ptr, numel, num_slots,
                      BLOCK: tl.constexpr, PARTIAL_BLOCK: tl.constexpr):
    """Second forward pass: total the sample's partial sums, store its norm, divide one chunk of its output."""
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    norm = tl.sqrt_rn(_sample_total(partial_ptr + b * num_slots, tl.load(tiles_ptr), PARTIAL_BLOCK))
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
    g_ptr, z_ptr, partial_ptr, norm_ptr, w_ptr, mean_w_ptr, dw_ptr,
    R, J, N, num_partials,
    stride_gr, stride_gj,
    stride_wb, stride_wj, stride_wn,
    stride_db, stride_dr, stride_dn,
    scale, eps_root,
    batch_bucket, n_bucket,  # only for the autotune key, as in the forward
    SYMMETRIC: tl.constexpr, CENTER: tl.constexpr, SQRT_MODE: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, PARTIAL_BLOCK: tl.constexpr,
):
    """One (BLOCK_R x BLOCK_N) tile of an input gradient, dW = scale * G W, where the G tiles are formed from
    g and z as they are needed and never stored. Centring: with a bf16 G operand, G W_c = G W - (G mu_w) 1^T, G mu_w
    summed from that very operand (bf16 products are exact in fp32, so the terms cancel consistently); with an fp32
    G operand (rounded to TF32 inside the dot) W is centred as loaded.

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
        zg = tl.where(norm > 1e-12, _sample_total(partial_ptr + b * num_partials, num_partials, PARTIAL_BLOCK), 0.0)
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
    mean_term = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, J, BLOCK_J):
        j = start + offs_j
        inside = (offs_r[:, None] < R) & (j[None, :] < J)
        along = offs_r[:, None] * stride_gr + j[None, :] * stride_gj
        g = tl.load(g_ptr + gz_base + along, mask=inside, other=0.0).to(tl.float32)
        if SYMMETRIC:
            across = offs_r[:, None] * stride_gj + j[None, :] * stride_gr
            g += tl.load(g_ptr + gz_base + across, mask=inside, other=0.0).to(tl.float32)
        if NORMALIZE or SQRT_MODE != 0:  # otherwise G = g, and z is neither saved nor read
            z = tl.load(z_ptr + gz_base + along, mask=inside, other=0.0).to(tl.float32)
            g = (g - z * zg) / divisor  # dL/dsigma
            if SQRT_MODE != 0:
                # |sigma| = |z| * divisor; smooth mode adds sqrt(eps). Masked where p (hence z) is exactly 0, as a
                # product so that an upstream NaN stays NaN, as autograd's and the torch path's do.
                denominator = tl.maximum(2.0 * (tl.abs(z) * divisor + eps_root), 1.1754944e-38)  # fp32's least normal
                g = g * tl.where(z != 0.0, 1.0, 0.0) / denominator
        operand = g.to(DOT_DTYPE)
        mask_w = (j[:, None] < J) & (offs_n[None, :] < N)
        w = tl.load(w_ptr + b * stride_wb + j[:, None] * stride_wj + offs_n[None, :] * stride_wn, mask=mask_w,
                    other=0.0)
        if CENTER != 0:
            mean_w = tl.load(mean_w_ptr + b * J + j, mask=j < J, other=0.0)
            if CENTER == 1:
                mean_term += tl.sum(operand.to(tl.float32) * mean_w[None, :], axis=1)
            else:
                w = tl.where(mask_w, w.to(tl.float32) - mean_w[:, None], 0.0)
        acc = tl.dot(operand, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    if CENTER == 1:
        acc = acc - mean_term[:, None]
    tl.store(dw_ptr + b * stride_db + offs_r[:, None] * stride_dr + offs_n[None, :] * stride_dn,
             (acc * scale).to(dw_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------------------------------------------
# Autotune configs, and which of them a launch may use
# ----------------------------------------------------------------------------------------------------------------

# Each config that fits a target's shared memory compiles for it without register spills
# (python -m fgvc_kernels.compile_report). 128 x 128 tiles are for Hopper; smaller GPUs prune them.
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_1": block_1, "BLOCK_2": block_2, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_1, block_2, block_n, warps, stages in [
        (32, 32, 64, 4, 3), (64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
        (32, 128, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),  # cross only (a few attention maps)
    ]
]
BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_J": block_j}, num_warps=warps, num_stages=stages)
    for block_r, block_n, block_j, warps, stages in [
        (32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 2),
    ]
]
OPTIONS_KEY = ["CENTER", "SQRT_MODE", "NORMALIZE", "batch_bucket", "n_bucket"]
FORWARD_KEY = ["C1", "C2", "stride_xn", "stride_yn", "SELF", *OPTIONS_KEY]
BACKWARD_KEY = ["R", "J", "stride_gj", "stride_wn", "SYMMETRIC", *OPTIONS_KEY]
# Triton adds every tensor argument's dtype to these keys. Layout enters through the position strides (1 for NCHW,
# C for channels-last and tokens) and, in the backward, through which of G and G^T is read.


def forward_shared_bytes(config: triton.Config, dtype: torch.dtype) -> int:
    """Shared memory the forward needs in `config`: the pipelined X and Y tiles, and the output tile that the
    epilogue's layout conversions stage (an upper bound of what Triton allocates; the compile report checks it)."""
    kw = config.kwargs
    operands = config.num_stages * (kw["BLOCK_1"] + kw["BLOCK_2"]) * kw["BLOCK_N"] * dtype.itemsize
    return max(operands, kw["BLOCK_1"] * kw["BLOCK_2"] * 4)


def backward_shared_bytes(config: triton.Config, w_dtype: torch.dtype, gz_bytes: int) -> int:
    """Shared memory the backward needs in `config`: the pipelined W tiles and the g and z tiles that form G
    (`gz_bytes` per element of G: g's bytes, twice in the self case, plus z's). An upper bound of what Triton
    allocates; the compile report checks it."""
    kw = config.kwargs
    w_tiles = kw["BLOCK_J"] * kw["BLOCK_N"] * w_dtype.itemsize
    return config.num_stages * (w_tiles + kw["BLOCK_R"] * kw["BLOCK_J"] * gz_bytes)


def _fits(block: int, channels: int, smallest: int) -> bool:
    """A tile no wider than the padded channel count (or than the smallest any config offers)."""
    return block <= max(smallest, triton.next_power_of_2(channels))


def forward_configs(c1: int, c2: int, self_case: bool, dtype: torch.dtype, target: Target) -> tuple[int, ...]:
    """Indices of the FORWARD_CONFIGS a launch may use: square tiles in the self case, none wider than the channels
    need, and only those that fit the target's shared memory."""
    smallest = min(min(c.kwargs["BLOCK_1"], c.kwargs["BLOCK_2"]) for c in FORWARD_CONFIGS)
    return _kept(FORWARD_CONFIGS, lambda c: (
        (not self_case or c.kwargs["BLOCK_1"] == c.kwargs["BLOCK_2"])
        and _fits(c.kwargs["BLOCK_1"], c1, smallest) and _fits(c.kwargs["BLOCK_2"], c2, smallest)
        and forward_shared_bytes(c, dtype) <= target.shared_bytes))


def backward_configs(rows: int, reduction: int, n: int, w_dtype: torch.dtype, gz_bytes: int,
                     target: Target) -> tuple[int, ...]:
    """Indices of the BACKWARD_CONFIGS a launch may use, by the same rules as the forward's."""
    smallest = {key: min(c.kwargs[key] for c in BACKWARD_CONFIGS) for key in ("BLOCK_R", "BLOCK_N", "BLOCK_J")}
    return _kept(BACKWARD_CONFIGS, lambda c: (
        _fits(c.kwargs["BLOCK_R"], rows, smallest["BLOCK_R"]) and _fits(c.kwargs["BLOCK_N"], n, smallest["BLOCK_N"])
        and _fits(c.kwargs["BLOCK_J"], reduction, smallest["BLOCK_J"])
        and backward_shared_bytes(c, w_dtype, gz_bytes) <= target.shared_bytes))


def _kept(configs: list[triton.Config], keep: Callable[[triton.Config], bool]) -> tuple[int, ...]:
    kept = tuple(index for index, config in enumerate(configs) if keep(config))
    if not kept:
        raise RuntimeError("no bilinear_pool kernel config fits this GPU's shared memory")
    return kept


@functools.cache
def _forward_tuner(indices: tuple[int, ...]) -> triton.runtime.Autotuner:
    return triton.autotune([FORWARD_CONFIGS[i] for i in indices], key=FORWARD_KEY)(_bilinear_forward_kernel)


@functools.cache
def _backward_tuner(indices: tuple[int, ...]) -> triton.runtime.Autotuner:
    return triton.autotune([BACKWARD_CONFIGS[i] for i in indices], key=BACKWARD_KEY)(_bilinear_backward_kernel)


NOT_CENTRED, RANK_ONE, AS_LOADED = 0, 1, 2


def centring(center: bool, operand_dtype: torch.dtype) -> int:
    """How a GEMM centres its operands. 16-bit products are exact in the fp32 accumulator, so X Y^T - N mu_x mu_y^T
    cancels to about 1e-7 E[x y] / cov(x, y), far less than rounding centred values back to 16 bits (5e-4 in fp16),
    and the operands reach the MMA as they are in memory. fp32 operands are rounded to TF32 inside the dot, which
    that cancellation would amplify: they are centred as loaded, staying fp32."""
    if not center:
        return NOT_CENTRED
    return AS_LOADED if operand_dtype == torch.float32 else RANK_ONE


def fp32_dot_precision() -> str:
    """TF32 where torch allows it for fp32 matmuls: the per-backend setting (torch.backends.cuda.matmul.fp32_precision,
    then torch.backends.fp32_precision) when one is set, else torch.get_float32_matmul_precision() ("high" or
    "medium"). The legacy getter raises once the new settings are in use, so it is read only when they are not."""
    for setting in (getattr(torch.backends.cuda.matmul, "fp32_precision", "none"),
                    getattr(torch.backends, "fp32_precision", "none")):
        if setting in ("ieee", "tf32"):
            return setting
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def backward_dot(dtype: torch.dtype) -> tuple[object, str]:
    """(operand dtype, input precision) of the backward GEMM.

    bf16 inputs: G in bf16 (same range as fp32). fp16: G can exceed fp16's range (it carries 1/sqrt(eps) near
    p = 0), so the GEMM takes fp32 operands, in TF32 (whose mantissa equals fp16's). fp32: as torch's matmul
    precision says.
    """
    if dtype == torch.bfloat16:
        return tl.bfloat16, "ieee"
    if dtype == torch.float16:
        return tl.float32, "tf32"
    return tl.float32, fp32_dot_precision()


# ----------------------------------------------------------------------------------------------------------------
# Launch plans
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch: `kernel` is a JITFunction or an autotuner over one; `grid` a tuple or f(meta)."""

    kernel: object
    grid: tuple | Callable[[dict], tuple]
    args: tuple
    constants: dict

    @property
    def configs(self) -> list[triton.Config]:
        """The configs this launch may run in (a plain launch runs in Triton's default)."""
        if isinstance(self.kernel, triton.runtime.Autotuner):
            return self.kernel.configs
        return [triton.Config({}, num_warps=4, num_stages=3)]

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

    def tuned_configs(self) -> list[triton.Config]:
        """Every config some autotuned launch of the plan may pick (each once), for checks that run them all."""
        configs = []
        for launch in self.launches:
            if isinstance(launch.kernel, triton.runtime.Autotuner):
                configs += [config for config in launch.configs if config not in configs]
        return configs


def _channel_means(t: Tensor, center: bool) -> Tensor:
    """Each channel's fp32 mean over positions as a contiguous (B, C), or an empty stand-in the kernels never read."""
    return t.mean(dim=2, dtype=torch.float32).contiguous() if center else t.new_empty(0, dtype=torch.float32)


def _buckets(batch: int, n: int) -> tuple[int, int]:
    return triton.next_power_of_2(batch), triton.next_power_of_2(n)


def forward_plan(x: Tensor, y: Tensor | None, scale: float, sqrt_mode: str, eps: float, normalize: bool,
                 center: bool, out_dtype: torch.dtype | None, target: Target | None = None) -> Plan:
    """The GEMM-with-epilogue launch, then (normalize) the deterministic norm pass. Results: [z, norm]."""
    target = target or Target.of(x.device)
    batch, c1, n = x.shape
    self_case = y is None
    other = x if self_case else y
    c2 = other.shape[1]
    num_slots = triton.cdiv(c1, PARTIAL_TILE) * triton.cdiv(c2, PARTIAL_TILE)
    out = torch.empty((batch, c1, c2), device=x.device, dtype=out_dtype or x.dtype)
    partial = torch.empty((batch, num_slots), device=x.device, dtype=torch.float32)
    tiles = torch.empty((1,), device=x.device, dtype=torch.int32)  # how many partial slots the forward filled
    norm = (torch.empty if normalize else torch.ones)((batch,), device=x.device, dtype=torch.float32)
    mean_x = _channel_means(x, center)
    mean_y = mean_x if self_case else _channel_means(other, center)

    def grid(meta: dict) -> tuple:
        rows, cols = triton.cdiv(c1, meta["BLOCK_1"]), triton.cdiv(c2, meta["BLOCK_2"])
        return (rows * (rows + 1) // 2 if self_case else rows * cols), batch

    precision = fp32_dot_precision() if x.dtype == torch.float32 else "ieee"
    launches = [Launch(
        _forward_tuner(forward_configs(c1, c2, self_case, x.dtype, target)), grid,
        (x, other, mean_x, mean_y, out, partial, tiles, c1, c2, n, num_slots, *x.stride(), *other.stride(), scale,
         eps, math.sqrt(eps), *_buckets(batch, n)),
        dict(SELF=self_case, CENTER=centring(center, x.dtype), SQRT_MODE=SQRT_CODES[sqrt_mode], NORMALIZE=normalize,
             DOT_PRECISION=precision))]
    if not normalize:
        return Plan(launches, [out, norm], [out])
    numel = c1 * c2
    launches.append(Launch(_normalize_kernel, (triton.cdiv(numel, NORMALIZE_BLOCK), batch),
                           (out, partial, tiles, norm, numel, num_slots),
                           dict(BLOCK=NORMALIZE_BLOCK, PARTIAL_BLOCK=PARTIAL_BLOCK)))
    return Plan(launches, [out, norm], [out, norm])


def backward_plan(grad: Tensor, out: Tensor, norm: Tensor, x: Tensor, y: Tensor | None, scale: float,
                  sqrt_mode: str, eps: float, normalize: bool, center: bool, target: Target | None = None) -> Plan:
    target = target or Target.of(x.device)
    """The <z, g> pre-pass, then one GEMM launch per input gradient. Results: [dX] (self) or [dX, dY]. `out` may be
    empty where z is not read (backward_reads_output)."""
    batch, c1, c2 = grad.shape
    n = x.shape[2]
    grad = grad.contiguous()  # autograd may hand over an expanded or transposed gradient
    numel = c1 * c2
    chunks = triton.cdiv(numel, NORMALIZE_BLOCK)
    partial = torch.empty((batch, chunks), device=out.device, dtype=torch.float32)
    launches = []
    if normalize:
        launches.append(Launch(_dot_partials_kernel, (chunks, batch), (out, grad, partial, numel),
                               dict(BLOCK=NORMALIZE_BLOCK)))
    dot_dtype, precision = backward_dot(x.dtype)
    z_bytes = out.element_size() if backward_reads_output(sqrt_mode, normalize) else 0

    def input_grad(like: Tensor, w: Tensor, g_strides: tuple[int, int], symmetric: bool) -> Tensor:
        rows, reduction = like.shape[1], w.shape[1]
        dw = _empty_like_layout(like)
        mean_w = _channel_means(w, center)

        def grid(meta: dict) -> tuple:
            return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(n, meta["BLOCK_N"]), batch

        launches.append(Launch(
            _backward_tuner(backward_configs(rows, reduction, n, w.dtype, gz_bytes(grad, z_bytes, symmetric), target)),
            grid,
            (grad, out, partial, norm, w, mean_w, dw, rows, reduction, n, chunks, *g_strides, *w.stride(),
             *dw.stride(), scale, math.sqrt(eps) if sqrt_mode == "smooth" else 0.0, *_buckets(batch, n)),
            dict(SYMMETRIC=symmetric, CENTER=centring(center, torch.float32 if dot_dtype == tl.float32 else x.dtype),
                 SQRT_MODE=SQRT_CODES[sqrt_mode], NORMALIZE=normalize,
                 DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, PARTIAL_BLOCK=PARTIAL_BLOCK)))
        return dw

    if y is None:
        grads = [input_grad(x, x, (c1, 1), True)]
    else:
        grads = [input_grad(x, y, (c2, 1), False), input_grad(y, x, (1, c2), False)]
    return Plan(launches, grads, [*grads, partial] if normalize else grads)


def gz_bytes(grad: Tensor, z_bytes: int, symmetric: bool) -> int:
    """Bytes of g and z the backward reads per element of G (g twice in the self case; z_bytes 0 where unread)."""
    return grad.element_size() * (2 if symmetric else 1) + z_bytes


def _empty_like_layout(t: Tensor) -> Tensor:
    """An uninitialized (B, C, N) tensor laid out as t is: a (B, C, N) view of (B, N, C) memory when t is one, so the
    gradient of channels-last features or tokens reaches them without a transpose."""
    if t.stride(1) == 1 and t.stride(2) != 1:
        return torch.empty((t.shape[0], t.shape[2], t.shape[1]), device=t.device, dtype=t.dtype).transpose(1, 2)
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)
