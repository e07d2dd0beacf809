"""Training throughput of fgvc's engine against a minimal hand-written PyTorch loop.

    python experiments/train_throughput.py --out experiments/results/train_throughput.md

Both train the same timm architecture (fgvc through build_model, the bare loop through timm.create_model) with the
same batch, image size, optimizer and in-memory batches, channels-last, on the CPU. The two are interleaved (A, B,
A, B, ...) so that the machine's drift hits both; the ratio is the median of the per-round ratios. Target: fgvc at
0.9 or more of the bare loop's images/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from report import emit, header

from fgvc.build import build_model
from fgvc.config import ModelConfig
from fgvc.engine.loop import Optimization, Runtime, TrainState, train_one_epoch
from fgvc.engine.optim import build_optimizer, build_scheduler, parameter_groups
from fgvc.losses import LabelSmoothingCrossEntropy

LR, WEIGHT_DECAY = 0.005, 0.05  # the quick start's AdamW


def make_batches(steps: int, batch_size: int, size: int, classes: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(batch_size, 3, size, size, generator=generator),
             "label": torch.randint(0, classes, (batch_size,), generator=generator)} for _ in range(steps)]


def fgvc_rate(model_cfg: ModelConfig, batches: list[dict], classes: int) -> float:
    """Training images/s of fgvc's train_one_epoch for this model on in-memory batches."""
    model = build_model(model_cfg, classes).to(memory_format=torch.channels_last)
    groups = parameter_groups(model.parameter_groups(), lr=LR, weight_decay=WEIGHT_DECAY)
    optimizer = build_optimizer(groups, name="adamw", lr=LR)
    scheduler = build_scheduler(optimizer, epochs=1, steps_per_epoch=len(batches), warmup_epochs=1.0, base_lr=LR)
    optimization, runtime = Optimization(optimizer, scheduler), Runtime(torch.device("cpu"), channels_last=True)
    criterion = LabelSmoothingCrossEntropy(0.1)

    def run() -> None:
        train_one_epoch(model, criterion, optimization, batches, runtime, TrainState())

    return timed(run, batches)


def bare_rate(backbone: str, batches: list[dict], classes: int) -> float:
    model = timm.create_model(backbone, num_classes=classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()

    def run() -> None:
        for batch in batches:
            images = batch["image"].contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(images), batch["label"], label_smoothing=0.1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return timed(run, batches)


def timed(run, batches: list[dict]) -> float:
    run()  # warm-up: allocator, oneDNN primitives
    start = time.perf_counter()
    run()
    return sum(len(b["label"]) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", nargs="+", default=["test_resnet", "resnet10t"])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rows = []
    for backbone in args.models:
        batches = make_batches(args.steps, args.batch_size, args.image_size, classes=10)
        fgvc_rates, bare_rates = [], []
        for _ in range(args.rounds):
            bare_rates.append(bare_rate(backbone, batches, 10))
            # The architecture's own output stride, as timm.create_model builds it for the bare loop.
            model_cfg = ModelConfig(backbone=backbone, head="linear", output_stride=None)
            fgvc_rates.append(fgvc_rate(model_cfg, batches, 10))
        ratio = statistics.median(f / b for f, b in zip(fgvc_rates, bare_rates, strict=True))
        rows.append(f"| {backbone} | {statistics.median(bare_rates):.1f} | {statistics.median(fgvc_rates):.1f} | "
                    f"{ratio:.3f} |")

    lines = [
        *header("Training throughput: fgvc engine vs a bare PyTorch loop"),
        f"Batch {args.batch_size}, {args.image_size} px, {args.steps} steps per measurement, median of "
        f"{args.rounds} interleaved rounds, AdamW, channels-last, fp32.",
        "",
        "| backbone | bare loop (img/s) | fgvc train_one_epoch (img/s) | ratio (target >= 0.9) |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
