"""Unit tests of the self-supervised building blocks (fgvc.ssl), each against an independent oracle.

Pinned here:
    losses      nt_xent (the mean over the 2N anchors, not the TF code's twice it), info_nce (positive at index 0,
                keys and queue detached), byol_loss (p1 against z2, in [0, 8]), simsiam_loss (in [-1, 1]), each
                against a float64 formula written out with explicit loops, gradients included
    base        cosine_momentum, ema_update (parameters only, never buffers), momentum_copy, embedding_std, mlp
    moco        KeyQueue: FIFO order, wrap-around, oversized batches, the queue in the state dict
    views       MultiViewTransform (keys, seeding), the published recipes and their overrides, views_in_box,
                box_pixels

Tolerances: the functions run in float32 and the references in float64; a float32 loss of a few units carries
relative rounding of order 1e-7 per operation, so rtol 1e-5 leaves room for the reductions without hiding a wrong
formula (a wrong pairing, reduction or temperature changes the value by far more). Where the function itself is
run in float64 the comparison is at 1e-10.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fgvc.data.transforms import Preprocessing
from fgvc.errors import OptionError
from fgvc.ssl.base import cosine_momentum, ema_update, embedding_std, mlp, momentum_copy
from fgvc.ssl.losses import byol_loss, info_nce, nt_xent, simsiam_loss
from fgvc.ssl.moco import KeyQueue
from fgvc.ssl.views import MultiViewTransform, ViewRecipe, box_pixels, method_views

F32 = {"rtol": 1e-5, "atol": 1e-6}  # float32 function against a float64 reference (see the module docstring)
F64 = {"rtol": 1e-10, "atol": 1e-12}  # float64 against float64: only summation order differs


def randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# float64 references, written with explicit loops over rows (torch float64 scalars, so autograd can differentiate
# them where a test compares gradients)

def ref_unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(sum(x * x for x in v))


def ref_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(x * y for x, y in zip(a, b, strict=True))


def ref_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ref_dot(ref_unit(a), ref_unit(b))


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, reduce: str = "mean") -> torch.Tensor:
    """SimCLR's loss by the definition: views 0..N-1 are z1, N..2N-1 are z2; anchor i's positive is (i + N) mod 2N,
    its denominator every view but itself."""
    n = len(z1)
    views = [ref_unit(v) for v in [*z1.double(), *z2.double()]]
    total = 0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(torch.exp(ref_dot(views[i], views[j]) / temperature) for j in range(2 * n) if j != i)
        total = total - torch.log(torch.exp(ref_dot(views[i], views[positive]) / temperature) / denominator)
    return total / (2 * n) if reduce == "mean" else total


def ref_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    q, k, queue = q.double(), k.double(), queue.double()
    total = 0
    for i in range(len(q)):
        logits = [ref_dot(q[i], k[i]) / temperature] + [ref_dot(q[i], key) / temperature for key in queue]
        log_sum = torch.log(sum(torch.exp(logit) for logit in logits))
        total = total + (log_sum - logits[0])  # cross-entropy with label 0
    return total / len(q)


def ref_mean_cos(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    p, z = p.double(), z.double()
    return sum(ref_cos(p[i], z[i]) for i in range(len(p))) / len(p)


def ref_byol(p1, p2, z1, z2) -> torch.Tensor:
    n = len(p1)
    first = sum(2 - 2 * ref_cos(p1[i].double(), z2[i].double()) for i in range(n)) / n
    second = sum(2 - 2 * ref_cos(p2[i].double(), z1[i].double()) for i in range(n)) / n
    return first + second


def ref_simsiam(p1, p2, z1, z2) -> torch.Tensor:
    return -(ref_mean_cos(p1, z2) + ref_mean_cos(p2, z1)) / 2


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# NT-Xent

@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_the_float64_definition(temperature: float) -> None:
    # Rows of very different norms: the function must normalize inside (a cosine, not a dot product).
    z1 = randn(4, 5, seed=1) * torch.tensor([[0.01], [1.0], [30.0], [3.0]])
    z2 = randn(4, 5, seed=2, scale=7.0)
    expected = ref_nt_xent(z1, z2, temperature)
    torch.testing.assert_close(nt_xent(z1, z2, temperature).double(), expected, **F32)
    torch.testing.assert_close(nt_xent(z1.double(), z2.double(), temperature), expected, **F64)
    # Scaling every row leaves the loss unchanged; a dot-product implementation would move it.
    torch.testing.assert_close(nt_xent(5 * z1, 0.2 * z2, temperature), nt_xent(z1, z2, temperature), **F32)


def test_nt_xent_temperature_changes_the_value() -> None:
    z1, z2 = randn(4, 5, seed=3), randn(4, 5, seed=4)
    assert not math.isclose(nt_xent(z1, z2, 0.1).item(), nt_xent(z1, z2, 0.5).item(), rel_tol=1e-3)


def test_nt_xent_is_the_mean_over_the_2n_anchors_not_the_sum_of_two_halves() -> None:
    n = 3
    z1, z2 = randn(n, 4, seed=5), randn(n, 4, seed=6)
    summed = ref_nt_xent(z1, z2, 0.2, reduce="sum")
    loss = nt_xent(z1, z2, 0.2).double()
    torch.testing.assert_close(loss, summed / (2 * n), **F32)
    # The original TF code averages each half over N and adds them: twice the mean. That is a different number.
    assert not torch.isclose(loss, summed / n, rtol=1e-3)


def test_nt_xent_gradients_match_the_reference_for_both_views() -> None:
    z1, z2 = randn(3, 4, seed=7, scale=2.0), randn(3, 4, seed=8)
    a1, a2 = leaf(z1), leaf(z2)
    nt_xent(a1, a2, 0.3).backward()
    r1, r2 = leaf(z1.double()), leaf(z2.double())
    ref_nt_xent(r1, r2, 0.3).backward()
    assert a1.grad is not None and a2.grad is not None
    assert a1.grad.abs().sum() > 0 and a2.grad.abs().sum() > 0
    torch.testing.assert_close(a1.grad.double(), r1.grad, rtol=1e-4, atol=1e-6)  # gradients: looser float32 error
    torch.testing.assert_close(a2.grad.double(), r2.grad, rtol=1e-4, atol=1e-6)


def test_nt_xent_gradcheck_in_float64() -> None:
    z1, z2 = leaf(randn(3, 4, seed=9, dtype=torch.float64)), leaf(randn(3, 4, seed=10, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z1, z2))


# ---------------------------------------------------------------------------------------------------------------
# InfoNCE

def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(randn(*shape, seed=seed), dim=1)


@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_info_nce_matches_the_float64_definition(temperature: float) -> None:
    q, k, queue = unit_rows(3, 5, seed=11), unit_rows(3, 5, seed=12), unit_rows(6, 5, seed=13)
    expected = ref_info_nce(q, k, queue, temperature)
    torch.testing.assert_close(info_nce(q, k, queue, temperature).double(), expected, **F32)
    torch.testing.assert_close(info_nce(q.double(), k.double(), queue.double(), temperature), expected, **F64)


def test_info_nce_positive_is_the_own_key_not_a_queue_entry() -> None:
    q, queue = unit_rows(3, 5, seed=14), unit_rows(4, 5, seed=15)
    # Keys equal to the queries: the positive logit is the largest, so the loss is below log(K + 1)...
    low = info_nce(q, q.clone(), queue, 0.1)
    # ...and keys opposite to the queries push it well above.
    high = info_nce(q, -q, queue, 0.1)
    assert low.item() < math.log(queue.shape[0] + 1) < high.item()


def test_info_nce_gradient_reaches_q_only() -> None:
    q0, k0, queue0 = unit_rows(3, 5, seed=16), unit_rows(3, 5, seed=17), unit_rows(4, 5, seed=18)
    q, k, queue = leaf(q0), leaf(k0), leaf(queue0)
    info_nce(q, k, queue, 0.2).backward()
    assert k.grad is None and queue.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0
    rq = leaf(q0.double())
    ref_info_nce(rq, k0, queue0, 0.2).backward()
    torch.testing.assert_close(q.grad.double(), rq.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# BYOL and SimSiam

def four(seed: int, n: int = 4, d: int = 6) -> list[torch.Tensor]:
    return [randn(n, d, seed=seed + i, scale=1 + i) for i in range(4)]


def test_byol_loss_matches_the_float64_definition_and_pairs_p1_with_z2() -> None:
    p1, p2, z1, z2 = four(20)
    loss = byol_loss(p1, p2, z1, z2)
    torch.testing.assert_close(loss.double(), ref_byol(p1, p2, z1, z2), **F32)
    swapped = byol_loss(p1, p2, z2, z1)
    torch.testing.assert_close(swapped.double(), ref_byol(p1, p2, z2, z1), **F32)
    assert not torch.isclose(loss, swapped, rtol=1e-3)  # the pairing matters on random inputs: it is pinned


def test_byol_loss_bounds_at_perfect_and_opposite_prediction() -> None:
    _, _, z1, z2 = four(24)
    c = torch.tensor([[0.5], [2.0], [3.0], [10.0]])  # positive, different per row: only the direction counts
    torch.testing.assert_close(byol_loss(c * z2, c * z1, z1, z2), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(byol_loss(-c * z2, -c * z1, z1, z2), torch.tensor(8.0), atol=1e-5, rtol=0)


def assert_only_predictions_get_gradient(loss, reference, seed: int) -> None:
    """The targets z get no gradient; the predictions p get the float64 reference's."""
    p1_0, p2_0, z1_0, z2_0 = four(seed)
    p1, p2, z1, z2 = map(leaf, (p1_0, p2_0, z1_0, z2_0))
    loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    r1, r2 = leaf(p1_0.double()), leaf(p2_0.double())
    reference(r1, r2, z1_0, z2_0).backward()
    torch.testing.assert_close(p1.grad.double(), r1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p2.grad.double(), r2.grad, rtol=1e-4, atol=1e-6)
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_byol_loss_gradient_reaches_predictions_only() -> None:
    assert_only_predictions_get_gradient(byol_loss, ref_byol, 28)


