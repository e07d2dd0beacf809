"""Unit tests of the ViT-side self-supervised building blocks (DINO, MAE, multi-crop), each against an independent
oracle.

Pinned here:
    losses      dino_loss (pairs of different crops only, the teacher on the global crops, centring and both
                temperatures, no gradient to the teacher or the centre), dino_center, mae_loss (per-patch
                normalization, masked patches only), patchify / unpatchify (MAE's element order, non-square grids),
                each against a float64 formula written out with explicit loops
    mae         random_masking (round(ratio x N) hidden, Python's half-to-even rounding, seeding, the restoring
                permutation), sincos_position_embedding, MAE: the encoder sees the visible patches only,
                reconstructions paste the input back on the visible patches, a non-ViT backbone is refused
    dino        DINOHead (weight-normalized prototypes, frozen or trained magnitude), by_resolution, the teacher
                temperature schedule, the last layer frozen in the first epochs, the teacher's cosine EMA,
                views_loss (centre update, no teacher gradient, teacher kept in eval mode)
    views       part_crop_box (the part always inside, the box inside the image, visible parts only),
                LocalCrops' jitter bound, MultiViewTransform with part-centred local crops and views_in_box
    backbone    Backbone.cls_attention against timm's own attention weights (square and non-square grids)
    loop        Optimization's gradient clipping: the global norm (torch's clip_grad_norm_) and DINO's
                per-parameter clipping

Tolerances: as tests/test_ssl_units.py: float32 functions against float64 references at rtol 1e-5 (a wrong pairing,
temperature or reduction moves the value by far more); float64 against float64 at 1e-10; gradients at rtol 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvc.data.transforms import Preprocessing
from fgvc.engine.loop import Optimization
from fgvc.errors import OptionError
from fgvc.models import create_backbone
from fgvc.models.backbone import BackboneError
from fgvc.ssl.dino import DINO, DINOHead, by_resolution
from fgvc.ssl.losses import dino_center, dino_loss, mae_loss, patchify, unpatchify
from fgvc.ssl.mae import MAE, random_masking, sincos_position_embedding
from fgvc.ssl.views import LOCAL_VIEW, LocalCrops, MultiViewTransform, ViewRecipe, method_views, part_crop_box

F32 = {"rtol": 1e-5, "atol": 1e-6}  # float32 function against a float64 reference (see the module docstring)
F64 = {"rtol": 1e-10, "atol": 1e-12}  # float64 against float64: only summation order differs
GRAD = {"rtol": 1e-4, "atol": 1e-6}  # float32 gradients against float64 ones


def randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# float64 references with explicit loops (torch float64 scalars, so autograd can differentiate them)

def ref_softmax(row: list, temperature: float) -> list:
    z = [x / temperature for x in row]
    top = max(float(x.detach()) for x in z)
    e = [torch.exp(x - top) for x in z]
    total = sum(e)
    return [x / total for x in e]


def ref_log_softmax(row: list, temperature: float) -> list:
    z = [x / temperature for x in row]
    top = max(float(x.detach()) for x in z)
    log_total = top + torch.log(sum(torch.exp(x - top) for x in z))
    return [x - log_total for x in z]


def ref_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, student_temp: float,
             teacher_temp: float, *, same_crop_pairs: bool = False) -> torch.Tensor:
    """DINO's loss by the definition: the mean over the pairs (teacher crop i, student crop v != i) of the batch
    mean of -sum_k p_teacher(k) log p_student(k); same_crop_pairs also counts v == i (what the loss must not)."""
    center = center.double()
    terms = []
    for i, t in enumerate(teacher):
        t = t.double()
        for v, s in enumerate(student):
            if v == i and not same_crop_pairs:
                continue
            s = s.double()
            batch_total = 0
            for b in range(len(t)):
                target = ref_softmax([t[b, k] - center[k] for k in range(t.shape[1])], teacher_temp)
                prediction = ref_log_softmax([s[b, k] for k in range(s.shape[1])], student_temp)
                batch_total = batch_total - sum(p * q for p, q in zip(target, prediction, strict=True))
            terms.append(batch_total / len(t))
    return sum(terms) / len(terms)


def crops(count: int, seed: int, batch: int = 2, k: int = 5, scale: float = 1.0) -> list[torch.Tensor]:
    return [randn(batch, k, seed=seed + i, scale=scale) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# dino_loss

@pytest.mark.parametrize(("student_temp", "teacher_temp"), [(0.1, 0.04), (0.2, 0.07), (1.0, 1.0), (0.5, 2.0)])
def test_dino_loss_matches_the_float64_definition(student_temp: float, teacher_temp: float) -> None:
    student, teacher, center = crops(4, seed=1, scale=0.3), crops(2, seed=11, scale=0.3), randn(5, seed=21)
    expected = ref_dino(student, teacher, center, student_temp, teacher_temp)
    loss = dino_loss(student, teacher, center, student_temp, teacher_temp)
    assert loss.ndim == 0
    torch.testing.assert_close(loss.double(), expected, **F32)
    in64 = dino_loss([s.double() for s in student], [t.double() for t in teacher], center.double(), student_temp,
                     teacher_temp)
    torch.testing.assert_close(in64, expected, **F64)


def test_dino_loss_temperatures_are_not_interchangeable() -> None:
    student, teacher, center = crops(3, seed=30), crops(2, seed=40), torch.zeros(5)
    a = dino_loss(student, teacher, center, 0.1, 0.04).item()
    b = dino_loss(student, teacher, center, 0.04, 0.1).item()
    assert not math.isclose(a, b, rel_tol=1e-3)
    assert a == pytest.approx(ref_dino(student, teacher, center, 0.1, 0.04).item(), rel=1e-5)
    assert b == pytest.approx(ref_dino(student, teacher, center, 0.04, 0.1).item(), rel=1e-5)


def test_dino_loss_does_not_count_same_crop_pairs() -> None:
    student, teacher, center = crops(3, seed=50), crops(2, seed=60), randn(5, seed=70)
    loss = dino_loss(student, teacher, center, 0.1, 0.05)
    with_diagonal = ref_dino(student, teacher, center, 0.1, 0.05, same_crop_pairs=True)
    torch.testing.assert_close(loss.double(), ref_dino(student, teacher, center, 0.1, 0.05), **F32)
    assert not torch.isclose(loss.double(), with_diagonal, rtol=1e-3)
    # Constructive: teacher crop 1 (and the centre) give classes 0 and 1 the same logit, so swapping the student's
    # logits 0 and 1 on crop 0 leaves the counted pair (teacher 1, student 0) as it is; only the same-crop pair
    # (teacher 0, student 0) would see the swap, as teacher crop 0 tells the two classes apart.
    teacher[1][:, 1] = teacher[1][:, 0]
    center[1] = center[0]
    teacher[0][:, 0] += 3.0
    swapped = [s.clone() for s in student]
    swapped[0] = swapped[0][:, [1, 0, 2, 3, 4]]
    assert not torch.equal(swapped[0], student[0])
    kept = dino_loss(student, teacher, center, 0.1, 0.05)
    torch.testing.assert_close(dino_loss(swapped, teacher, center, 0.1, 0.05), kept, **F32)
    # ...which a loss counting the same-crop pairs would notice:
    assert not torch.isclose(ref_dino(swapped, teacher, center, 0.1, 0.05, same_crop_pairs=True),
                             ref_dino(student, teacher, center, 0.1, 0.05, same_crop_pairs=True), rtol=1e-3)


def test_dino_loss_teacher_sees_the_global_crops_only() -> None:
    student, teacher, center = crops(5, seed=80), crops(2, seed=90), randn(5, seed=95, scale=0.1)
    loss = dino_loss(student, teacher, center, 0.1, 0.04)
    torch.testing.assert_close(loss.double(), ref_dino(student, teacher, center, 0.1, 0.04), **F32)  # 2 x 4 pairs
    # A local crop (index >= 2) is paired with both teacher crops: changing it moves the loss.
    moved = [*student[:4], student[4] + randn(2, 5, seed=99)]
    assert not torch.isclose(dino_loss(moved, teacher, center, 0.1, 0.04), loss, rtol=1e-4)


def test_dino_loss_centring() -> None:
    student, teacher = crops(3, seed=100), crops(2, seed=110)
    center = randn(5, seed=120, scale=0.5)
    loss = dino_loss(student, teacher, center, 0.1, 0.04)
    other_center = randn(5, seed=121, scale=0.5)
    moved = dino_loss(student, teacher, other_center, 0.1, 0.04)
    torch.testing.assert_close(moved.double(), ref_dino(student, teacher, other_center, 0.1, 0.04), **F32)
    assert not torch.isclose(moved, loss, rtol=1e-3)
    # The same per-class shift of every teacher logit and of the centre cancels.
    shift = randn(5, seed=122, scale=3.0)
    torch.testing.assert_close(dino_loss(student, [t + shift for t in teacher], center + shift, 0.1, 0.04), loss,
                               **F32)
    # Softmax invariance: a constant per teacher row, or one constant on the whole centre, changes nothing.
    row_shift = randn(2, 1, seed=123, scale=5.0)
    torch.testing.assert_close(dino_loss(student, [teacher[0] + row_shift, teacher[1] - row_shift], center, 0.1,
                                         0.04), loss, **F32)
    torch.testing.assert_close(dino_loss(student, teacher, center + 2.5, 0.1, 0.04), loss, **F32)


def test_dino_loss_gradient_reaches_the_student_only() -> None:
    student0, teacher0, center0 = crops(4, seed=130, scale=0.5), crops(2, seed=140), randn(5, seed=150)
    student, teacher, center = [leaf(s) for s in student0], [leaf(t) for t in teacher0], leaf(center0)
    dino_loss(student, teacher, center, 0.1, 0.04).backward()
    assert all(t.grad is None or not t.grad.any() for t in teacher)
    assert center.grad is None or not center.grad.any()
    reference = [leaf(s.double()) for s in student0]
    ref_dino(reference, teacher0, center0, 0.1, 0.04).backward()
    for s, r in zip(student, reference, strict=True):
        assert s.grad is not None and s.grad.abs().sum() > 0
        torch.testing.assert_close(s.grad.double(), r.grad, **GRAD)


def test_dino_loss_gradcheck_in_float64() -> None:
    student = [leaf(randn(2, 4, seed=160 + i, dtype=torch.float64)) for i in range(3)]
    teacher = [randn(2, 4, seed=170 + i, dtype=torch.float64) for i in range(2)]
    center = randn(4, seed=180, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *s: dino_loss(list(s), teacher, center, 0.3, 0.1), tuple(student))


@pytest.mark.parametrize(("students", "teachers"), [(2, 3), (1, 2), (3, 0)])
def test_dino_loss_refuses_more_teacher_crops_than_student_crops_or_none(students: int, teachers: int) -> None:
    with pytest.raises(ValueError, match="teacher crops"):
        dino_loss(crops(students, seed=190), crops(teachers, seed=195), torch.zeros(5), 0.1, 0.04)


# ---------------------------------------------------------------------------------------------------------------
# dino_center

def ref_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float) -> torch.Tensor:
    rows = [row.double() for t in teacher for row in t]
    mean = [sum(float(row[k]) for row in rows) / len(rows) for k in range(len(center))]
    return torch.tensor([momentum * float(c) + (1 - momentum) * m for c, m in zip(center, mean, strict=True)],
                        dtype=torch.float64)


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0])
def test_dino_center_is_the_ema_of_the_mean_over_both_crops(momentum: float) -> None:
    center = randn(6, seed=200)
    teacher = [randn(3, 6, seed=201, scale=2.0), randn(3, 6, seed=202) + 4.0]
    new = dino_center(center, teacher, momentum)
    assert new.dtype == torch.float32 and new.shape == (6,)
    torch.testing.assert_close(new.double(), ref_center(center, teacher, momentum), **F32)
    # Two identical ranks (sums doubled, rows counted twice) give the same mean.
    torch.testing.assert_close(dino_center(center, teacher, momentum, total=lambda sums: 2 * sums), new, **F32)


def test_dino_center_is_not_differentiated() -> None:
    center, teacher = leaf(randn(4, seed=210)), [leaf(randn(2, 4, seed=211)), leaf(randn(2, 4, seed=212))]
    new = dino_center(center, teacher, 0.9)
    assert not new.requires_grad and new.grad_fn is None


# ---------------------------------------------------------------------------------------------------------------
# patchify, unpatchify, mae_loss

def ref_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """Patch index row-major over the grid; inside a patch element (dy * p + dx) * 3 + c."""
    b, c, h, w = images.shape
    rows, columns = h // p, w // p
    out = torch.zeros(b, rows * columns, p * p * c, dtype=images.dtype)
    for n in range(b):
        for gy in range(rows):
            for gx in range(columns):
                for dy in range(p):
                    for dx in range(p):
                        for ch in range(c):
                            out[n, gy * columns + gx, (dy * p + dx) * c + ch] = images[n, ch, gy * p + dy, gx * p + dx]
    return out


@pytest.mark.parametrize(("height", "width", "p"), [(8, 8, 4), (8, 16, 4), (6, 4, 2), (3, 3, 3)])
def test_patchify_order_and_exact_round_trip(height: int, width: int, p: int) -> None:
    images = randn(2, 3, height, width, seed=220)
    patches = patchify(images, p)
    assert patches.shape == (2, (height // p) * (width // p), p * p * 3)
    assert torch.equal(patches, ref_patchify(images, p))
    assert torch.equal(unpatchify(patches, p, (height // p, width // p)), images)


def test_unpatchify_inverts_the_reference_order() -> None:
    patches = randn(2, 8, 4 * 4 * 3, seed=221)  # an 8 x 16 image of 4 px patches: a 2 x 4 grid
    images = unpatchify(patches, 4, (2, 4))
    assert images.shape == (2, 3, 8, 16)
    assert torch.equal(ref_patchify(images, 4), patches)


def ref_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    total, masked = 0.0, 0.0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            pixels = [float(x) for x in target[b, n].double()]
            if norm_pix:
                mean = sum(pixels) / len(pixels)
                var = sum((x - mean) ** 2 for x in pixels) / (len(pixels) - 1)  # unbiased
                pixels = [(x - mean) / math.sqrt(var + 1e-6) for x in pixels]
            error = sum((float(y) - x) ** 2 for y, x in zip(pred[b, n].double(), pixels, strict=True)) / len(pixels)
            total += float(mask[b, n]) * error
            masked += float(mask[b, n])
    return total / masked


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_the_float64_definition(norm_pix: bool) -> None:
    pred, target = randn(2, 5, 12, seed=230), randn(2, 5, 12, seed=231, scale=3.0) + 1.5
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.float32)
    loss = mae_loss(pred, target, mask, norm_pix=norm_pix)
    assert loss.item() == pytest.approx(ref_mae(pred, target, mask, norm_pix), rel=1e-5)
    in64 = mae_loss(pred.double(), target.double(), mask.double(), norm_pix=norm_pix)
    assert in64.item() == pytest.approx(ref_mae(pred, target, mask, norm_pix), rel=1e-10)
    if not norm_pix:  # plain MSE over the masked patches
        chosen = mask.bool()
        torch.testing.assert_close(loss, F.mse_loss(pred[chosen], target[chosen]), **F32)
    # Visible patches (mask 0) count for nothing; a masked patch's prediction does.
    moved = pred.clone()
    moved[~mask.bool()] += 100.0
    assert torch.equal(mae_loss(moved, target, mask, norm_pix=norm_pix), loss)
    moved[0, 0] += 100.0
    assert mae_loss(moved, target, mask, norm_pix=norm_pix) > loss


def test_mae_loss_gradient_skips_visible_patches_and_the_target() -> None:
    pred, target = leaf(randn(1, 4, 6, seed=240)), leaf(randn(1, 4, 6, seed=241))
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    mae_loss(pred, target, mask).backward()
    assert target.grad is None
    assert not pred.grad[0, [0, 2]].any() and pred.grad[0, [1, 3]].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# random_masking

def numbered_tokens(batch: int, count: int, channels: int = 3) -> torch.Tensor:
    """Token n of image b holds 1000 b + n in every channel, so it can be recognized after a shuffle."""
    ids = 1000 * torch.arange(batch)[:, None] + torch.arange(count)[None]
    return ids[..., None].expand(-1, -1, channels).float().clone()


@pytest.mark.parametrize(("count", "ratio", "hidden"), [
    (16, 0.75, 12),
    (10, 0.75, 8),  # 7.5: Python's round is half to even -> 8
    (10, 0.25, 2),  # 2.5 -> 2 (half to even, not half up)
    (10, 0.35, 4),  # 3.5 -> 4
    (10, 0.45, 4),  # 4.5 -> 4
    (4, 0.5, 2),
])
def test_random_masking_hides_round_ratio_n_in_every_image(count: int, ratio: float, hidden: int) -> None:
    assert round(ratio * count) == hidden  # the documented rounding, as Python does it
    tokens = numbered_tokens(3, count)
    visible, mask, restore = random_masking(tokens, ratio, generator(1))
    assert visible.shape == (3, count - hidden, 3)
    assert mask.shape == (3, count) and restore.shape == (3, count)
    assert mask.sum(dim=1).tolist() == [hidden] * 3
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_random_masking_visible_tokens_are_the_unmasked_ones_and_restore_puts_them_back() -> None:
    batch, count = 3, 16
    tokens = numbered_tokens(batch, count)
    visible, mask, restore = random_masking(tokens, 0.75, generator(2))
    keep = count - 12
    for b in range(batch):
        assert sorted(restore[b].tolist()) == list(range(count))  # a permutation
        ids = {int(v) for v in visible[b, :, 0]}
        assert ids == {1000 * b + n for n in range(count) if mask[b, n] == 0}
        assert all(torch.equal(row, row[0].expand_as(row)) for row in visible[b])  # whole tokens moved
        for n in range(count):
            if mask[b, n] == 0:  # a visible place takes its token from the visible list
                assert restore[b, n] < keep and visible[b, restore[b, n], 0] == 1000 * b + n
            else:  # a hidden place from the hidden part
                assert restore[b, n] >= keep
    # [visible, mask tokens] put back in place: the visible tokens where they were, the mask token elsewhere
    filler = torch.full((batch, count - keep, 3), -1.0)
    placed = torch.cat([visible, filler], dim=1).gather(1, restore[..., None].expand(-1, -1, 3))
    expected = torch.where(mask[..., None].bool(), torch.full_like(tokens, -1.0), tokens)
    assert torch.equal(placed, expected)


def test_random_masking_is_seeded_by_the_generator() -> None:
    tokens = numbered_tokens(2, 16)
    first, again = random_masking(tokens, 0.75, generator(7)), random_masking(tokens, 0.75, generator(7))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    other = random_masking(tokens, 0.75, generator(8))
    assert not torch.equal(first[1], other[1])
    # Each image draws its own mask.
    assert not torch.equal(first[1][0], first[1][1])


@pytest.mark.parametrize(("count", "ratio"), [(16, 0.0), (16, 1.0), (16, 0.02), (16, 0.97), (2, 0.2)])
def test_random_masking_refuses_hiding_nothing_or_everything(count: int, ratio: float) -> None:
    with pytest.raises(OptionError, match="mask_ratio"):
        random_masking(numbered_tokens(1, count), ratio, generator(0))


# ---------------------------------------------------------------------------------------------------------------
# sincos_position_embedding

def ref_sincos(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    rows, columns = grid
    quarter = dim // 4
    out = torch.zeros(rows * columns, dim, dtype=torch.float64)
    for n in range(rows * columns):
        r, c = divmod(n, columns)
        for i in range(quarter):
            w = 1.0 / 10000 ** (i / (dim / 4))
            out[n, i] = math.sin(r * w)
            out[n, quarter + i] = math.cos(r * w)
            out[n, 2 * quarter + i] = math.sin(c * w)
            out[n, 3 * quarter + i] = math.cos(c * w)
    return out


@pytest.mark.parametrize(("dim", "grid"), [(8, (2, 3)), (12, (3, 2)), (16, (4, 4)), (4, (1, 5))])
def test_sincos_position_embedding_matches_the_hand_formula(dim: int, grid: tuple[int, int]) -> None:
    embedding = sincos_position_embedding(dim, grid)
    assert embedding.shape == (grid[0] * grid[1], dim) and embedding.dtype == torch.float32
    torch.testing.assert_close(embedding.double(), ref_sincos(dim, grid), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [6, 10, 2])
def test_sincos_position_embedding_needs_a_multiple_of_four(dim: int) -> None:
    with pytest.raises(OptionError, match="decoder_dim"):
        sincos_position_embedding(dim, (2, 2))


# ---------------------------------------------------------------------------------------------------------------
# MAE

def vit(image_size: int = 32, **backbone_args):
    torch.manual_seed(0)
    return create_backbone("test_vit", image_size=image_size, backbone_args={"patch_size": 8, **backbone_args})


def make_mae(**kwargs) -> MAE:
    mae = MAE(vit(), decoder_dim=16, decoder_depth=1, decoder_heads=2, **kwargs)
    return mae.eval()


def test_mae_encoder_sees_the_class_token_and_the_visible_patches_only() -> None:
    mae = make_mae()
    seen = []
    hook = mae.backbone.model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    try:
        result = mae.masked_pass(randn(2, 3, 32, 32, seed=300), generator(1))
    finally:
        hook.remove()
    assert seen == [torch.Size([2, 1 + 4, 64])]  # 16 patches, 12 hidden: the CLS and 4 patches
    assert result.latent.shape == (2, 5, 64)
    assert result.prediction.shape == (2, 16, 8 * 8 * 3)
    assert result.mask.sum(dim=1).tolist() == [12.0, 12.0]
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)


def patch_region(index: int, p: int = 8, columns: int = 4) -> tuple[slice, slice]:
    gy, gx = divmod(index, columns)
    return slice(gy * p, (gy + 1) * p), slice(gx * p, (gx + 1) * p)


def test_mae_hidden_pixels_do_not_reach_the_encoder() -> None:
    mae = make_mae()
    images = randn(2, 3, 32, 32, seed=310)
    with torch.no_grad():
        latent, mask, _ = mae.encode_visible(images, generator(5))
        hidden = int(torch.nonzero(mask[0] == 1)[0])
        shown = int(torch.nonzero(mask[0] == 0)[0])
        changed = images.clone()
        rows, columns = patch_region(hidden)
        changed[0, :, rows, columns] += 5.0
        latent_hidden_changed, mask_again, _ = mae.encode_visible(changed, generator(5))
        changed = images.clone()
        rows, columns = patch_region(shown)
        changed[0, :, rows, columns] += 5.0
        latent_visible_changed, _, _ = mae.encode_visible(changed, generator(5))
    assert torch.equal(mask_again, mask)  # the mask depends on the generator only
    torch.testing.assert_close(latent_hidden_changed, latent, rtol=0, atol=1e-6)
    assert (latent_visible_changed[0] - latent[0]).abs().max() > 1e-2
    torch.testing.assert_close(latent_visible_changed[1], latent[1], rtol=0, atol=1e-6)  # images are independent


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_reconstructions_keep_the_visible_patches(norm_pix: bool) -> None:
    mae = make_mae(norm_pix=norm_pix)
    images = randn(2, 3, 32, 32, seed=320)
    blanked, prediction, pasted = mae.reconstructions(images, generator(9))
    mask = mae.masked_pass(images, generator(9)).mask
    for out in (blanked, prediction, pasted):
        assert out.shape == images.shape
    for b in range(2):
        for n in range(16):
            rows, columns = patch_region(n)
            if mask[b, n] == 0:
                assert torch.equal(pasted[b, :, rows, columns], images[b, :, rows, columns])
                assert torch.equal(blanked[b, :, rows, columns], images[b, :, rows, columns])
            else:
                assert not blanked[b, :, rows, columns].any()
                assert torch.equal(pasted[b, :, rows, columns], prediction[b, :, rows, columns])


def test_mae_refuses_a_cnn_backbone_a_bad_decoder_width_and_a_mask_hiding_all() -> None:
    with pytest.raises(BackboneError, match="MAE runs a timm VisionTransformer's layers itself .* ResNet is not one"):
        MAE(create_backbone("test_resnet"), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with pytest.raises(OptionError, match="decoder_dim"):
        MAE(vit(), decoder_dim=18, decoder_depth=1, decoder_heads=2)
    with pytest.raises(OptionError, match="mask_ratio.*0.99 hides 16 of 16 patches"):  # refused when built
        MAE(vit(), mask_ratio=0.99, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def test_mae_encoder_positions_are_fixed_sincos() -> None:
    backbone = vit()
    MAE(backbone, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    table = backbone.model.pos_embed[0].double()
    torch.testing.assert_close(table[0], torch.zeros(64, dtype=torch.float64))  # the class token's row
    torch.testing.assert_close(table[1:], ref_sincos(64, (4, 4)), **F32)
    assert not backbone.model.pos_embed.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# DINOHead, by_resolution

def ref_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_head(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """The MLP (GELU between linear layers), L2 normalization, then g * v / |v| per prototype row, in float64."""
    h = x.double()
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    for index, linear in enumerate(linears):
        h = h @ linear.weight.detach().double().T + linear.bias.detach().double()
        if index < len(linears) - 1:
            h = ref_gelu(h)
    h = h / h.norm(dim=1, keepdim=True)
    weight_norm = head.last_layer.parametrizations.weight
    g, v = weight_norm.original0.detach().double(), weight_norm.original1.detach().double()
    weight = torch.stack([g[k] * v[k] / math.sqrt(sum(float(e) ** 2 for e in v[k])) for k in range(len(v))])
    return h @ weight.T


def head_step(head: DINOHead, seed: int) -> None:
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    head(randn(4, 6, seed=seed)).pow(2).sum().backward()
    optimizer.step()


def test_dino_head_output_and_unit_prototypes() -> None:
    torch.manual_seed(400)
    head = DINOHead(6, 10, hidden_dim=12, bottleneck_dim=5)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert head.last_layer.bias is None
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    x = randn(3, 6, seed=401)
    torch.testing.assert_close(head(x).double(), ref_head(head, x), **F32)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10), rtol=0, atol=1e-6)
    direction = head.last_layer.weight.detach().clone()
    head_step(head, 402)
    assert not torch.allclose(head.last_layer.weight, direction)  # the prototypes moved...
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10), rtol=0, atol=1e-6)  # on the sphere
    assert torch.equal(magnitude, torch.ones_like(magnitude))
    torch.testing.assert_close(head(x).double(), ref_head(head, x), **F32)


def test_dino_head_magnitude_trains_without_norm_last_layer() -> None:
    torch.manual_seed(410)
    head = DINOHead(6, 10, hidden_dim=12, bottleneck_dim=5, layers=2, norm_last_layer=False)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear]
    magnitude = head.last_layer.parametrizations.weight.original0
    assert magnitude.requires_grad and torch.equal(magnitude, torch.ones_like(magnitude))  # starts at 1
    head_step(head, 411)
    assert not torch.allclose(magnitude, torch.ones_like(magnitude))
    # |g| per row (a large step may take g below 0)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), magnitude.detach().abs().reshape(-1), **F32)
    x = randn(3, 6, seed=412)
    torch.testing.assert_close(head(x).double(), ref_head(head, x), **F32)


@pytest.mark.parametrize(("sizes", "runs"), [
    ([32, 32, 16, 16, 16], [[0, 1], [2, 3, 4]]),
    ([32, 16, 32], [[0], [1], [2]]),  # consecutive runs only
    ([16], [[0]]),
    ([], []),
    ([(32, 48), (32, 48), (48, 32)], [[0, 1], [2]]),  # the whole size, not one side
])
def test_by_resolution_groups_consecutive_sizes(sizes: list, runs: list[list[int]]) -> None:
    views = [torch.zeros(2, 3, *(size if isinstance(size, tuple) else (size, size))) for size in sizes]
    assert by_resolution(views) == runs


# ---------------------------------------------------------------------------------------------------------------
# DINO

def make_dino(**kwargs) -> DINO:
    backbone = vit(dynamic_img_size=True)
    options = {"total_steps": 10, "steps_per_epoch": 2, "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8,
               "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3, **kwargs}
    return DINO(backbone, **options)


@pytest.mark.parametrize("warmup_epochs", [3, 2, 1, 0])
def test_dino_teacher_temperature_schedule(warmup_epochs: int) -> None:
    method = make_dino(warmup_teacher_temp_epochs=warmup_epochs)
    # The official DINO schedule, per epoch: linspace(warmup, final, warmup epochs), then the final temperature.
    schedule = np.concatenate([np.linspace(0.04, 0.07, warmup_epochs), np.full(10, 0.07)])
    for k in range(12):
        method.steps_done.fill_(k)
        assert method.current_teacher_temp() == pytest.approx(float(schedule[k // 2]), rel=1e-12), k
    # The step count is in the state dict (a resumed run continues the schedule).
    assert int(method.state_dict()["steps_done"]) == 11


@pytest.mark.parametrize(("freeze", "step", "dropped"), [(1, 0, True), (1, 1, True), (1, 2, False), (2, 3, True),
                                                          (2, 4, False), (0, 0, False)])
def test_dino_last_layer_frozen_in_the_first_epochs(freeze: int, step: int, dropped: bool) -> None:
    method = make_dino(freeze_last_layer=freeze)
    trainable = [p for p in method.parameters() if p.requires_grad]
    for index, parameter in enumerate(trainable):
        parameter.grad = torch.full_like(parameter, float(index + 1))
    last = {id(p) for p in method.head.last_layer.parameters()}
    assert len(last) == 2  # the weight norm's magnitude and direction
    method.before_optimizer_step(step)
    for index, parameter in enumerate(trainable):
        if id(parameter) in last and dropped:
            assert parameter.grad is None
        else:
            assert parameter.grad is not None and torch.equal(parameter.grad, torch.full_like(parameter, index + 1.0))


def test_dino_teacher_follows_the_cosine_ema() -> None:
    method = make_dino()
    student = dict(method.backbone.named_parameters()) | {f"head.{n}": p for n, p in method.head.named_parameters()}
    teacher = (dict(method.teacher_backbone.named_parameters())
               | {f"head.{n}": p for n, p in method.teacher_head.named_parameters()})
    assert student.keys() == teacher.keys()
    with torch.no_grad():
        for index, parameter in enumerate(method.parameters()):
            if parameter.requires_grad:  # the student moves away from its copy
                parameter.add_(randn(*parameter.shape, seed=500 + index, scale=0.1))
    before = {name: (t.detach().double().clone(), student[name].detach().double().clone())
              for name, t in teacher.items()}
    step = 3
    method.after_optimizer_step(step)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * step / 10) + 1) / 2
    for name in ("model.cls_token", "model.blocks.0.attn.qkv.weight", "head.mlp.0.weight",
                 "head.last_layer.parametrizations.weight.original1"):
        t, s = before[name]
        assert not torch.equal(t, s), name
        torch.testing.assert_close(teacher[name].detach().double(), m * t + (1 - m) * s, **F32)
    assert int(method.steps_done) == step + 1


def dino_views(batch: int = 3) -> list[torch.Tensor]:
    return [randn(batch, 3, 32, 32, seed=510), randn(batch, 3, 32, 32, seed=511),
            randn(batch, 3, 16, 16, seed=512), randn(batch, 3, 16, 16, seed=513)]


def test_dino_views_loss_updates_the_center_and_trains_the_student_only() -> None:
    method = make_dino()
    method.train()
    assert method.backbone.training and method.head.training
    assert not any(m.training for module in method.momentum_modules() for m in module.modules())
    views = dino_views()
    with torch.no_grad():  # the teacher's logits and the student's, through timm's own forward, one view at a time
        teacher = [method.teacher_head(method.teacher_backbone.model(view)) for view in views[:2]]
        student = [method.head(method.backbone.model(view)) for view in views]
    temperature = method.current_teacher_temp()
    loss, embedding = method.views_loss(views)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert embedding.shape == (3, 64)
    torch.testing.assert_close(loss.double(), ref_dino(student, teacher, torch.zeros(32), 0.1, temperature),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.center.double(), ref_center(torch.zeros(32), teacher, 0.9), rtol=1e-4,
                               atol=1e-6)
    loss.backward()
    for module in method.momentum_modules():
        assert all(p.grad is None for p in module.parameters())
    assert method.backbone.model.cls_token.grad is not None and method.backbone.model.cls_token.grad.abs().sum() > 0
    assert method.head.mlp[0].weight.grad is not None
    # and a second call keeps the EMA of the centre going from the new one
    first_center = method.center.clone()
    method.views_loss(views)
    torch.testing.assert_close(method.center.double(), ref_center(first_center, teacher, 0.9), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# part_crop_box

def edge_parts(height: int, width: int) -> list[tuple[float, float]]:
    """Positions at every corner and edge (the last pixel included) and the centre."""
    xs, ys = (0.0, width / 2, width - 0.01), (0.0, height / 2, height - 0.01)
    return [(x, y) for x in xs for y in ys] + [(0.5, height - 0.5), (width - 0.5, 0.5)]


@pytest.mark.parametrize(("height", "width"), [(20, 30), (31, 17), (8, 8), (1, 12)])
@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.49])
@pytest.mark.parametrize("scale", [(0.05, 0.1), (0.3, 1.0), (1.0, 1.0)])
def test_part_crop_box_contains_the_part_and_stays_in_the_image(height: int, width: int, jitter: float,
                                                                scale: tuple[float, float]) -> None:
    for x, y in edge_parts(height, width):
        parts = np.array([[x, y, 1.0]])
        for seed in range(25):
            found = part_crop_box((height, width), parts, scale, jitter, np.random.default_rng(seed))
            assert found is not None
            (x0, y0, x1, y1), index = found
            assert index == 0
            assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (x, y, seed, found)
            assert x0 <= math.floor(x) < x1 and y0 <= math.floor(y) < y1, (x, y, seed, found)


def test_part_crop_box_chooses_visible_parts_inside_the_image_only() -> None:
    height, width = 20, 30
    parts = np.array([[5.0, 5.0, 1.0],      # visible
                      [6.0, 6.0, 0.0],      # not visible
                      [30.0, 5.0, 1.0],     # x == width: outside
                      [5.0, 20.0, 1.0],     # y == height: outside
                      [-0.5, 3.0, 1.0],     # left of the image
                      [29.9, 19.9, 2.0],    # visible (any flag > 0)
                      [12.0, 8.0, 1.0]])    # visible
    chosen = set()
    for seed in range(200):
        (x0, y0, x1, y1), index = part_crop_box((height, width), parts, (0.05, 0.2), 0.3, np.random.default_rng(seed))
        chosen.add(index)
        x, y = parts[index, :2]
        assert x0 <= math.floor(x) < x1 and y0 <= math.floor(y) < y1
    assert chosen == {0, 5, 6}
    # the same draws from the same generator state
    assert (part_crop_box((height, width), parts, (0.05, 0.2), 0.3, np.random.default_rng(3))
            == part_crop_box((height, width), parts, (0.05, 0.2), 0.3, np.random.default_rng(3)))


@pytest.mark.parametrize("parts", [
    np.zeros((0, 3)),
    np.array([[4.0, 4.0, 0.0], [2.0, 3.0, 0.0]]),
    np.array([[30.0, 4.0, 1.0], [4.0, -1.0, 1.0], [-0.1, 2.0, 1.0], [3.0, 20.0, 1.0]]),
])
def test_part_crop_box_without_a_visible_part_is_none(parts: np.ndarray) -> None:
    assert part_crop_box((20, 30), parts, (0.05, 0.4), 0.25, np.random.default_rng(0)) is None


@pytest.mark.parametrize("jitter", [0.5, 0.7, -0.1])
def test_local_crops_refuse_a_jitter_that_could_miss_the_part(jitter: float) -> None:
    with pytest.raises(OptionError, match="part_jitter"):
        LocalCrops(LOCAL_VIEW, 16, 3, on_parts=True, part_jitter=jitter)
    assert LocalCrops(LOCAL_VIEW, 16, 3, on_parts=True, part_jitter=0.49).part_jitter == 0.49


# ---------------------------------------------------------------------------------------------------------------
# MultiViewTransform with local crops

def parts_sample(height: int = 48, width: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    parts = np.array([[10.0, 12.0, 1.0], [30.5, 40.2, 1.0], [3.0, 3.0, 0.0]], dtype=np.float32)
    return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "index": 0, "parts": parts,
            "label": 1}


def dino_transform(on_parts: bool = True, **kwargs) -> MultiViewTransform:
    return MultiViewTransform(method_views("dino"), 32, local=LocalCrops(LOCAL_VIEW, 16, 3, on_parts=on_parts),
                              **kwargs)


def test_multi_view_transform_gives_global_then_local_crops() -> None:
    transform = dino_transform()
    out = transform(parts_sample(), seed=4)
    assert set(out) == {"views", "index"} and out["index"] == 0  # no label
    assert [tuple(view.shape) for view in out["views"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(view.dtype == torch.float32 for view in out["views"])
    again, other = transform(parts_sample(), seed=4), transform(parts_sample(), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(out["views"], again["views"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(out["views"], other["views"], strict=True))
    # the local crops differ from one another (each has its own seed)
    assert not torch.equal(out["views"][2], out["views"][3])


NO_COLOUR = ViewRecipe(hflip=0.0, jitter_prob=0.0, grayscale=0.0, blur=0.0)
SMALL_PLAIN = ViewRecipe(crop_scale=(0.05, 0.1), hflip=0.0, jitter_prob=0.0, grayscale=0.0, blur=0.0)
UNIT_RANGE = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def red_part_sample(part: tuple[float, float], height: int = 64, width: int = 64, *, red_at=None, **extra) -> dict:
    """All blue, with a red 3 x 3 square around `red_at` (default: the part); the only visible part is `part`, an
    invisible one and one outside the image go with it."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 2] = 255
    cx, cy = (math.floor(v) for v in (red_at or part))
    image[cy - 1 : cy + 2, cx - 1 : cx + 2] = (255, 0, 0)
    parts = np.array([[part[0], part[1], 1.0], [5.0, 5.0, 0.0], [width + 3.0, 10.0, 1.0]], dtype=np.float32)
    return {"image": image, "index": 3, "parts": parts, "label": 0, **extra}


