"""The heads side by side on synthbirds: one small backbone, one CPU time budget, several seeds.

    python experiments/synthbirds_heads/compare.py --out experiments/synthbirds_heads/results.md

First each head's training images/s is measured on the same in-memory batches (interleaved rounds, so the
machine's drift hits all heads alike). Each head then gets the number of epochs that fits the same training-time
budget at its own speed (WS-DAN, with three passes a step, gets fewer), and trains on the quick-start synthbirds
data with each seed. Reported: test top-1 and the localization metrics (fgvc.engine.localization), mean and spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import emit, finished, header, mean_spread  # noqa: E402
from train_throughput import fgvc_rate, make_batches  # noqa: E402

from fgvc.build import build_dataset  # noqa: E402
from fgvc.config import QUICK_START, load_config  # noqa: E402
from fgvc.engine import trainer  # noqa: E402

# test_resnet ends with 96 channels: bilinear pools all of them (9,216 features), iSQRT reduces to 64 (2,080),
# WS-DAN uses 16 maps (1,536).
HEADS = {
    "linear": [],
    "bilinear": ["model.head_dim=null"],
    "isqrt": ["model.head_dim=64"],
    "wsdan": ["model.num_attention_maps=16"],
}
COMMON = ["data.workers=0", "data.batch_size=16", "optim.lr=0.005"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per run, at measured speed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    base = load_config(QUICK_START, COMMON)
    train_images = len(build_dataset(base.data, "train"))
    batches = make_batches(8, base.data.batch_size, base.data.image_size, base.data.synthbirds.num_classes)
    speeds: dict[str, list[float]] = {head: [] for head in args.heads}
    for _ in range(args.rounds):
        for head in args.heads:
            model_cfg = load_config(QUICK_START, [*COMMON, f"model.head={head}", *HEADS[head]]).model
            speeds[head].append(fgvc_rate(model_cfg, batches, base.data.synthbirds.num_classes))

    rows = []
    for head in args.heads:
        speed = statistics.median(speeds[head])
        epochs = max(1, round(args.budget * speed / train_images))
        results = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as output:
                overrides = [*COMMON, f"model.head={head}", *HEADS[head], f"schedule.epochs={epochs}",
                             f"train.seed={seed}", f"output_dir={output}", f"run_name={head}-{seed}"]
                results.append(finished(trainer.train(load_config(QUICK_START, overrides))).test)
        rows.append(f"| {head} | {speed:.0f} | {epochs} | "
                    + " | ".join(mean_spread([r[key] for r in results])
                                 for key in ("top1", "peak_in_box", "peak_on_part")) + " |")

    lines = [
        *header("Heads on synthbirds: one backbone, one training-time budget"),
        f"Data: the quick-start synthbirds ({base.data.synthbirds.num_classes} classes x "
        f"{base.data.synthbirds.images_per_class} images, {train_images} training images), "
        f"{base.model.backbone} (output stride {base.model.output_stride or 'its own'}) from scratch at "
        f"{base.data.image_size} px, batch {base.data.batch_size}, "
        f"{base.optim.name} lr {base.optim.lr}. Budget: {args.budget:.0f} s of training per run at each head's "
        f"measured speed. Seeds {', '.join(map(str, args.seeds))} (training seed; same data). "
        "Mean ± standard deviation over seeds.",
        "",
        "| head | train img/s | epochs | test top-1 (%) | peak in box (%) | peak on discriminative part (%) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