def test_simsiam_loss_matches_the_float64_definition() -> None:
    p1, p2, z1, z2 = four(32)
    torch.testing.assert_close(simsiam_loss(p1, p2, z1, z2).double(), ref_simsiam(p1, p2, z1, z2), **F32)
    # The pairing is pinned as for BYOL.
    assert not torch.isclose(simsiam_loss(p1, p2, z1, z2), simsiam_loss(p1, p2, z2, z1), rtol=1e-3)


def test_simsiam_loss_bounds_and_stop_gradient() -> None:
    _, _, z1_0, z2_0 = four(36)
    c = torch.tensor([[0.1], [1.0], [4.0], [9.0]])
    torch.testing.assert_close(simsiam_loss(c * z2_0, c * z1_0, z1_0, z2_0), torch.tensor(-1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(simsiam_loss(-c * z2_0, -c * z1_0, z1_0, z2_0), torch.tensor(1.0), atol=1e-6, rtol=0)
    assert_only_predictions_get_gradient(simsiam_loss, ref_simsiam, 36)


# ---------------------------------------------------------------------------------------------------------------
# Momentum encoders

@pytest.mark.parametrize(("base", "total"), [(0.996, 100), (0.9, 7)])
def test_cosine_momentum_follows_the_byol_schedule(base: float, total: int) -> None:
    values = [cosine_momentum(base, k, total) for k in range(total + 1)]
    for k, value in enumerate(values):
        assert value == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2, rel=1e-12)
    assert values[0] == pytest.approx(base, rel=1e-12)
    assert values[-1] == pytest.approx(1.0, rel=1e-12)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    if total % 2 == 0:
        assert values[total // 2] == pytest.approx((1 + base) / 2, rel=1e-12)


def test_ema_update_moves_parameters_by_the_momentum() -> None:
    torch.manual_seed(40)
    target, online = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {name: p.detach().double().clone() for name, p in target.named_parameters()}
    ema_update(target, online, 0.9)
    for name, p in target.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(online.named_parameters())[name].detach().double()
        torch.testing.assert_close(p.detach().double(), expected, **F32)
    # momentum 1 leaves the target alone, momentum 0 copies the online network
    snapshot = {name: p.detach().clone() for name, p in target.named_parameters()}
    ema_update(target, online, 1.0)
    for name, p in target.named_parameters():
        assert torch.equal(p, snapshot[name])
    ema_update(target, online, 0.0)
    for (name, p), q in zip(target.named_parameters(), online.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_ema_update_leaves_buffers_alone() -> None:
    torch.manual_seed(41)
    target, online = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    online.train()
    online(torch.randn(8, 3) * 5 + 2)  # online statistics move away from the target's
    with torch.no_grad():
        online.weight.fill_(3.0)
    assert not torch.equal(online.running_mean, target.running_mean)
    mean, var, count = (target.running_mean.clone(), target.running_var.clone(),
                        target.num_batches_tracked.clone())
    ema_update(target, online, 0.5)
    assert torch.equal(target.running_mean, mean)
    assert torch.equal(target.running_var, var)
    assert torch.equal(target.num_batches_tracked, count)
    torch.testing.assert_close(target.weight.detach(), torch.full((3,), 2.0))  # but the parameters did move


def test_momentum_copy_is_frozen_and_equal() -> None:
    torch.manual_seed(42)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = momentum_copy(online)
    online_parameters, target_parameters = list(online.parameters()), list(target.parameters())
    assert len(online_parameters) == len(target_parameters) == 4
    for p, t in zip(online_parameters, target_parameters, strict=True):
        assert not t.requires_grad and p.requires_grad
        assert torch.equal(p, t)
        assert t.data_ptr() != p.data_ptr()  # a copy, not the same storage
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert not torch.equal(online[0].weight, target[0].weight)


# ---------------------------------------------------------------------------------------------------------------
# MoCo's queue

def test_key_queue_is_first_in_first_out_with_wrap_around() -> None:
    queue = KeyQueue(5, 3)
    a, b, c = (torch.full((2, 3), float(v)) + torch.arange(2.0)[:, None] / 10 for v in (1, 2, 3))
    queue.enqueue(a)
    assert torch.equal(queue.keys[0:2], a) and queue.pointer.item() == 2
    queue.enqueue(b)
    assert torch.equal(queue.keys[2:4], b) and queue.pointer.item() == 4
    assert torch.equal(queue.keys[0:2], a)
    queue.enqueue(c)
    assert torch.equal(queue.keys[4], c[0]) and torch.equal(queue.keys[0], c[1])
    assert queue.pointer.item() == 1
    assert torch.equal(queue.keys[1], a[1]) and torch.equal(queue.keys[2:4], b)  # the rest untouched


def test_key_queue_keeps_the_newest_keys_of_an_oversized_batch() -> None:
    queue = KeyQueue(3, 2)
    queue.enqueue(torch.zeros(1, 2))  # pointer 1
    batch = torch.arange(14.0).reshape(7, 2)
    queue.enqueue(batch)
    kept = {tuple(row.tolist()) for row in queue.keys}
    assert kept == {tuple(row.tolist()) for row in batch[-3:]}
    # Written from the pointer in order: rows 1, 2, 0 hold batch[4], batch[5], batch[6].
    assert torch.equal(queue.keys[[1, 2, 0]], batch[-3:])
    assert queue.pointer.item() == 1


def test_key_queue_state_is_in_the_state_dict() -> None:
    queue = KeyQueue(4, 3)
    queue.enqueue(torch.ones(3, 3))
    state = queue.state_dict()
    assert set(state) == {"keys", "pointer"}
    assert state["pointer"].item() == 3
    restored = KeyQueue(4, 3)
    restored.load_state_dict(state)
    assert torch.equal(restored.keys, queue.keys) and restored.pointer.item() == 3
    # the initial keys are unit vectors
    torch.testing.assert_close(KeyQueue(6, 4).keys.norm(dim=1), torch.ones(6))


# ---------------------------------------------------------------------------------------------------------------
# Collapse signal

def test_embedding_std_matches_the_float64_definition() -> None:
    z = randn(5, 4, seed=50) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [2.0]])
    rows = [ref_unit(row) for row in z.double()]
    n, d = len(rows), len(rows[0])
    stds = []
    for channel in range(d):
        values = [row[channel].item() for row in rows]
        mean = sum(values) / n
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / n))  # over the batch's rows (no correction)
    assert embedding_std(z).item() == pytest.approx(sum(stds) / d, rel=1e-5)


