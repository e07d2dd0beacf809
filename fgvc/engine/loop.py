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

from fgvc.engine.localization import LocalizationMeter, localization_maps
from fgvc.engine.metrics import ClassificationMeter
from fgvc.engine.tta import View, average_views
from fgvc.errors import FGVCError, OptionError
from fgvc.mixing import Mixer
from fgvc.models import FGVCModel

AMP_MODES = ("none", "bf16", "fp16")


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
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if "image" in moved:  # a batch of cached features has none
            moved["image"] = self.images(moved["image"])
        return moved


@dataclass
class Optimization:
    """How gradients become steps: the optimizer and its per-step schedule, gradients of `grad_accum` batches
    summed per step, and for fp16 a gradient scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_accum: int = 1
    scaler: torch.amp.GradScaler | None = None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
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

    def __init__(self, step: int, epoch: int, batch: int, losses: dict[str, torch.Tensor]) -> None:
        terms = ", ".join(f"{name} {float(value):.4g}" for name, value in losses.items())
        super().__init__(f"the training loss is not finite at step {step} (epoch {epoch + 1}, batch {batch + 1}): "
                         f"{terms}")


def check_finite(group: list[tuple[int, dict[str, torch.Tensor]]], state: TrainState) -> None:
    """Raise NonFiniteLoss for the first batch of an optimizer step's group whose loss is NaN or infinite. One
    device sync per step, before the step is taken."""
    if group and not torch.stack([torch.isfinite(losses["loss"]) for _, losses in group]).all():
        batch, losses = next(entry for entry in group if not torch.isfinite(entry[1]["loss"]))
        raise NonFiniteLoss(state.step + 1, state.epoch, batch, losses)


AfterStep = Callable[[TrainState, Callable[[], dict[str, float]]], bool]


def train_one_epoch(model: FGVCModel, criterion: nn.Module, optimization: Optimization, loader: Iterable[dict],
                    runtime: Runtime, state: TrainState, *, mixer: Mixer | None = None,
                    after_step: AfterStep | None = None) -> dict[str, float] | None:
    """Train from batch `state.batch` of `state.epoch` to the end of the epoch (`loader` yields what is left).

    `after_step(state, stats)` runs after every optimizer step; `stats()` gives the running loss, accuracy,
    images/s and lr (it synchronizes with the device, so call it only when logging). `after_step` returns True to
    stop early (the caller checkpoints). Returns the epoch's statistics, or None if stopped. Gradients of
    `optimization.grad_accum` batches are summed per step; the epoch's last step averages over the batches left. A
    batch with no readable image ({}) still counts as a batch, so the schedule is unchanged. `mixer`
    (fgvc.mixing) mixes each batch before the step, with draws that depend on the batch's position. A non-finite
    loss raises NonFiniteLoss before the optimizer step, so no step is taken from it.
    """
    model.train()
    batches_in_epoch = state.batch + len(loader)
    grad_accum = optimization.grad_accum
    totals = torch.zeros(3, device=runtime.device)  # loss x images, correct, images -- summed on device, read rarely
    start = time.perf_counter()
    group: list[tuple[int, dict[str, torch.Tensor]]] = []  # (batch, losses) of the step being accumulated
    for batch in loader:
        group_start = state.batch - state.batch % grad_accum
        group_size = min(grad_accum, batches_in_epoch - group_start)
        if batch:  # {}: every image of the batch was unreadable
            batch = runtime.batch(batch)
            if mixer is not None:
                batch = mixer(batch, model, epoch=state.epoch, index=state.batch)
            with runtime.autocast():
                outputs, losses = model.training_step(batch, criterion)
            optimization.backward(losses["loss"] / group_size)
            group.append((state.batch, {name: value.detach() for name, value in losses.items()}))
            with torch.no_grad():
                n = batch["label"].shape[0]
                correct = (outputs["logits"].argmax(dim=1) == batch["label"]).sum()
                totals += torch.stack([losses["loss"].detach().float() * n, correct.float(), totals.new_tensor(n)])
        state.batch += 1
        if state.batch - group_start < group_size:
            continue
        check_finite(group, state)
        group.clear()
        optimization.step()
        state.step += 1
        if after_step is not None and after_step(state, functools.partial(_stats, totals, start, optimization)):
            return None
    return _stats(totals, start, optimization)


def _stats(totals: torch.Tensor, start: float, optimization: Optimization) -> dict[str, float]:
    loss_sum, correct, images = totals.tolist()
    images = max(images, 1.0)
    return {"loss": loss_sum / images, "top1": 100.0 * correct / images,
            "images_per_s": images / (time.perf_counter() - start), "lr": optimization.lr}


@torch.no_grad()
def evaluate(model: FGVCModel, loader: Iterable[dict], runtime: Runtime, *, num_classes: int,
             localization: LocalizationMeter | None = None, views: View | None = None, average: str = "probs",
             meter: ClassificationMeter | None = None) -> dict[str, float]:
    """Top-1, top-5 and per-class accuracy over the whole loader (with the head's test-time passes, if any), and
    the localization metrics when a meter is given.

    views: test-time augmentation (fgvc.engine.tta): the model's logits on each view of a batch are averaged as
    `average` says; None is the single crop. `meter` (optional) keeps the predictions, e.g. for the confusion
    matrix. Images a SplitLoader left out as unreadable are counted in the result ("excluded_images")."""
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
    metrics = meter.compute() | (localization.compute() if localization is not None else {})
    unreadable = getattr(loader, "unreadable", None)  # a SplitLoader's, or that of the images a cache was made of
    if unreadable is not None:
        metrics["excluded_images"] = len(unreadable.reasons)
    return metrics
