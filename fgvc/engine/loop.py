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

from fgvc.data.loader import UNREADABLE, TooManyUnreadableImages, UnreadableImages
from fgvc.engine.localization import LocalizationMeter, localization_maps
from fgvc.engine.metrics import ClassificationMeter
from fgvc.engine.tta import View, average_views
from fgvc.mixing import Mixer
from fgvc.models import FGVCModel


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so a resumed run continues at the same batch."""

    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps so far
    best_top1: float = -math.inf  # best validation top-1 so far
    best_epoch: int = -1


@dataclass
class Precision:
    """Mixed precision: autocast dtype (None: fp32) and, for fp16, a gradient scaler."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def from_name(cls, name: str, device: torch.device) -> Precision:
        if name == "none":
            return cls(device.type)
        if name == "bf16":
            return cls(device.type, torch.bfloat16)
        if name == "fp16":
            if device.type != "cuda":
                raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 on the CPU")
            return cls(device.type, torch.float16, torch.amp.GradScaler("cuda"))
        raise ValueError(f"train.amp must be none, bf16 or fp16, got {name!r}")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


def train_one_epoch(
    model: FGVCModel,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable[dict],
    state: TrainState,
    *,
    batches_in_epoch: int,
    device: torch.device,
    precision: Precision,
    grad_accum: int = 1,
    channels_last: bool = False,
    after_step: Callable[[TrainState, Callable[[], dict[str, float]]], bool] = lambda state, stats: False,
    unreadable: UnreadableImages | None = None,
    mixer: Mixer | None = None,
) -> dict[str, float] | None:
    """Train from batch `state.batch` of `state.epoch` to the end of the epoch.

    `after_step(state, stats)` runs after every optimizer step; `stats()` gives the running loss, accuracy,
    images/s and lr (it synchronizes with the device, so call it only when logging). `after_step` returns True to
    stop early (the caller checkpoints). Returns the epoch's statistics, or None if stopped.
    Gradients of `grad_accum` batches are summed per step; the epoch's last step averages over the batches left.
    Unreadable images arrive left out of their batch and are counted by `unreadable`, which stops the run when
    there are too many; a batch with no readable image still counts as a batch, so the schedule is unchanged.
    `mixer` (fgvc.mixing) mixes each batch before the step, with draws that depend on the batch's position.
    """
    model.train()
    totals = torch.zeros(3, device=device)  # loss x images, correct, images -- summed on device, read rarely
    start = time.perf_counter()
    for batch in loader:
        _count_unreadable(batch, unreadable)
        group_start = state.batch - state.batch % grad_accum
        group_size = min(grad_accum, batches_in_epoch - group_start)
        if "image" in batch:
            batch = to_device(batch, device, channels_last)
            if mixer is not None:
                batch = mixer(batch, model, epoch=state.epoch, index=state.batch)
            with precision.autocast():
                outputs, losses = model.training_step(batch, criterion)
            loss = losses["loss"] / group_size
            if precision.scaler is not None:
                precision.scaler.scale(loss).backward()
            else:
                loss.backward()
            with torch.no_grad():
                n = batch["label"].shape[0]
                correct = (outputs["logits"].argmax(dim=1) == batch["label"]).sum()
                totals += torch.stack([losses["loss"].detach().float() * n, correct.float(), totals.new_tensor(n)])
        state.batch += 1
        if state.batch - group_start < group_size:
            continue
        if precision.scaler is not None:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        if after_step(state, functools.partial(_stats, totals, start, optimizer)):
            return None
    return _stats(totals, start, optimizer)


def _count_unreadable(batch: dict, unreadable: UnreadableImages | None) -> None:
    reports = batch.pop(UNREADABLE, ())
    if reports and unreadable is None:
        raise TooManyUnreadableImages(f"unreadable images: {reports}")
    if unreadable is not None:
        unreadable.add(reports)


def _stats(totals: torch.Tensor, start: float, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    loss_sum, correct, images = totals.tolist()
    images = max(images, 1.0)
    return {"loss": loss_sum / images, "top1": 100.0 * correct / images,
            "images_per_s": images / (time.perf_counter() - start), "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model: FGVCModel, loader: Iterable[dict], *, num_classes: int, device: torch.device,
             precision: Precision, channels_last: bool = False,
             localization: LocalizationMeter | None = None,
             unreadable: UnreadableImages | None = None,
             views: View | None = None, average: str = "probs",
             meter: ClassificationMeter | None = None) -> dict[str, float]:
    """Top-1, top-5 and per-class accuracy over the whole loader (with the head's test-time passes, if any), and
    the localization metrics when a meter is given.

    views: test-time augmentation (fgvc.engine.tta): the model's logits on each view of a batch are averaged as
    `average` says; None is the single crop. `meter` (optional) keeps the predictions, e.g. for the confusion
    matrix. Unreadable images are left out and counted by `unreadable`; the result then says how many
    ("excluded_images")."""
    model.eval()
    meter = meter if meter is not None else ClassificationMeter(num_classes)
    for batch in loader:
        _count_unreadable(batch, unreadable)
        if "image" not in batch:
            continue
        batch = to_device(batch, device, channels_last)
        with precision.autocast():
            if views is None:
                outputs = model(batch["image"])
                scores = outputs["logits"]
                if localization is not None:
                    localization.update(localization_maps(model, batch["image"], batch["label"], outputs), batch)
            else:
                scores = average_views([model(view)["logits"] for view in views(batch["image"])], average)
        meter.update(scores, batch["label"], batch["index"])
    metrics = meter.compute() | (localization.compute() if localization is not None else {})
    if unreadable is not None:
        metrics["excluded_images"] = len(unreadable.reasons)
    return metrics
