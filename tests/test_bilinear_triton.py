"""The Triton kernels of fgvc_kernels.bilinear: parity under TRITON_INTERPRET=1, the autotune key and pruning, and
compilation for real GPUs.

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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fgvc_kernels import bilinear_torch  # noqa: E402
from fgvc_kernels import bilinear_triton as op  # noqa: E402
from fgvc_kernels.bilinear import saved_dtype  # noqa: E402
from fgvc_kernels.testing import naive_fp32_errors, relative_error  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# Running the kernels needs the interpreter (the default in tests/conftest.py) or a GPU; compiling them needs neither.
needs_kernel_runs = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                       reason="TRITON_INTERPRET=0 was asked for and there is no CUDA device")
HOPPER = op.TARGETS[90]  # what plans are made for in the interpreter (it decides TF32 and which configs fit)

SMALL_FORWARD = dict(BLOCK_1=16, BLOCK_2=16, BLOCK_N=16, num_warps=4, num_stages=2)
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


def float64_reference(x, y, grad, options):
    x64, y64 = x.cpu().double(), None if y is None else y.cpu().double()
    z64, norm64 = bilinear_torch.torch_forward(x64, y64, *options, None)
    return z64, norm64, bilinear_torch.torch_backward(grad.cpu().double(), z64, norm64, x64, y64, *options)


PARITY = [
    # (c1, c2, layout, cross, sqrt_mode, relu, normalize, center)
    (37, 37, "bcn", False, "signed", True, True, False),
    (37, 21, "bnc", True, "signed", True, True, False),
    (37, 37, "bnc", False, "smooth", False, True, False),
    (21, 37, "bcn", True, "signed", False, True, False),
    (37, 21, "bcn", True, "none", True, False, False),
    (20, 20, "bnc", False, "none", False, True, False),
    (37, 37, "bnc", False, "none", True, False, True),  # iSQRT-COV's covariance
    (21, 37, "bcn", True, "signed", True, True, True),
]


@needs_kernel_runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("c1", "c2", "layout", "cross", "sqrt_mode", "relu", "normalize", "center"), PARITY)
def test_kernels_match_float64(dtype, c1, c2, layout, cross, sqrt_mode, relu, normalize, center) -> None:
    batch, n, eps = 2, 45, 1e-6
    x, y = make_inputs(batch, c1, c2, n, dtype=dtype, layout=layout, cross=cross, relu=relu)
    x[0, 3] = 0  # a dead channel: exact zeros in p, masked in the backward
    options = (1.0 / n, sqrt_mode, eps, normalize, center)
    z, norm = run_plan(op.forward_plan(x, y, *options, saved_dtype(dtype), HOPPER), SMALL_FORWARD)
    grad = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    z64, norm64, want = float64_reference(x, y, grad, options)
    x_tokens, y_tokens = (None if t is None else t.transpose(1, 2) for t in (x, y))  # as bilinear_pool takes them
    fp32_forward, fp32_backward = naive_fp32_errors(x_tokens, y_tokens, grad, sqrt_mode=sqrt_mode, eps=eps,
                                                    normalize=normalize, center=center)
    if dtype == torch.float16:
        output_bound, bound = 1e-3, 3e-3  # fp16 inputs and outputs: half an ulp is 4.9e-4
    elif relu and not center:
        output_bound, bound = 1e-6, 1e-6  # post-ReLU inputs: well conditioned (centring makes them sign-indefinite)
    else:
        output_bound, bound = max(1e-6, 10 * fp32_forward), 10 * fp32_backward
    assert relative_error(z.cpu(), z64) < output_bound
    torch.testing.assert_close(norm.cpu().double(), norm64, rtol=max(output_bound, 1e-6), atol=0)

    got = run_plan(op.backward_plan(grad, z, norm, x, y, *options, HOPPER), SMALL_BACKWARD)
    assert [g.stride() for g in got] == [t.stride() for t in (x, y) if t is not None]  # laid out as the inputs
    errors = [relative_error(a.cpu(), b) for a, b in zip(got, want, strict=True)]
    assert max(errors) < bound, (errors, bound)


@needs_kernel_runs
def test_fp16_gradients_keep_the_entries_fp16_cannot_hold() -> None:
    """Entries of z below fp16's normal range (p small but not zero) carry the largest gradients, 1 / (2 |sigma|).
    The op keeps z in fp32 for fp16 inputs, so the channel made of them gets its fp32 gradient; an fp16 z would
    round them to subnormals or zero (masked) and lose it."""
    generator = torch.Generator().manual_seed(3)
    n, eps = 24, 1e-12
    x = (torch.randn(1, 6, n, generator=generator).relu() * 3000).half()  # large features: a large norm d
    y = (torch.randn(1, 5, n, generator=generator).relu() * 3000).half()
    x[0, 0] = torch.rand(n, generator=generator).half() * 2e-7  # fp16 subnormals
    y[0, 0] = torch.rand(n, generator=generator).half() * 1e-5
    x, y = x.to(DEVICE), y.to(DEVICE)
    options = (1.0 / n, "signed", eps, True, False)
    z, norm = run_plan(op.forward_plan(x, y, *options, saved_dtype(torch.float16), HOPPER), SMALL_FORWARD)
    tiny = (z[0, 0].abs() < 6e-5) & (z[0, 0] != 0)
    assert tiny.all() and z.dtype == torch.float32  # the whole first row lies below fp16's normal range
    assert (z[0, 0].half() == 0).any()  # and fp16 would even round some of it to zero
    grad = torch.randn(z.shape, generator=generator).to(DEVICE)
    _, _, (want_x, want_y) = float64_reference(x, y, grad, options)

    def first_channel_error(z_read: torch.Tensor) -> float:
        got_x, _ = run_plan(op.backward_plan(grad, z_read, norm, x, y, *options, HOPPER), SMALL_BACKWARD)
        return relative_error(got_x[0, 0].cpu(), want_x[0, 0])

    bound = 3e-3  # as for every fp16 gradient
    assert first_channel_error(z) < bound
    assert first_channel_error(z.half()) > 3 * bound  # what reading an fp16 z would cost there


@needs_kernel_runs
def test_kernels_are_deterministic() -> None:
    x, y = make_inputs(2, 24, 24, 40, dtype=torch.float32, layout="bcn", cross=True, relu=False)
    options = (1 / 40, "signed", 1e-12, True, False)

    def once() -> list[torch.Tensor]:
        z, norm = run_plan(op.forward_plan(x, y, *options, None, HOPPER), SMALL_FORWARD)
        grad = torch.ones_like(z)
        return [z, *run_plan(op.backward_plan(grad, z, norm, x, y, *options, HOPPER), SMALL_BACKWARD)]

    for first, second in zip(once(), once(), strict=True):
        assert torch.equal(first, second)


@triton.jit
def _triangle_probe(rows_ptr, cols_ptr, tiles):
    index = tl.program_id(0)
    row, col = op._upper_triangle_tile(index, tiles)
    tl.store(rows_ptr + index, row)
    tl.store(cols_ptr + index, col)


@needs_kernel_runs
@pytest.mark.parametrize("tiles", [1, 2, 3, 7, 32, 97])
def test_self_case_launches_each_upper_triangle_tile_once(tiles: int) -> None:
    count = tiles * (tiles + 1) // 2
    rows, cols = (torch.full((count,), -1, dtype=torch.int32, device=DEVICE) for _ in range(2))
    _triangle_probe[(count,)](rows, cols, tiles)
    assert [(r, c) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)] == \
        [(r, c) for r in range(tiles) for c in range(r, tiles)]


def tuning_key(launch: op.Launch) -> tuple:
    """The autotune key Triton computes for a launch: the named arguments, then every tensor argument's dtype."""
    named = dict(zip(launch.kernel.arg_names, launch.args, strict=False)) | launch.constants
    return (*(named[name] for name in launch.kernel.keys),
            *(str(value.dtype) for value in named.values() if isinstance(value, torch.Tensor)))


