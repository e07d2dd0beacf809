"""Run logs: metrics as JSON lines (and TensorBoard when it is installed), and a compact progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl; mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def progress_line(epoch: int, epochs: int, batch: int, batches: int, stats: dict[str, float]) -> str:
    return (f"epoch {epoch + 1}/{epochs} [{batch:>{len(str(batches))}}/{batches}] loss {stats['loss']:.3f} "
            f"acc {stats['top1']:5.1f}% {stats['images_per_s']:6.1f} img/s lr {stats['lr']:.2e}")


def echo(message: str, stream: TextIO | None = None) -> None:
    print(message, file=stream or sys.stdout, flush=True)  # sys.stdout looked up now: it may have been replaced
