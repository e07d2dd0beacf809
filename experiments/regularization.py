"""The regularization stack on synthbirds: none vs label smoothing vs Mixup vs CutMix vs SnapMix, several seeds.

    python experiments/regularization.py --out experiments/results/regularization.md

Every run is the from-scratch preset (configs/synthbirds/scratch_isqrt.yaml: test_resnet from scratch, the iSQRT-COV
head, 96 px, the default schedule) with one regularizer added to a plain baseline (no label smoothing); all runs get
the same number of epochs, and
the table shows what each costs in training time (SnapMix adds a pass to compute class activation maps).
Reported: test top-1, mean and standard deviation over the training seeds (same data).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, finished, header, mean_spread  # noqa: E402

from fgvc.config import load_config  # noqa: E402
from fgvc.engine import trainer  # noqa: E402

VARIANTS = {
    "none": [],
    "label smoothing 0.1": ["regularization.label_smoothing=0.1"],
    "mixup (alpha 0.8)": ["regularization.mixup_alpha=0.8"],
    "cutmix (alpha 1.0)": ["regularization.cutmix_alpha=1.0"],
    "snapmix (alpha 1.0, every batch)": ["regularization.snapmix_prob=1.0", "regularization.snapmix_alpha=1.0"],
}
SCRATCH_PRESET = "synthbirds/scratch_isqrt.yaml"
BASE = ["regularization.label_smoothing=0.0", "train.log_every=100000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()

    rows = []
    for variant in args.variants:
        accuracies, seconds = [], []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as output:
                cfg = load_config(SCRATCH_PRESET, [*BASE, *VARIANTS[variant], f"train.seed={seed}",
                                                   f"output_dir={output}", f"run_name={seed}"])
                start = time.perf_counter()
                accuracies.append(finished(trainer.train(cfg)).test["top1"])
                seconds.append(time.perf_counter() - start)
            print(f"{variant} seed {seed}: {accuracies[-1]:.1f}% in {seconds[-1]:.0f} s", flush=True)
        rows.append(f"| {variant} | {mean_spread(accuracies)} | {statistics.mean(seconds):.0f} | "
                    + ", ".join(f"{a:.1f}" for a in accuracies) + " |")

    base = load_config(SCRATCH_PRESET, BASE)
    lines = [
        *header("Regularization on synthbirds: one preset, one regularizer at a time"),
        f"Preset: the from-scratch one ({base.data.synthbirds.num_classes} classes x "
        f"{base.data.synthbirds.images_per_class} images, {base.model.backbone} + {base.model.head} head from "
        f"scratch at {base.data.image_size} px, batch "
        f"{base.data.batch_size}, {base.optim.name} lr {base.optim.lr}, {base.schedule.epochs} epochs), label "
        f"smoothing off unless named. Seeds {', '.join(map(str, args.seeds))} (training seed; same data). Mean ± "
        "standard deviation over seeds.",
        "",
        "| regularizer | test top-1 (%) | seconds per run | per seed |",
        "|---|---:|---:|---|",
        *rows,
        "",
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
