"""The quick start as a new user runs it: `python -m fgvc.train` with no arguments, from an empty data cache.

    python experiments/quickstart.py --out experiments/results/quickstart.md
    python experiments/quickstart.py data.synthbirds.difficulty=0.0 --out ...   # a variant: key=value overrides

Wall time covers everything the command does: start-up, generating synthbirds, training, validation after every
epoch and the final test evaluation. Targets (issue 3): at most 180 s and at least 80% test top-1, on data that stays
fine-grained: the table also gives the test top-1 of a logistic regression on the generated images' global colour
statistics (the oracle of tests/test_synthbirds.py; the tests hold it under 20%, chance being 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import emit, header
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fgvc.config import load_config
from fgvc.data.cub import CUBDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_synthbirds import colour_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here (also printed)")
    parser.add_argument("--runs", type=int, default=1, help="repeat with fresh caches (seeds stay the defaults)")
    parser.add_argument("--config", help="a recipe to run instead of the bare quick start (same measurement)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed on to fgvc.train")
    args = parser.parse_args()

    rows = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as scratch:
            env = {**os.environ, "FGVC_DATA_ROOT": str(Path(scratch) / "cache")}
            start = time.perf_counter()
            recipe = ["--config", args.config] if args.config else []
            subprocess.run([sys.executable, "-m", "fgvc.train", *recipe, "--output-dir", str(Path(scratch) / "runs"),
                            *args.overrides], env=env, check=True)
            seconds = time.perf_counter() - start
            results = json.loads(next(Path(scratch, "runs").glob("*/results.json")).read_text())
            rows.append((seconds, results, colour_statistics_top1(next(Path(scratch, "cache").glob("synthbirds-*")))))

    cfg = load_config(args.config, args.overrides)
    command = " ".join(["python -m fgvc.train", *(["--config", args.config] if args.config else []), *args.overrides])
    lines = [
        *header(f"`{command}` from an empty cache"),
        f"Preset: synthbirds {cfg.data.synthbirds.num_classes} classes x {cfg.data.synthbirds.images_per_class} "
        f"images ({cfg.data.synthbirds.image_size} px, difficulty {cfg.data.synthbirds.difficulty}), "
        f"{cfg.model.backbone} (output stride {cfg.model.output_stride or 'its own'}) + {cfg.model.head} head at "
        f"{cfg.data.image_size} px, {cfg.schedule.epochs} epochs, "
        f"{cfg.optim.name} lr {cfg.optim.lr}.",
        "",
        "| run | wall time (s) | val top-1 (selected) | test top-1 | test per-class | selected epoch "
        "| test peak in box | test peak on part | colour statistics test top-1 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {i + 1} | {s:.0f} | {r['val']['top1']:.1f} | {r['test']['top1']:.1f} | "
          f"{r['test']['per_class_accuracy']:.1f} | {r['best_epoch']} | {r['test']['peak_in_box']:.1f} | "
          f"{r['test']['peak_on_part']:.1f} | {colour:.1f} |" for i, (s, r, colour) in enumerate(rows)),
        "",
    ]
    if args.config is None and not args.overrides:
        lines += ["Targets: at most 180 s, at least 80% test top-1.", ""]
    emit(lines, args.out)


def colour_statistics_top1(root: Path) -> float:
    """Test top-1 (%) of a logistic regression fitted on the trainval images' mean colour and colour histogram."""
    features, labels = {}, {}
    for split in ("trainval", "test"):
        dataset = CUBDataset(root, split=split)
        samples = [dataset[i] for i in range(len(dataset))]
        features[split] = colour_features([sample["image"] for sample in samples])
        labels[split] = np.array([sample["label"] for sample in samples])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return 100 * classifier.fit(features["trainval"], labels["trainval"]).score(features["test"], labels["test"])


if __name__ == "__main__":
    main()
