"""train_one_epoch and evaluate, in the style of the torchvision reference scripts."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fgvc.engine.distributed import Distributed, DistributedStep
from fgvc.engine.localization import LocalizationMeter, localization_maps
from fgvc.engine.metrics import ClassificationMeter
from fgvc.engine.tta import View, average_views
from fgvc.errors import FGVCError, OptionError
from fgvc.mixing import Mixer
from fgvc.models import FGVCModel

AMP_MODES = ("none", "bf16", "fp16")
CLIP_MODES = ("norm", "parameter")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so a resumed run continues at the same batch."""

    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps so far
    best_top1: float = -math.inf  # best validation top-1 so far
    best_epoch: int = -1


@dataclass
class Runtime:
    """Where and how the model computes: the device, the autocast dtype (None: fp32), channels-last inputs."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def create(cls, device: torch.device, amp: str = "none", channels_last: bool = False) -> Runtime:
        if amp not in AMP_MODES:
            raise OptionError("amp", f"{amp!r} is unknown; choose one of {', '.join(AMP_MODES)}")
        if amp == "fp16" and device.type != "cuda":
            raise OptionError("amp", "fp16 needs a CUDA device; use bf16 on the CPU")
        dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        return cls(device, dtype, channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def batch(self, batch: dict) -> dict:
        """The batch's tensors on the device; its images ("image", or the list of a self-supervised batch's
        "views") in the runtime's memory format."""
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if "image" in moved:  # a batch of cached features has none
            moved["image"] = self.images(moved["image"])
        if "views" in moved:
            moved["views"] = [self.images(view) for view in moved["views"]]
        return moved


@dataclass
class Optimization:
    """How gradients become steps: the optimizer and its per-step schedule, gradients of `grad_accum` batches
    summed per step, for fp16 a gradient scaler, and gradient clipping (clip_grad; None: off) by the global norm
    ("norm") or each parameter's ("parameter", DINO's), on the unscaled gradients."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_accum: int = 1
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"

    def __post_init__(self) -> None:
        if self.clip_mode not in CLIP_MODES:
            raise OptionError("clip_mode", f"{self.clip_mode!r} is unknown; choose one of {', '.join(CLIP_MODES)}")

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        gradients = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.clip_mode == "norm":
            nn.utils.clip_grad_norm_(gradients, self.clip_grad)
            return
        for parameter in gradients:  # DINO's clip_gradients: each parameter's norm on its own
            scale = self.clip_grad / (parameter.grad.norm() + 1e-6)
            parameter.grad.mul_(scale.clamp(max=1.0))

    def step(self) -> None:
        if self.clip_grad is not None:
            self.clip()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class NonFiniteLoss(FGVCError, FloatingPointError):
    """A training loss that is NaN or infinite: training stops there instead of carrying NaN weights onward."""

    def __init__(self, step: int, epoch: int, batch: int, losses: dict[str, torch.Tensor] | None) -> None:
        terms = ("on another rank" if losses is None
                 else ", ".join(f"{name} {float(value):.4g}" for name, value in losses.items()))
        super().__init__(f"the training loss is not finite at step {step} (epoch {epoch + 1}, batch {batch + 1}): "
                         f"{terms}")


def check_finite(group: list[tuple[int, dict[str, torch.Tensor]]], state: TrainState,
                 distributed: Distributed | None = None) -> None:
    """Raise NonFiniteLoss for the first batch of an optimizer step's group whose loss is NaN or infinite, on every
    rank when it happens on any. One device sync (and one tiny reduction under torchrun) per step, before the step
    is taken."""
    finite = not group or bool(torch.stack([torch.isfinite(losses["loss"]) for _, losses in group]).all())
    if distributed is not None and distributed.any(not finite) and finite:
        raise NonFiniteLoss(state.step + 1, state.epoch, state.batch - 1, None)
    if not finite:
        batch, losses = next(entry for entry in group if not torch.isfinite(entry[1]["loss"]))
        raise NonFiniteLoss(state.step + 1, state.epoch, batch, losses)


AfterStep = Callable[[TrainState, Callable[[], dict[str, float]]], bool]


def train_one_epoch(model: FGVCModel, criterion: nn.Module, optimization: Optimization, loader: Iterable[dict],
                    runtime: Runtime, state: TrainState, *, mixer: Mixer | None = None,
                    after_step: AfterStep | None = None,
                    ranks: DistributedStep | None = None) -> dict[str, float] | None:
    """Train from batch `state.batch` of `state.epoch` to the end of the epoch (`loader` yields what is left).

    `after_step(state, stats)` runs after every optimizer step; `stats()` gives the running loss, accuracy,
    images/s and lr (it synchronizes with the device, so call it only when logging). `after_step` returns True to
    stop early (the caller checkpoints). Returns the epoch's statistics, or None if stopped. Gradients of
    `optimization.grad_accum` batches are summed per step; the epoch's last step averages over the batches left. A
    batch with no readable image ({}) still counts as a batch, so the schedule is unchanged. `mixer`
    (fgvc.mixing) mixes each batch before the step, with draws that depend on the batch's position. A non-finite
    loss raises NonFiniteLoss before the optimizer step, so no step is taken from it.

    `ranks` (fgvc.engine.distributed) runs the step on every rank under torchrun: each rank trains its part of
    each global batch, gradients averaged over ranks (reduced once per step); statistics are summed over ranks, so
    `stats()` is a collective there: `after_step` calls it on every rank or on none.
    """
    ranks = ranks if ranks is not None else DistributedStep(model)
    model.train()
    batches_in_epoch = state.batch + len(loader)
    grad_accum = optimization.grad_accum
    names = model.running_statistics
    # loss x images, each running statistic x images, images -- summed on device, read rarely
    totals = torch.zeros(len(names) + 2, device=runtime.device)
    start = time.perf_counter()
    group: list[tuple[int, dict[str, torch.Tensor]]] = []  # (batch, losses) of the step being accumulated
    for batch in loader:
        group_start = state.batch - state.batch % grad_accum
        group_size = min(grad_accum, batches_in_epoch - group_start)
        reduce = state.batch + 1 - group_start == group_size  # the group's last batch: its backward reduces
        ranks.check(batch)
        if batch or ranks.joins_reduction(batch, reduce):
            with ranks.accumulating(reduce):
                losses = _train_batch(model, criterion, optimization, runtime, state, batch, mixer, ranks,
                                      group_size, totals)
            if batch:
                group.append((state.batch, losses))
        state.batch += 1
        if not reduce:
            continue
        check_finite(group, state, ranks.distributed)
        group.clear()
        ranks.before_optimizer_step()
        model.before_optimizer_step(state.step)
        optimization.step()
        state.step += 1
        model.after_optimizer_step(state.step - 1)
        running = functools.partial(_stats, names, totals, start, optimization, ranks.distributed)
        if after_step is not None and after_step(state, running):
            return None
    return _stats(names, totals, start, optimization, ranks.distributed)


def _train_batch(model: FGVCModel, criterion: nn.Module, optimization: Optimization, runtime: Runtime,
                 state: TrainState, batch: dict, mixer: Mixer | None, ranks: DistributedStep, group_size: int,
                 totals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward of one (micro-)batch, its loss divided by the batches of its step; its statistics
    added to `totals`. Returns its detached losses."""
    if batch:
        batch = runtime.batch(batch)
        if mixer is not None:
            batch = mixer(batch, model, epoch=state.epoch, index=ranks.micro_batch(state.batch))
    with runtime.autocast():
        outputs, losses = ranks.training_step(batch, criterion)
    optimization.backward(losses["loss"] / group_size)
    if batch:
        with torch.no_grad():
            n = len(batch["label"] if "label" in batch else batch["index"])  # pretraining's views have no label
            statistics = model.batch_statistics(outputs, batch)
            totals += torch.stack([losses["loss"].detach().float(),
                                   *(statistics[name].float() for name in model.running_statistics),
                                   totals.new_tensor(1.0)]) * n
    return {name: value.detach() for name, value in losses.items()}


