"""Run logs: metrics as strict JSON lines (and TensorBoard when it is installed), and training progress -- a tqdm
bar on a terminal, a compact line every few steps otherwise."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fgvc.progress import progress_bar


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so json.dumps writes null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    return json.dumps(strict_json(value), allow_nan=False, **options)


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl; mirrors scalars to TensorBoard if available. Disabled
    (ranks other than 0 under torchrun), it writes nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# How the running statistics a model reports (its running_statistics) are shown: (short name, format).
STATISTIC_FORMATS = {"top1": ("acc", "{:5.1f}%"), "embedding_std": ("std", "{:.4f}")}


def shown_statistics(stats: dict[str, float]) -> dict[str, str]:
    """The model's running statistics in `stats`, by short name, formatted."""
    return {short: text.format(stats[name]) for name, (short, text) in STATISTIC_FORMATS.items() if name in stats}


def progress_line(epoch: int, epochs: int, batch: int, batches: int, stats: dict[str, float]) -> str:
    shown = "".join(f"{short} {value} " for short, value in shown_statistics(stats).items())
    return (f"epoch {epoch + 1}/{epochs} [{batch:>{len(str(batches))}}/{batches}] loss {stats['loss']:.3f} "
            f"{shown}{stats['images_per_s']:6.1f} img/s lr {stats['lr']:.2e}")


def echo(message: str, stream: TextIO | None = None) -> None:
    print(message, file=stream or sys.stdout, flush=True)  # sys.stdout looked up now: it may have been replaced


class TrainingProgress:
    """Progress through one epoch: a tqdm bar (steps, ETA, and loss, accuracy, img/s and lr every `every` steps)
    when stderr is a terminal, else a progress_line every `every` steps; nothing when not `enabled` (ranks other
    than 0)."""

    def __init__(self, epochs: int, batches_per_epoch: int, steps_per_epoch: int, every: int,
                 stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.epochs, self.batches, self.steps, self.every = epochs, batches_per_epoch, steps_per_epoch, every
        self.stream, self.enabled = stream, enabled
        self.bar = None

    def start_epoch(self, epoch: int, steps_done: int) -> None:
        if not self.enabled:
            return
        self.bar = progress_bar(self.steps, f"epoch {epoch + 1}/{self.epochs}", unit="step", stream=self.stream,
                                initial=steps_done)

    def step(self, epoch: int, batch: int, stats: dict[str, float] | None) -> None:
        """After an optimizer step; `stats` (the running statistics) on logging steps only."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update()
            if stats is not None:
                self.bar.set_postfix(loss=f"{stats['loss']:.3f}", **shown_statistics(stats),
                                     img_s=f"{stats['images_per_s']:.0f}", lr=f"{stats['lr']:.1e}")
        elif stats is not None:
            echo(progress_line(epoch, self.epochs, batch, self.batches, stats))

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
