"""The fused bilinear op's one-shot GPU check: parity, speed, bandwidth and memory, as one command.

    python experiments/bilinear/gpu_check.py --out experiments/bilinear/results/gpu.md   # one H200, under 5 minutes
    python experiments/bilinear/gpu_check.py --dry-run                                    # CPU, Triton's interpreter

1. Kernel parity against the float64 torch path, forward and backward: fp32 (IEEE and TF32) / bf16 / fp16 x self /
   cross / centred x NCHW / channels-last / (B, N, C) tokens, each in every autotune config the GPU keeps (run
   explicitly, so a pass does not depend on which config the tuner picks). The cases run in parallel processes,
   which also compile the kernels into Triton's cache for the later phases.
2. Op parity through torch.ops + autograd (every case) and torch.compile(fullgraph=True) (each dtype x case).
3. Forward + backward time at B = 64, bf16, for B-CNN, WS-DAN and iSQRT shapes: the op, the eager naive
   composition, torch.compile of it, and the bare bmm floor (the GEMMs alone), interleaved round by round; achieved
   HBM bandwidth of the op's minimal traffic against the roofline; bytes held for backward.

Tolerances (shared/REFERENCE.md section 4): each case's relative error (max |error| / max |reference|) must stay
within its dtype's rounding floor plus 10 x how far torch's own fp32 naive composition lands from float64 on the
same inputs (the gradient is ill-conditioned near p = 0 on sign-indefinite features). --dry-run runs the same phases
at tiny shapes on the CPU (bf16 kernels excepted: the interpreter's bf16 tl.dot is broken), to prove the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # Triton reads this when it is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import emit, header  # noqa: E402

from fgvc_kernels import bilinear_pool, bilinear_torch  # noqa: E402
from fgvc_kernels.bilinear import produced_dtype  # noqa: E402
from fgvc_kernels.bilinear_torch import backward_reads_output  # noqa: E402
from fgvc_kernels.testing import (  # noqa: E402
    bilinear_pool_naive,
    naive_fp32_errors,
    relative_error,
    saved_tensor_bytes,
)

DEVICE = "cpu" if DRY_RUN else "cuda"


@dataclass(frozen=True)
class Precision:
    """An input dtype, with torch's float32 matmul precision for fp32 ("high" lets the kernels use TF32), and the
    rounding floor of its tolerance."""

    name: str
    dtype: torch.dtype
    floor: float
    matmul: str = "highest"


PRECISIONS = [Precision("float32", torch.float32, 1e-6), Precision("tf32", torch.float32, 5e-3, "high"),
              Precision("bfloat16", torch.bfloat16, 2e-2), Precision("float16", torch.float16, 3e-3)]
CASES = ["self", "cross", "centred"]
LAYOUTS = ["nchw", "channels_last", "tokens"]
# Parity shapes cross 128-wide tiles and leave ragged edges: (B, C1, C2, H, W).
PARITY_SHAPE = (2, 40, 24, 4, 5) if DRY_RUN else (2, 160, 72, 13, 15)
# Timing shapes: name -> (B, C1, C2 or None for self, N, options)
TIMING = {
    "B-CNN (C 512, N 784)": (64, 512, None, 784, {}),
    "WS-DAN (32 maps x 768, N 676)": (64, 32, 768, 676, {}),
    "iSQRT (C 256, N 784, centred)": (64, 256, None, 784, dict(center=True, sqrt_mode="none", normalize=False,
                                                               out_dtype=torch.float32)),
}
TIMING_BATCH = 2 if DRY_RUN else 64
H200_HBM_BYTES_PER_S = 4.8e12  # H200 SXM HBM3e, the vendor's peak
H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak


def features(dtype: torch.dtype, layout: str, batch: int, channels: int, height: int, width: int, *, relu: bool,
             seed: int) -> torch.Tensor:
    """Features as a model hands them over: NCHW, channels-last NCHW, or (B, N, C) tokens."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, channels, height, width, generator=generator)
    t = (t.relu() if relu else t).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "tokens":
        t = t.flatten(2).transpose(1, 2).contiguous()
    return t.to(DEVICE)