def local_transform(on_parts: bool, count: int = 4, **kwargs) -> MultiViewTransform:
    return MultiViewTransform((NO_COLOUR,), 16, local=LocalCrops(SMALL_PLAIN, 16, count, on_parts=on_parts),
                              preprocessing=UNIT_RANGE, **kwargs)


def has_red(view: torch.Tensor) -> bool:
    return view[0].max().item() > 0.02  # the blue background has no red at all (no colour changes)


def test_part_centred_local_crops_contain_their_part() -> None:
    sample = red_part_sample((40.5, 20.5))
    on_parts, anywhere = local_transform(True), local_transform(False)
    missed = 0
    for seed in range(20):
        views = on_parts(sample, seed)["views"][1:]
        assert len(views) == 4
        assert all(has_red(view) for view in views), seed
        missed += sum(not has_red(view) and view[0].max().item() == 0 for view in anywhere(sample, seed)["views"][1:])
    assert missed > 0  # random crops of the same scale do miss the part, so the check above can fail


def test_local_crops_without_a_visible_part_are_random_crops() -> None:
    sample = red_part_sample((40.5, 20.5))
    sample["parts"][:, 2] = 0.0
    for seed in (0, 1):
        with_parts, without = local_transform(True)(sample, seed), local_transform(False)(sample, seed)
        assert len(with_parts["views"]) == 5
        assert all(torch.equal(a, b) for a, b in zip(with_parts["views"], without["views"], strict=True))


