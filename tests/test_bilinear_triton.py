"""The Triton kernels of fgvc_kernels.bilinear: parity under TRITON_INTERPRET=1 and compilation for sm_80/sm_90.

Parity runs the same launch plans the op uses on CUDA, with small explicit block sizes so that odd shapes cross tile
borders, and compares with the float64 torch path. Compilation (fgvc_kernels.compile_report) builds what Triton's JIT
would build for the op's real arguments and reads ptxas and cuobjdump: no spills, tensor-core MMA, async copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from fgvc_kernels import bilinear as op  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# Running the kernels needs the interpreter (the default in tests/conftest.py) or a GPU; compiling them needs neither.
needs_kernel_runs = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                       reason="TRITON_INTERPRET=0 was asked for and there is no CUDA device")

SMALL_FORWARD = dict(BLOCK_N=16, num_warps=4, num_stages=2)
SMALL_BACKWARD = dict(BLOCK_R=16, BLOCK_N=16, BLOCK_J=16, num_warps=4, num_stages=2)


def make_inputs(batch: int, c1: int, c2: int, n: int, *, dtype: torch.dtype, layout: str, cross: bool,
                relu: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, N) views as the op receives them: from NCHW ("bcn") or from (B, N, C) tokens ("bnc")."""
    generator = torch.Generator().manual_seed(seed)

    def one(channels: int) -> torch.Tensor:
        t = torch.randn((batch, n, channels) if layout == "bnc" else (batch, channels, n), generator=generator)
        t = (t.relu() if relu else t).to(dtype).to(DEVICE)
        return t.transpose(1, 2) if layout == "bnc" else t

    return one(c1), one(c2) if cross else None


def run_plan(plan: op.Plan, config: dict) -> list[torch.Tensor]:
    for buffer in plan.written:
        buffer.fill_(float("nan"))  # every element must be written by the kernels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter evaluates both sides of tl.where
        return plan.run(config)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def naive_fp32_backward_error(x: torch.Tensor, y: torch.Tensor | None, grad: torch.Tensor, **options) -> float:
    """How far torch's own fp32 autograd of the naive composition lands from float64: the conditioning bound."""
    def grads_of(dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.detach().to("cpu", dtype).requires_grad_() for t in (x, y) if t is not None]
        tokens = [t.transpose(1, 2) for t in inputs]  # the naive function takes (B, N, C)
        out = op.bilinear_pool_naive(*tokens, **options)
        return torch.autograd.grad(out, inputs, grad.to("cpu", dtype).flatten(1))

    return max(relative_error(a, b) for a, b in zip(grads_of(torch.float32), grads_of(torch.float64), strict=True))


PARITY = [
    # (c1, c2, layout, cross, sqrt_mode, relu, normalize)
    (37, 37, "bcn", False, "signed", True, True),
    (37, 21, "bnc", True, "signed", True, True),
    (37, 37, "bnc", False, "smooth", False, True),
    (21, 37, "bcn", True, "signed", False, True),
    (37, 21, "bcn", True, "none", True, False),
    (20, 20, "bnc", False, "none", False, True),
]


@needs_kernel_runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("c1", "c2", "layout", "cross", "sqrt_mode", "relu", "normalize"), PARITY)
def test_kernels_match_float64(dtype, c1, c2, layout, cross, sqrt_mode, relu, normalize) -> None:
    batch, n, eps = 2, 45, 1e-6
    x, y = make_inputs(batch, c1, c2, n, dtype=dtype, layout=layout, cross=cross, relu=relu)
    x[0, 3] = 0  # a dead channel: exact zeros in p, masked in the backward
    options = (1.0 / n, sqrt_mode, eps, normalize)
    z, norm = run_plan(op.forward_plan(x, y, *options, None), SMALL_FORWARD)
    x64, y64 = x.cpu().double(), None if y is None else y.cpu().double()
    z64, norm64 = op._torch_forward(x64, y64, *options, None)
    output_rounding = 1e-6 if dtype == torch.float32 else 1e-3  # fp16 output: half an ulp is 4.9e-4
    assert relative_error(z.cpu(), z64) < output_rounding
    torch.testing.assert_close(norm.cpu().double(), norm64, rtol=1e-6, atol=0)

    grad = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    got = run_plan(op.backward_plan(grad, z, norm, x, y, *options), SMALL_BACKWARD)
    want = op._torch_backward(grad.cpu().double(), z64, norm64, x64, y64, *options)
    errors = [relative_error(a.cpu(), b) for a, b in zip(got, want, strict=True)]
    if dtype == torch.float16:
        bound = 3e-3  # fp16 inputs and outputs
    elif relu:
        bound = 1e-6  # post-ReLU inputs: well conditioned
    else:
        options_by_name = dict(sqrt_mode=sqrt_mode, eps=eps, normalize=normalize)
        bound = 10 * naive_fp32_backward_error(x, y, grad, **options_by_name)
    assert max(errors) < bound, (errors, bound)


@needs_kernel_runs
def test_kernels_are_deterministic() -> None:
    x, y = make_inputs(2, 24, 24, 40, dtype=torch.float32, layout="bcn", cross=True, relu=False)
    options = (1 / 40, "signed", 1e-12, True)

    def once() -> list[torch.Tensor]:
        z, norm = run_plan(op.forward_plan(x, y, *options, None), SMALL_FORWARD)
        grad = torch.ones_like(z)
        return [z, *run_plan(op.backward_plan(grad, z, norm, x, y, *options), SMALL_BACKWARD)]

    for first, second in zip(once(), once(), strict=True):
        assert torch.equal(first, second)


def test_every_config_compiles_without_spills_for_sm80_and_sm90(tmp_path: Path) -> None:
    """Each kernel the op launches for the B-CNN and WS-DAN shapes (bf16, channels-last), in every autotune config,
    built for sm_80 and sm_90 as the JIT would: zero spilled bytes, and the GEMM kernels use tensor-core MMA fed by
    asynchronous copies. Runs in a subprocess: the compiler is unusable while TRITON_INTERPRET=1."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    subprocess.run([sys.executable, "-m", "fgvc_kernels.compile_report", "--scenarios", "bcnn_bf16", "wsdan_bf16",
                    "--json", str(report)], env=env, check=True, capture_output=True)
    rows = json.loads(report.read_text())
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_bilinear_forward_kernel", "_normalize_kernel", "_dot_partials_kernel",
                       "_bilinear_backward_kernel"}
    assert {row["capability"] for row in rows} == {80, 90}
    tuned = [row for row in rows if row["gemm"]]
    assert len(tuned) == 2 * 2 * (len(op.FORWARD_CONFIGS) + len(op.BACKWARD_CONFIGS)) + 2 * len(op.BACKWARD_CONFIGS)
    problems = [row for row in rows if row["spill_store_bytes"] or row["spill_load_bytes"]]
    problems += [row for row in tuned if not (row["mma"] and row["async_copy"])]
    assert not problems, problems