def case_inputs(dtype: torch.dtype, case: str, layout: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(x, y, options) of one parity case, on post-ReLU features as models hand them over (their positive means are
    what makes centring cancel)."""
    batch, c1, c2, height, width = PARITY_SHAPE
    x = features(dtype, layout, batch, c1, height, width, relu=True, seed=0)
    y = features(dtype, layout, batch, c2, height, width, relu=True, seed=1) if case == "cross" else None
    options = dict(center=True, sqrt_mode="none", normalize=False) if case == "centred" else {}
    return x, y, dict(sqrt_mode="signed", normalize=True, center=False) | options


@dataclass
class Parity:
    """One parity row: the worst relative errors over the configs (or paths) tried, and the bounds."""

    name: str
    runs: int
    forward: float
    backward: float
    forward_bound: float
    backward_bound: float

    @property
    def passed(self) -> bool:
        return self.forward <= self.forward_bound and self.backward <= self.backward_bound

    def row(self) -> str:
        return (f"| {self.name} | {self.runs} | {self.forward:.1e} / {self.forward_bound:.1e} | "
                f"{self.backward:.1e} / {self.backward_bound:.1e} | {'pass' if self.passed else '**FAIL**'} |")


@contextmanager
def matmul_precision(setting: str):
    """torch's float32 matmul precision for the duration of one case."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def bounds(precision: Precision, x, y, grad, options) -> tuple[float, float]:
    forward, backward = naive_fp32_errors(x, y, grad, **options)
    return precision.floor + 10 * forward, precision.floor + 10 * backward


def kernel_parity(job: tuple[Precision, str, str]) -> Parity:
    """Phase 1, one case: the launch plans in every kept config against the float64 torch path."""
    precision, case, layout = job
    with matmul_precision(precision.matmul):
        return _kernel_parity(precision, case, layout)


def _kernel_parity(precision: Precision, case: str, layout: str) -> Parity:
    from fgvc_kernels import bilinear_triton as kernels
    from fgvc_kernels.bilinear import channels_by_positions

    dtype = precision.dtype
    x, y, options = case_inputs(dtype, case, layout)
    xs, ys = channels_by_positions(x, "x"), None if y is None else channels_by_positions(y, "y")
    target = kernels.TARGETS[90] if DRY_RUN else None  # the interpreter plans as for an H200
    args = (1.0 / xs.shape[2], options["sqrt_mode"], 1e-12, options["normalize"], options["center"])
    out_dtype = produced_dtype(dtype, True, options["sqrt_mode"], options["normalize"], False)  # as the op plans it
    grad = torch.randn((xs.shape[0], xs.shape[1], (ys if ys is not None else xs).shape[1]),
                       generator=torch.Generator().manual_seed(2)).to(DEVICE, out_dtype)  # as autograd hands it over
    x64, y64 = xs.double().cpu(), None if ys is None else ys.double().cpu()
    z64, norm64 = bilinear_torch.torch_forward(x64, y64, *args, None)
    want = bilinear_torch.torch_backward(grad.double().cpu(), z64, norm64, x64, y64, *args)
    forward_plan = kernels.forward_plan(xs, ys, *args, out_dtype, target)
    forward_errors, backward_errors = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter evaluates both sides of tl.where
        for config in forward_plan.tuned_configs():
            z, norm = forward_plan.run(config.all_kwargs())
            forward_errors.append(relative_error(z, z64))
        backward_plan = kernels.backward_plan(grad, z, norm, xs, ys, *args, target)
        for config in backward_plan.tuned_configs():
            got = backward_plan.run(config.all_kwargs())
            backward_errors.append(max(relative_error(a, b) for a, b in zip(got, want, strict=True)))
    return Parity(f"{precision.name} {case} {layout}", len(forward_errors) + len(backward_errors),
                  max(forward_errors), max(backward_errors), *bounds(precision, x, y, grad, options))


def op_parity(precision: Precision, case: str, layout: str, compiled: bool) -> Parity:
    """Phase 2, one case: the public op through torch.ops and autograd (optionally torch.compile) vs float64."""
    with matmul_precision(precision.matmul):
        return _op_parity(precision, case, layout, compiled)


def _op_parity(precision: Precision, case: str, layout: str, compiled: bool) -> Parity:
    x, y, options = case_inputs(precision.dtype, case, layout)
    inputs = [t.requires_grad_() for t in (x, y) if t is not None]
    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return bilinear_pool(*tensors, **options)

    if compiled:
        torch._dynamo.reset()
    out = (torch.compile(fn, fullgraph=True) if compiled else fn)(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    reference = [t.detach().cpu().double().requires_grad_() for t in inputs]
    want_out = bilinear_pool_naive(*reference, **options)
    want = torch.autograd.grad(want_out, reference, grad.cpu().double())
    name = f"{precision.name} {case} {layout}{' compiled' if compiled else ''}"
    return Parity(name, 1, relative_error(out, want_out),
                  max(relative_error(a, b) for a, b in zip(got, want, strict=True)),
                  *bounds(precision, x, y, grad, options))


def warm_timing_shape(name: str) -> str:
    """Phase 1 side job: autotune the op once at a timing shape, so its kernels are in Triton's cache."""
    step, _, _ = timing_contenders(name)["fused"]
    step()
    return name


# ----------------------------------------------------------------------------------------------------------------
# Phase 3: speed, bandwidth, memory
# ----------------------------------------------------------------------------------------------------------------


def timing_inputs(name: str) -> tuple[list[torch.Tensor], dict]:
    _, c1, c2, n, options = TIMING[name]
    side = int(n ** 0.5)  # 784 = 28 x 28, 676 = 26 x 26
    x = features(torch.bfloat16, "channels_last", TIMING_BATCH, c1, side, n // side, relu=True, seed=0)
    y = None if c2 is None else features(torch.bfloat16, "channels_last", TIMING_BATCH, c2, side, n // side,
                                         relu=True, seed=1)
    return [t.requires_grad_() for t in (x, y) if t is not None], options


def timing_contenders(name: str) -> dict:
    """name -> (one forward + backward step, the inputs, the bytes held for backward)."""
    inputs, options = timing_inputs(name)
    naive_options = {key: value for key, value in options.items() if key != "out_dtype"}
    upstream = None

    def step_of(pool):
        def step() -> None:
            nonlocal upstream
            out = pool(*inputs)
            upstream = torch.ones_like(out) if upstream is None else upstream
            torch.autograd.backward(out, upstream)
            for t in inputs:
                t.grad = None
        return step

    fused = lambda *t: bilinear_pool(*t, **options)  # noqa: E731
    naive = lambda *t: bilinear_pool_naive(*t, **naive_options)  # noqa: E731
    compiled = torch.compile(naive, fullgraph=True, dynamic=False)  # each shape its own static kernels
    flat = [t.detach().flatten(2) if t.dim() == 4 else t.detach().transpose(1, 2) for t in inputs]
    other = flat[-1]

    def floor() -> None:  # the GEMMs alone: X Y^T forward, one (self) or two (cross) GEMMs backward
        with torch.no_grad():
            p = torch.bmm(flat[0], other.transpose(1, 2))
            torch.bmm(p, other)
            if len(flat) == 2:
                torch.bmm(p.transpose(1, 2), flat[0])

    return {"fused": (step_of(fused), inputs, fused), "naive": (step_of(naive), inputs, naive),
            "compiled": (step_of(compiled), inputs, compiled), "floor": (floor, inputs, None)}


def timed(fn) -> float:
    if DEVICE == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def minimal_traffic(name: str) -> tuple[float, float]:
    """(bytes, flops) the op cannot avoid, forward + backward: read the inputs, write z; read g, z (where the
    backward needs it) and the inputs, write their gradients. FLOPs: the forward GEMM (half of it in the self case)
    and one GEMM per input gradient."""
    _, c1, c2, n, options = TIMING[name]
    reads_z = backward_reads_output(options.get("sqrt_mode", "signed"), options.get("normalize", True))
    out_bytes = 4 if options.get("out_dtype") == torch.float32 else 2
    channels = c1 + (c2 or 0)
    pairs = c1 * (c2 or c1)
    inputs = TIMING_BATCH * channels * n * 2
    outputs = TIMING_BATCH * pairs * out_bytes
    bytes_moved = inputs + outputs + (outputs + (outputs if reads_z else 0) + inputs + inputs)
    gemm = 2 * TIMING_BATCH * pairs * n
    flops = gemm * (0.5 if c2 is None else 1) + gemm * (1 if c2 is None else 2)
    return bytes_moved, flops


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write): the HBM bandwidth this GPU reaches."""
    source = torch.empty(1 << 30, dtype=torch.uint16, device=DEVICE)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = min(timed(lambda: target.copy_(source)) for _ in range(5))
    return 2 * source.numel() * source.element_size() / seconds


def speed_rows(rounds: int) -> list[str]:
    bandwidth = copy_bandwidth() if DEVICE == "cuda" else None
    rows = []
    for name in TIMING:
        contenders = timing_contenders(name)
        for step, _, _ in contenders.values():
            step()  # compile, autotune, warm up
            step()
        times = {key: [] for key in contenders}
        for _ in range(rounds):
            for key, (step, _, _) in contenders.items():
                times[key].append(timed(step))
        ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
        ratio = {key: statistics.median(a / b for a, b in zip(times[key], times["fused"], strict=True))
                 for key in ("naive", "compiled")}
        bytes_moved, flops = minimal_traffic(name)
        seconds = ms["fused"] / 1000
        achieved = bytes_moved / seconds
        roofline_seconds = max(bytes_moved / H200_HBM_BYTES_PER_S, flops / H200_BF16_FLOPS)
        _, inputs, fused = contenders["fused"]
        held = {key: saved_tensor_bytes(contenders[key][2], *inputs) / 2**20 for key in ("fused", "naive")}
        gpu = (f"{achieved / 1e12:.2f} TB/s ({achieved / bandwidth:.0%} of copy) | {roofline_seconds / seconds:.0%}"
               if bandwidth else "- | -")
        rows.append(f"| {name} | {ms['fused']:.3f} | {ms['naive']:.3f} | {ms['compiled']:.3f} | {ms['floor']:.3f} | "
                    f"{ratio['naive']:.2f}x | {ratio['compiled']:.2f}x | {gpu} | {held['fused']:.1f} MiB | "
                    f"{held['naive']:.1f} MiB |")
    if bandwidth:
        rows += ["", f"Copy bandwidth measured here: {bandwidth / 1e12:.2f} TB/s; roofline: max(minimal bytes / "
                 f"{H200_HBM_BYTES_PER_S / 1e12:.1f} TB/s, FLOPs / {H200_BF16_FLOPS / 1e12:.0f} TFLOPS)."]
    return rows


# ----------------------------------------------------------------------------------------------------------------


def parity_jobs() -> list[tuple[Precision, str, str]]:
    kernel_precisions = [p for p in PRECISIONS if not (DRY_RUN and p.dtype == torch.bfloat16)]
    return [(precision, case, layout) for precision in kernel_precisions for case in CASES for layout in LAYOUTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workers", type=int, default=2 if DRY_RUN else min(16, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=2 if DRY_RUN else 30)
    args = parser.parse_args()
    if not DRY_RUN and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (or --dry-run)")
    started = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            warming = [pool.submit(warm_timing_shape, name) for name in TIMING]
            kernel_rows = list(pool.map(kernel_parity, parity_jobs()))
            for future in warming:
                future.result()
    else:
        kernel_rows = [kernel_parity(job) for job in parity_jobs()]
    op_rows = [op_parity(p, case, layout, False) for p in PRECISIONS for case in CASES for layout in LAYOUTS]
    op_rows += [op_parity(p, case, "channels_last", True) for p in PRECISIONS for case in CASES]
    speed = speed_rows(args.rounds)
    everything = kernel_rows + op_rows
    device = "dry run on the CPU (Triton interpreter)" if DRY_RUN else torch.cuda.get_device_name()
    lines = [*header("The fused bilinear op on a GPU: parity, speed, bandwidth, memory"),
             f"Device: {device}; triton {_triton_version()}; {time.perf_counter() - started:.0f} s in all.", "",
             f"Parity: {sum(r.passed for r in everything)} of {len(everything)} rows pass. Shapes "
             f"(B, C1, C2, H, W) = {PARITY_SHAPE}; errors are max |error| / max |float64|, shown as error / bound.", "",
             "Kernels, each case in every autotune config the GPU keeps:", "",
             "| case | runs | forward | backward | |", "|---|---:|---:|---:|---|", *(r.row() for r in kernel_rows),
             "", "The op through torch.ops + autograd, and torch.compile(fullgraph=True):", "",
             "| case | runs | forward | backward | |", "|---|---:|---:|---:|---|", *(r.row() for r in op_rows),
             "", f"Forward + backward, bf16 channels-last, B = {TIMING_BATCH}, median of {args.rounds} interleaved "
             "rounds (ms):", "",
             "| shape | op | eager naive | compiled naive | bmm floor | naive / op | compiled / op | achieved "
             "bandwidth | of roofline | held for backward: op | naive |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *speed, "",
             "Targets: B-CNN naive / op >= 3x and compiled / op >= 1.5x; >= 70% of the roofline; every parity row "
             "passes.", ""]
    emit(lines, args.out)
    if not all(r.passed for r in everything):
        sys.exit("parity failed")


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