def test_local_crops_on_parts_need_part_keypoints() -> None:
    sample = red_part_sample((40.5, 20.5))
    del sample["parts"]
    with pytest.raises(OptionError, match="local_crops_on_parts"):
        local_transform(True)(sample, 0)
    assert len(local_transform(False)(sample, 0)["views"]) == 5  # random crops need none


def test_views_in_box_shifts_the_parts_into_the_box() -> None:
    # The box's pixels start at (24, 16): the part at (30.5, 26.5) of the image is (6.5, 10.5) of the box. Read
    # unshifted, (30.5, 26.5) of the box would be (54.5, 42.5) of the image, far from any red.
    box = np.array([24.0, 16.0, 64.0, 64.0])
    transform = local_transform(True, views_in_box=True)
    for seed in range(20):
        views = transform(red_part_sample((30.5, 26.5), bbox=box), seed)["views"]
        assert all(has_red(view) for view in views[1:]), seed
    # Sensitivity: a part at (54.5, 42.5) of the image, with the red square still at (30.5, 26.5), is followed there
    # and its crops hold no red.
    for seed in range(5):
        views = transform(red_part_sample((54.5, 42.5), red_at=(30.5, 26.5), bbox=box), seed)["views"]
        assert not any(has_red(view) for view in views[1:]), seed


