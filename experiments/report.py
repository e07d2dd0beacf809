"""What every experiment script ends with: its results table, printed and written with the command that made it."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the op's benchmark uses this module too, without fgvc
    from fgvc.engine.trainer import RunResult


def header(title: str) -> list[str]:
    return [f"# {title}", "", f"Command: `python {' '.join(sys.argv)}`  ",
            f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads."]


def emit(lines: list[str], out: Path | None) -> None:
    table = "\n".join(lines) + "\n"
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)


def mean_spread(values: list[float]) -> str:
    """"mean ± sample standard deviation" (± 0.0 for a single value), one decimal."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def finished(result: RunResult) -> RunResult:
    """The run's result if it ran to the end. fgvc.engine.trainer.train treats SIGINT and SIGTERM as an interruption:
    it checkpoints and returns early, so a script that trains many runs must stop there rather than start the next."""
    if not result.completed:
        raise SystemExit(f"interrupted in {result.run_dir}; no table written")
    return result