def _stats(names: tuple[str, ...], totals: torch.Tensor, start: float, optimization: Optimization,
           distributed: Distributed | None = None) -> dict[str, float]:
    """The running loss and the model's running statistics (per-image means) over every rank's images so far."""
    *sums, images = (distributed.sum(totals) if distributed is not None else totals).tolist()
    means = [value / max(images, 1.0) for value in sums]
    return {"loss": means[0], **dict(zip(names, means[1:], strict=True)),
            "images_per_s": images / (time.perf_counter() - start), "lr": optimization.lr}


@torch.no_grad()
def evaluate(model: FGVCModel, loader: Iterable[dict], runtime: Runtime, *, num_classes: int,
             localization: LocalizationMeter | None = None, views: View | None = None, average: str = "probs",
             meter: ClassificationMeter | None = None, distributed: Distributed | None = None) -> dict[str, float]:
    """Top-1, top-5 and per-class accuracy over the whole loader (with the head's test-time passes, if any), and
    the localization metrics when a meter is given.

    views: test-time augmentation (fgvc.engine.tta): the model's logits on each view of a batch are averaged as
    `average` says; None is the single crop. `meter` (optional) keeps the predictions, e.g. for the confusion
    matrix. Images a SplitLoader left out as unreadable are counted in the result ("excluded_images"). Under
    torchrun (`distributed`) each rank evaluates its shard of the split and the counts are summed over ranks, so
    every image counts exactly once and every rank gets the same metrics (and, in `meter`, every prediction)."""
    model.eval()
    meter = meter if meter is not None else ClassificationMeter(num_classes)
    for batch in loader:
        if not batch:  # every image of the batch was unreadable
            continue
        batch = runtime.batch(batch)
        with runtime.autocast():
            if views is None:
                outputs = model.outputs(batch)
                scores = outputs["logits"]
                if localization is not None:
                    localization.update(localization_maps(model, batch["image"], batch["label"], outputs), batch)
            else:
                scores = average_views([model(view)["logits"] for view in views(batch["image"])], average)
        meter.update(scores, batch["label"], batch["index"])
    unreadable = getattr(loader, "unreadable", None)  # a SplitLoader's, or that of the images a cache was made of
    excluded = dict(unreadable.reasons) if unreadable is not None else None
    if distributed is not None and distributed.active:
        ranks = distributed.gather((meter, localization, excluded))
        meter.combine([rank_meter for rank_meter, _, _ in ranks])
        if localization is not None:
            localization.combine([rank_localization for _, rank_localization, _ in ranks])
        if excluded is not None:
            excluded = {path: reason for _, _, rank_excluded in ranks for path, reason in rank_excluded.items()}
            unreadable.check_total(len(excluded))  # data.max_bad_fraction holds for the split, not per shard
    metrics = meter.compute() | (localization.compute() if localization is not None else {})
    if excluded is not None:
        metrics["excluded_images"] = len(excluded)
    return metrics