# ---------------------------------------------------------------------------------------------------------------
# Backbone.cls_attention

def timm_cls_attention(backbone, images: torch.Tensor) -> torch.Tensor:
    """The softmax weights of the last block, as timm's own (non-fused) attention computes them."""
    attention = backbone.model.blocks[-1].attn
    attention.fused_attn = False
    captured = []
    hook = attention.attn_drop.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        with torch.no_grad():
            backbone(images)
    finally:
        hook.remove()
    (weights,) = captured
    return weights


@pytest.mark.parametrize(("height", "width", "grid"), [(32, 32, (4, 4)), (32, 48, (4, 6))])
def test_cls_attention_matches_timm_attention(height: int, width: int, grid: tuple[int, int]) -> None:
    backbone = vit(dynamic_img_size=True) if (height, width) != (32, 32) else vit()
    backbone.eval()
    images = randn(2, 3, height, width, seed=600)
    weights = timm_cls_attention(backbone, images)
    heads = backbone.model.blocks[-1].attn.num_heads
    count = 1 + grid[0] * grid[1]
    assert weights.shape == (2, heads, count, count)
    with torch.no_grad():
        maps = backbone.cls_attention(images)
    assert maps.shape == (2, heads, *grid)
    torch.testing.assert_close(maps, weights[:, :, 0, 1:].reshape(2, heads, *grid), rtol=0, atol=1e-6)
    # Each head's map sums to 1 less what the class token gives itself.
    sums = maps.sum(dim=(2, 3))
    assert (sums <= 1 + 1e-6).all() and (sums > 0).all()
    torch.testing.assert_close(sums + weights[:, :, 0, 0], torch.ones(2, heads), rtol=0, atol=1e-5)