def test_embedding_std_is_zero_for_identical_rows() -> None:
    row = randn(1, 6, seed=51)
    assert embedding_std(row.repeat(4, 1)).item() == pytest.approx(0.0, abs=1e-7)
    # Rows that differ only in scale are one point on the sphere: still collapsed.
    scaled = row * torch.tensor([[1.0], [2.0], [0.5], [7.0]])
    assert embedding_std(scaled).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Views

def raw_sample(height: int = 40, width: int = 48, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "label": 3, "index": 7,
            "bbox": np.array([4.0, 5.0, 40.0, 33.0], dtype=np.float32)}


def test_multi_view_transform_returns_two_views_and_no_label() -> None:
    transform = MultiViewTransform(method_views("simclr"), 16)
    out = transform(raw_sample(), seed=3)
    assert set(out) == {"views", "index"}
    assert out["index"] == 7
    assert len(out["views"]) == 2
    for view in out["views"]:
        assert isinstance(view, torch.Tensor) and view.dtype == torch.float32
        assert tuple(view.shape) == (3, 16, 16)
    assert not torch.equal(out["views"][0], out["views"][1])  # each view has its own randomness


def test_multi_view_transform_is_seeded() -> None:
    transform = MultiViewTransform(method_views("byol"), 16)
    sample = raw_sample()
    first, again, other = transform(sample, 11), transform(sample, 11), transform(sample, 12)
    for a, b in zip(first["views"], again["views"], strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(first["views"], other["views"], strict=True))
    # A second transform object draws the same views from the same seed: the seed alone fixes them.
    fresh = MultiViewTransform(method_views("byol"), 16)(sample, 11)
    for a, b in zip(first["views"], fresh["views"], strict=True):
        assert torch.equal(a, b)


