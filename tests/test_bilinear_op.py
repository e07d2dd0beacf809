"""fgvc_kernels.bilinear_pool on the torch path (CPU): exact math, gradients, memory, registration."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fgvc_kernels import SQRT_MODES, BilinearPool, bilinear_pool, bilinear_torch
from fgvc_kernels.bilinear import runs_triton
from fgvc_kernels.testing import bilinear_pool_naive, saved_tensor_bytes

CASES = [(mode, cross, center) for mode in SQRT_MODES for cross in (False, True) for center in (False, True)]


def features(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, ...]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize(("sqrt_mode", "cross", "center"), CASES)
def test_gradcheck_float64(sqrt_mode: str, cross: bool, center: bool) -> None:
    x = features(2, 5, 3, 3)
    y = features(2, 3, 3, 3, seed=1) if cross else None
    inputs = (x, y) if cross else (x,)

    def op(*tensors: torch.Tensor) -> torch.Tensor:
        return bilinear_pool(*tensors, sqrt_mode=sqrt_mode, center=center, eps=1e-6)

    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize(("normalize", "recompute", "tokens"), [(False, False, False), (True, True, True)])
def test_gradcheck_options(normalize: bool, recompute: bool, tokens: bool) -> None:
    shape = (2, 7, 4) if tokens else (2, 4, 1, 7)  # (B, N, C) tokens or a 1 x 7 map
    x = features(*shape)
    assert torch.autograd.gradcheck(
        lambda t: bilinear_pool(t, normalize=normalize, recompute=recompute, scale=0.3, eps=1e-6), (x,))


# 400 bytes: the epilogues run sample by sample (self, 6 x 6 float64) or over blocks of two and one (cross, 6 x 4).
@pytest.mark.parametrize("block_bytes", [None, 400], ids=["one block", "several blocks"])
@pytest.mark.parametrize(("sqrt_mode", "cross", "center"), CASES)
def test_matches_naive_composition_with_dead_channel_and_zero_sample(sqrt_mode: str, cross: bool, center: bool,
                                                                     block_bytes: int | None, monkeypatch) -> None:
    if block_bytes is not None:
        monkeypatch.setattr(bilinear_torch, "EPILOGUE_BLOCK_BYTES", block_bytes)
    x = features(3, 6, 5, 3).detach()
    x[0, 2] = 0.0  # a dead channel: its row and column of X X^T are exactly zero
    x[1] = 0.0  # an all-zero sample: the 1e-12 clamp must keep it finite
    x.requires_grad_()
    y = features(3, 4, 5, 3, seed=2) if cross else None
    inputs = [x] if y is None else [x, y]
    kwargs = dict(sqrt_mode=sqrt_mode, center=center)
    out, expected = bilinear_pool(x, y, **kwargs), bilinear_pool_naive(x, y, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads(out, inputs), grads(expected, inputs), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert out[1].abs().sum() == 0


def test_layouts_give_one_result() -> None:
    x = features(2, 6, 4, 5)
    reference = bilinear_pool(x)
    channels_last = bilinear_pool(x.detach().contiguous(memory_format=torch.channels_last))
    tokens = bilinear_pool(x.detach().flatten(2).transpose(1, 2).contiguous())  # (B, N, C)
    torch.testing.assert_close(channels_last, reference, rtol=1e-13, atol=0)
    torch.testing.assert_close(tokens, reference, rtol=1e-13, atol=0)
    assert reference.shape == (2, 36)


def test_cross_shape_and_scale_cancels_except_through_eps() -> None:
    x, y = features(2, 5, 4, 4).detach(), features(2, 3, 4, 4, seed=3).detach()
    assert bilinear_pool(x, y).shape == (2, 15)
    torch.testing.assert_close(bilinear_pool(x, y, scale=1.0, eps=0.0), bilinear_pool(x, y, scale=7.0, eps=0.0))
    assert not torch.allclose(bilinear_pool(x, y, scale=1e-8, eps=1e-6), bilinear_pool(x, y, scale=1.0, eps=1e-6))


def test_center_is_covariance_pooling() -> None:
    x = features(2, 4, 3, 5).detach()
    flat = x.flatten(2)
    centered = flat - flat.mean(2, keepdim=True)
    covariance = centered @ centered.transpose(1, 2) / flat.shape[2]
    out = bilinear_pool(x, center=True, sqrt_mode="none", normalize=False)
    torch.testing.assert_close(out, covariance.flatten(1), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype: torch.dtype) -> None:
    x = (features(2, 8, 6, 6, dtype=torch.float32).detach() * 30).relu()  # x x^T would overflow fp16 unscaled
    x_low = x.to(dtype)
    out = bilinear_pool(x_low)
    assert out.dtype == dtype
    expected = bilinear_pool_naive(x_low.double())
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())
    wide = bilinear_pool(x_low, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide.double(), expected, rtol=1e-6, atol=1e-7)


def test_deterministic_outputs_and_gradients() -> None:
    def run() -> tuple[torch.Tensor, ...]:
        x, y = features(4, 16, 7, 7, dtype=torch.float32), features(4, 8, 7, 7, seed=5, dtype=torch.float32)
        out = bilinear_pool(x, y, sqrt_mode="smooth")
        return (out, *grads(out, [x, y]))

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_memory_held_for_backward() -> None:
    x = features(2, 32, 8, 8, dtype=torch.float32)
    output_bytes = 2 * 32 * 32 * 4
    fused = saved_tensor_bytes(bilinear_pool, x)
    assert output_bytes <= fused <= output_bytes + 2 * 4  # z and the two norms
    assert saved_tensor_bytes(lambda t: bilinear_pool(t, recompute=True), x) == 0
    covariance = saved_tensor_bytes(lambda t: bilinear_pool(t, center=True, sqrt_mode="none", normalize=False), x)
    assert covariance == 2 * 4  # G = g there: z is not kept, only the two norms
    assert saved_tensor_bytes(bilinear_pool_naive, x) >= 3 * output_bytes  # what the fused op saves


def test_recompute_gives_the_same_gradient() -> None:
    x = features(2, 6, 3, 4, dtype=torch.float32)
    saved, recomputed = bilinear_pool(x), bilinear_pool(x, recompute=True)
    assert torch.equal(grads(saved, [x])[0], grads(recomputed, [x])[0])


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4)), {}, "batch size"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5)), {}, "number of positions N"),
    ((torch.zeros(2, 3),), {}, r"\(B, C, H, W\)"),
    ((torch.zeros(2, 3, 4, 4, dtype=torch.int64),), {}, "floating-point"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4, dtype=torch.float64)), {}, "share a dtype"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 16, 3)), {}, "same layout"),
    ((torch.zeros(2, 3, 4, 4),), {"sqrt_mode": "sqrt"}, "sqrt_mode"),
    ((torch.zeros(2, 3, 0, 4),), {}, "no positions"),
])
def test_errors_name_the_problem(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        bilinear_pool(*args, **kwargs)


def test_module_matches_function_and_describes_itself() -> None:
    pool = BilinearPool(sqrt_mode="smooth", eps=1e-8, center=True)
    x = features(2, 5, 3, 3).detach()
    torch.testing.assert_close(pool(x), bilinear_pool(x, sqrt_mode="smooth", eps=1e-8, center=True))
    assert repr(pool) == "BilinearPool(scale=1/N, center=True, sqrt_mode='smooth', eps=1e-08, normalize=True)"
    with pytest.raises(ValueError, match="sqrt_mode"):
        BilinearPool(sqrt_mode="abs")


def test_opcheck_forward_and_backward_ops() -> None:
    x = features(2, 6, 9, dtype=torch.float32)  # the ops take (B, C, N)
    y = features(2, 5, 9, seed=4, dtype=torch.float32)
    for args in [(x, None, 1 / 9, "signed", 1e-6, True, False, None, False),
                 (x, y, 0.5, "smooth", 1e-6, True, True, torch.float64, True),
                 (x, y, 1 / 9, "none", 0.0, False, True, None, False)]:
        torch.library.opcheck(torch.ops.fgvc_kernels.bilinear_pool_forward, args)
    out, norm = torch.ops.fgvc_kernels.bilinear_pool_forward(x, y, 1 / 9, "signed", 1e-6, True, False, None, False)
    grad = torch.randn_like(out)
    # The backward op has no derivative of its own (double backward is not supported), so its inputs are plain.
    saved = (grad, out.detach(), norm.detach(), x.detach(), y.detach())
    torch.library.opcheck(torch.ops.fgvc_kernels.bilinear_pool_backward, (*saved, 1 / 9, "signed", 1e-6, True, False))


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    x = features(2, 6, 3, 3, dtype=torch.float32)
    y = features(2, 4, 3, 3, seed=6, dtype=torch.float32)
    compiled = torch.compile(lambda a, b: bilinear_pool(a, b, center=True), fullgraph=True)
    out = compiled(x, y)
    expected = bilinear_pool(x, y, center=True)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads(out, [x, y]), grads(expected, [x, y]), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("device_type", "dtype", "out_dtype", "capability", "installed", "expected"), [
    ("cuda", torch.float32, None, (9, 0), True, True),
    ("cuda", torch.bfloat16, None, (8, 0), True, True),
    ("cuda", torch.float16, torch.float32, (8, 6), True, True),
    ("cuda", torch.float64, None, (9, 0), True, False),  # an fp32 accumulator would round it
    ("cuda", torch.float32, torch.float64, (9, 0), True, False),
    ("cuda", torch.float16, None, (7, 5), True, False),  # Turing: Triton's dot is FMA there, cuBLAS is faster
    ("cuda", torch.float32, None, (9, 0), False, False),
    ("cpu", torch.float32, None, None, True, False),
])
def test_dispatch_sends_only_what_the_kernels_compute_exactly_to_triton(device_type, dtype, out_dtype, capability,
                                                                         installed, expected) -> None:
    assert runs_triton(device_type, dtype, out_dtype, capability, installed) is expected


def test_fp16_keeps_z_in_fp32_for_backward_only() -> None:
    x = features(2, 8, 3, 3, dtype=torch.float32).detach().relu().half().requires_grad_()
    out = bilinear_pool(x)
    assert out.dtype == torch.float16
    assert saved_tensor_bytes(bilinear_pool, x) == 2 * 8 * 8 * 4 + 2 * 4  # z in fp32, the two norms
    with torch.no_grad():
        assert bilinear_pool(x).dtype == torch.float16


def test_imports_and_runs_without_triton() -> None:
    """The op package on a machine without Triton (macOS, Windows): it imports, runs the torch path with autograd, and
    never loads its Triton module."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fgvc_kernels\n"
            "x = torch.randn(2, 4, 3, 3, requires_grad=True)\n"
            "fgvc_kernels.bilinear_pool(x).sum().backward()\n"
            "assert x.grad is not None and not fgvc_kernels.bilinear.TRITON_INSTALLED\n"
            "assert 'fgvc_kernels.bilinear_triton' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