def test_cls_attention_needs_a_vision_transformer() -> None:
    with pytest.raises(BackboneError, match="VisionTransformer"):
        create_backbone("test_resnet").cls_attention(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# Optimization: gradient clipping

GRADIENTS = {"weight": [[3.0, 0.0, -4.0], [1.0, 2.0, 2.0]], "bias": [0.1, -0.2]}  # norms sqrt(34) and sqrt(0.05)


def clipping_setup(clip_grad: float | None, clip_mode: str = "norm"):
    torch.manual_seed(700)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = torch.tensor(GRADIENTS[name])
    return model, Optimization(optimizer, scheduler, clip_grad=clip_grad, clip_mode=clip_mode), before


def steps(model: nn.Module, before: dict) -> dict[str, torch.Tensor]:
    return {name: p.detach().double() - before[name] for name, p in model.named_parameters()}


def squared(values) -> float:
    return sum(squared(v) for v in values) if isinstance(values, list) else values * values


@pytest.mark.parametrize("clip_grad", [0.5, 3.0, 100.0])
def test_clip_by_global_norm(clip_grad: float) -> None:
    model, optimization, before = clipping_setup(clip_grad, "norm")
    optimization.step()
    total = math.sqrt(squared(GRADIENTS["weight"]) + squared(GRADIENTS["bias"]))
    factor = min(1.0, clip_grad / total)
    for name, step in steps(model, before).items():
        torch.testing.assert_close(step, -factor * torch.tensor(GRADIENTS[name], dtype=torch.float64), **F32)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_clip_by_parameter_norm() -> None:
    model, optimization, before = clipping_setup(0.5, "parameter")
    optimization.step()
    weight_norm = math.sqrt(squared(GRADIENTS["weight"]))
    moved = steps(model, before)
    # the weight's gradient (norm sqrt 34) is scaled to 0.5 on its own; the bias's (norm 0.22) is left as it is
    expected_weight = -0.5 / (weight_norm + 1e-6) * torch.tensor(GRADIENTS["weight"], dtype=torch.float64)
    torch.testing.assert_close(moved["weight"], expected_weight, **F32)
    torch.testing.assert_close(moved["bias"], -torch.tensor(GRADIENTS["bias"], dtype=torch.float64), **F32)
    # a global-norm clip would have scaled the bias too
    assert not torch.allclose(moved["bias"], -0.5 / math.sqrt(34.05) * torch.tensor(GRADIENTS["bias"],
                                                                                     dtype=torch.float64))


def test_no_clipping_leaves_the_gradients_alone() -> None:
    model, optimization, before = clipping_setup(None)
    optimization.step()
    for name, step in steps(model, before).items():
        torch.testing.assert_close(step, -torch.tensor(GRADIENTS[name], dtype=torch.float64), **F32)


def test_clipping_reads_the_unscaled_gradients_of_a_grad_scaler() -> None:
    """fp16's scaler multiplies the gradients by its scale; the clip must see them unscaled, and the step too."""
    model, optimization, before = clipping_setup(0.5, "norm")
    scale = 1024.0
    optimization.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    model.zero_grad(set_to_none=True)
    # A loss linear in the parameters, whose gradients are GRADIENTS; backward leaves them times the scale.
    optimization.backward(sum((p * torch.tensor(GRADIENTS[name])).sum() for name, p in model.named_parameters()))
    assert torch.allclose(model.weight.grad, torch.tensor(GRADIENTS["weight"]) * scale)
    optimization.step()
    total = math.sqrt(squared(GRADIENTS["weight"]) + squared(GRADIENTS["bias"]))
    for name, step in steps(model, before).items():
        torch.testing.assert_close(step, -(0.5 / total) * torch.tensor(GRADIENTS[name], dtype=torch.float64), **F32)


def test_unknown_clip_mode_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="clip_mode"):
        clipping_setup(0.5, "value")