PUBLISHED = {
    "simclr": {"crop_scale": (0.08, 1.0), "jitter": (0.8, 0.8, 0.8, 0.2)},
    "moco": {"crop_scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1)},
    "simsiam": {"crop_scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1)},
    "byol": {"crop_scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.2, 0.1)},  # BYOL's Table 6: saturation 0.2
}


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_method_views_are_the_published_recipes(method: str) -> None:
    views = method_views(method)
    assert len(views) == 2 and all(isinstance(view, ViewRecipe) for view in views)
    for view in views:
        assert view.crop_scale == PUBLISHED[method]["crop_scale"]
        assert view.jitter == PUBLISHED[method]["jitter"]
        assert view.grayscale == 0.2 and view.jitter_prob == 0.8 and view.hflip == 0.5
    if method == "byol":
        assert [view.blur for view in views] == [1.0, 0.1]
        assert [view.solarize for view in views] == [0.0, 0.2]
    else:
        assert [view.blur for view in views] == [0.5, 0.5]
        assert [view.solarize for view in views] == [0.0, 0.0]


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_method_views_overrides_replace_values_in_both_views(method: str) -> None:
    published = method_views(method)
    views = method_views(method, hue=0, grayscale=0, crop_scale=(0.5, 1))
    for view, original in zip(views, published, strict=True):
        assert view.jitter == (*original.jitter[:3], 0)
        assert view.grayscale == 0
        assert view.crop_scale == (0.5, 1)
        assert (view.blur, view.solarize, view.jitter_prob, view.hflip) == \
            (original.blur, original.solarize, original.jitter_prob, original.hflip)
    # None keeps the published values
    assert method_views(method, hue=None, grayscale=None, crop_scale=None) == published


def test_method_views_unknown_method_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="'swav' has no view recipe; known: simclr, moco, simsiam, byol, dino, mae"):
        method_views("swav")


NO_COLOUR = ViewRecipe(jitter_prob=0.0, grayscale=0.0, blur=0.0, hflip=0.5)
UNIT_RANGE = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def red_in_blue(box: tuple[int, int, int, int], height: int = 48, width: int = 64) -> dict:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 2] = 255
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (255, 0, 0)
    return {"image": image, "label": 0, "index": 1, "bbox": np.array(box, dtype=np.float32)}


def test_views_in_box_crop_only_the_box() -> None:
    sample = red_in_blue((20, 10, 44, 34))
    inside = MultiViewTransform((NO_COLOUR, NO_COLOUR), 16, views_in_box=True, preprocessing=UNIT_RANGE)
    anywhere = MultiViewTransform((NO_COLOUR, NO_COLOUR), 16, views_in_box=False, preprocessing=UNIT_RANGE)
    blue_seen = False
    for seed in range(20):
        for view in inside(sample, seed)["views"]:
            assert view[2].max().item() < 0.02, seed  # no blue at all: every pixel comes from the box
            assert view[0].min().item() > 0.98, seed
        blue_seen |= any(view[2].max().item() > 0.5 for view in anywhere(sample, seed)["views"])
    assert blue_seen  # without the option the crops do reach the background (so the check above can fail)


def test_views_in_box_without_a_box_is_an_option_error() -> None:
    sample = raw_sample()
    del sample["bbox"]
    with pytest.raises(OptionError, match="views_in_box"):
        MultiViewTransform(method_views("moco"), 16, views_in_box=True)(sample, 0)
    # without the option a sample needs no box
    assert len(MultiViewTransform(method_views("moco"), 16)(sample, 0)["views"]) == 2


def test_box_pixels_cover_fractional_boxes_and_never_are_empty() -> None:
    shape = (10, 12)
    # floor of x0 and y0, ceil of x1 and y1 (exclusive)
    assert box_pixels(shape, np.array([2.3, 1.7, 7.2, 5.0])) == (2, 1, 8, 5)
    assert box_pixels(shape, np.array([0.0, 0.0, 12.0, 10.0])) == (0, 0, 12, 10)
    assert box_pixels(shape, np.array([3.0, 4.0, 3.0, 4.0])) == (3, 4, 4, 5)  # degenerate: one pixel
    assert box_pixels(shape, np.array([5.5, 2.5, 5.5, 2.5])) == (5, 2, 6, 3)
    # boxes reaching beyond the image are clipped to it, and still hold a pixel
    assert box_pixels(shape, np.array([-3.0, -2.0, 20.0, 15.0])) == (0, 0, 12, 10)
    assert box_pixels(shape, np.array([30.0, 30.0, 31.0, 31.0])) == (11, 9, 12, 10)


# ---------------------------------------------------------------------------------------------------------------
# MLP heads

def layer_kinds(module: nn.Sequential) -> list[type]:
    return [type(layer) for layer in module]


def test_mlp_default_has_batch_norm_on_the_hidden_layer() -> None:
    head = mlp([8, 16, 4])
    assert layer_kinds(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[0].bias) == (8, 16, None)
    assert head[1].num_features == 16 and head[1].affine
    assert (head[3].in_features, head[3].out_features) == (16, 4) and head[3].bias is not None
    assert tuple(head(torch.randn(3, 8)).shape) == (3, 4)


def test_mlp_without_batch_norm_has_biases() -> None:
    head = mlp([8, 16, 4], batch_norm=False)
    assert layer_kinds(head) == [nn.Linear, nn.ReLU, nn.Linear]
    assert head[0].bias is not None and head[2].bias is not None


def test_mlp_last_batch_norm_is_affine_free_and_the_last_linear_has_no_bias() -> None:
    head = mlp([8, 16, 4], last_batch_norm=True)
    assert layer_kinds(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert head[0].bias is None and head[1].affine
    assert head[3].bias is None
    assert head[4].num_features == 4 and not head[4].affine
    # deeper: every hidden layer normalized, only the last affine-free (SimSiam's projector)
    deep = mlp([8, 6, 6, 4], last_batch_norm=True)
    norms = [layer for layer in deep if isinstance(layer, nn.BatchNorm1d)]
    assert [norm.affine for norm in norms] == [True, True, False]