def planned_keys(*, n: int = 784, dtype=torch.bfloat16, cross=False, center=False, sqrt_mode="signed",
                 channels_last=True, c: int = 512) -> list[tuple]:
    """The keys of the tuned launches (forward GEMM, backward GEMMs) for one call, planned on the meta device."""
    def features(channels: int) -> torch.Tensor:
        if channels_last:
            return torch.empty(2, n, channels, dtype=dtype, device="meta").transpose(1, 2)
        return torch.empty(2, channels, n, dtype=dtype, device="meta")

    x, y = features(c), features(c // 2) if cross else None
    options = (1.0 / n, sqrt_mode, 1e-12, True, center)
    forward = op.forward_plan(x, y, *options, None, HOPPER)
    z, norm = forward.results
    backward = op.backward_plan(torch.empty_like(z), z, norm, x, y, *options, HOPPER)
    return [tuning_key(launch) for launch in forward.launches + backward.launches
            if isinstance(launch.kernel, triton.runtime.Autotuner)]


def test_autotune_key_buckets_n_and_separates_what_changes_the_best_config() -> None:
    reference = planned_keys()
    assert planned_keys(n=700) == reference  # the same power-of-two bucket: tuned once
    variants = [dict(n=400), dict(dtype=torch.float16), dict(cross=True), dict(center=True), dict(sqrt_mode="none"),
                dict(channels_last=False), dict(c=256)]
    for variant in variants:
        keys = planned_keys(**variant)
        assert keys[0] != reference[0] and keys[-1] != reference[-1], variant


def test_configs_are_pruned_by_shared_memory_tile_shape_and_channels() -> None:
    every = range(len(op.FORWARD_CONFIGS))
    square = {i for i in every if op.FORWARD_CONFIGS[i].kwargs["BLOCK_1"] == op.FORWARD_CONFIGS[i].kwargs["BLOCK_2"]}
    hopper_self = op.forward_configs(512, 512, True, torch.bfloat16, HOPPER)
    assert set(hopper_self) == square  # every square tile fits Hopper, 128 x 128 included
    assert any(op.FORWARD_CONFIGS[i].kwargs["BLOCK_1"] == 128 for i in hopper_self)
    for target in op.TARGETS.values():
        for dtype in (torch.float32, torch.bfloat16):
            for i in op.forward_configs(512, 512, False, dtype, target):
                assert op.forward_shared_bytes(op.FORWARD_CONFIGS[i], dtype) <= target.shared_bytes
            gz_bytes = 3 * dtype.itemsize  # g twice (self case) and z
            for i in op.backward_configs(512, 512, 784, dtype, gz_bytes, target):
                assert op.backward_shared_bytes(op.BACKWARD_CONFIGS[i], dtype, gz_bytes) <= target.shared_bytes
    ampere_fp32 = op.forward_configs(512, 512, False, torch.float32, op.TARGETS[86])  # 99 KB
    assert 0 < len(ampere_fp32) < len(op.forward_configs(512, 512, False, torch.float32, HOPPER))
    wsdan = op.forward_configs(32, 768, False, torch.bfloat16, HOPPER)  # 32 attention maps
    assert wsdan and all(op.FORWARD_CONFIGS[i].kwargs["BLOCK_1"] == 32 for i in wsdan)
    tiny = op.forward_configs(5, 5, True, torch.float32, op.TARGETS[86])
    assert tiny and all(op.FORWARD_CONFIGS[i].kwargs["BLOCK_1"] == 32 for i in tiny)


def test_every_kept_config_compiles_for_every_target_within_its_shared_memory(tmp_path: Path) -> None:
    """Each kernel the op launches for the B-CNN shape (bf16, channels-last) and the iSQRT shape (fp16, centred), in
    every autotune config kept for a target, built as the JIT would for sm_80, sm_86 and sm_90: zero spilled bytes,
    shared memory within the target's and within the estimate that pruned the configs, and the GEMM kernels on
    tensor-core MMA fed by asynchronous copies. On sm_75 Triton's dot is no MMA, which is why the op leaves Turing to
    cuBLAS. Runs in a subprocess: the compiler is unusable while TRITON_INTERPRET=1."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    subprocess.run([sys.executable, "-m", "fgvc_kernels.compile_report", "--scenarios", "bcnn_bf16", "isqrt_fp16",
                    "--targets", "80", "86", "90", "--json", str(report)], env=env, check=True, capture_output=True)
    results = json.loads(report.read_text())
    rows = results["rows"]
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_bilinear_forward_kernel", "_normalize_kernel", "_dot_partials_kernel",
                       "_bilinear_backward_kernel"}
    assert {(row["scenario"], row["capability"]) for row in rows} == {
        (scenario, capability) for scenario in ("bcnn_bf16", "isqrt_fp16") for capability in (80, 86, 90)}
    tuned = [row for row in rows if row["gemm"]]
    assert {row["config"]["BLOCK_1"] for row in tuned if row["capability"] == 90 and "BLOCK_1" in row["config"]} == \
        {32, 64, 128}
    problems = [row for row in rows if row["spill_store_bytes"] or row["spill_load_bytes"]]
    problems += [row for row in rows if row["shared_bytes"] > op.TARGETS[row["capability"]].shared_bytes]
    problems += [row for row in tuned if row["shared_bytes"] > row["estimated_shared_bytes"]]
    problems += [row for row in tuned if not (row["mma"] and row["async_copy"])]
    assert not problems, problems
    assert not results["turing"]["mma"]  # if a Triton release brings MMA to sm_75, route Turing to the kernels


def test_gpu_check_dry_run_proves_the_script(tmp_path: Path) -> None:
    """The one-shot GPU check runs end to end on the CPU (interpreter, tiny shapes) and writes its table."""
    out = tmp_path / "gpu.md"
    script = Path(__file__).resolve().parents[1] / "experiments" / "bilinear" / "gpu_check.py"
    subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(out)], check=True, capture_output=True)
    table = out.read_text()
    kernel_cases = 3 * 3 * 3  # fp32, TF32 and fp16 (the interpreter's bf16 dot is broken) x cases x layouts
    op_cases = 4 * 3 * 3 + 4 * 3  # eager: precisions x cases x layouts; compiled: precisions x cases
    assert f"Parity: {kernel_cases + op_cases} of {kernel_cases + op_cases} rows pass" in table
    assert all(f"| {shape}" in table for shape in ("B-CNN", "WS-DAN", "iSQRT"))
