"""The quick start as a new user runs it: `python -m fgvc.train` with no arguments, from an empty data cache.

    python experiments/quickstart.py --seeds 0 1 2 --out experiments/results/quickstart.md  # one run per seed
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
from report import emit, header, mean_spread
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fgvc.config import QUICK_START, load_config
from fgvc.data.cub import CUBDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_synthbirds import colour_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here (also printed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per training seed (train.seed), each from an empty cache; the data stay the same")
    parser.add_argument("--config", help="a recipe to run instead of the bare quick start (same measurement)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed on to fgvc.train")
    args = parser.parse_args()

    rows, colour = [], None
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as scratch:
            env = {**os.environ, "FGVC_DATA_ROOT": str(Path(scratch) / "cache")}
            start = time.perf_counter()
            recipe = ["--config", args.config] if args.config else []
            subprocess.run([sys.executable, "-m", "fgvc.train", *recipe, "--output-dir", str(Path(scratch) / "runs"),
                            *args.overrides, f"train.seed={seed}"], env=env, check=True)
            seconds = time.perf_counter() - start
            results = json.loads(next(Path(scratch, "runs").glob("*/results.json")).read_text())
            rows.append((seed, seconds, results))
            if colour is None:  # the data do not depend on the training seed
                colour = colour_statistics_top1(next(Path(scratch, "cache").glob("synthbirds-*")))

    cfg = load_config(args.config or QUICK_START, args.overrides)
    command = " ".join(["python -m fgvc.train", *(["--config", args.config] if args.config else []), *args.overrides])
    columns = [("val top-1 (selected)", lambda r: r["val"]["top1"]), ("test top-1", lambda r: r["test"]["top1"]),
               ("test per-class", lambda r: r["test"]["per_class_accuracy"]),
               ("test peak in box", lambda r: r["test"]["peak_in_box"]),
               ("test peak on part", lambda r: r["test"]["peak_on_part"])]
    lines = [
        *header(f"`{command}` from an empty cache"),
        f"Preset: synthbirds {cfg.data.synthbirds.num_classes} classes x {cfg.data.synthbirds.images_per_class} "
        f"images ({cfg.data.synthbirds.image_size} px, difficulty {cfg.data.synthbirds.difficulty}), "
        f"{cfg.model.backbone} (output stride {cfg.model.output_stride or 'its own'}) + {cfg.model.head} head at "
        f"{cfg.data.image_size} px, {cfg.schedule.epochs} epochs, "
        f"{cfg.optim.name} lr {cfg.optim.lr}.",
        "",
        "| train.seed | wall time (s) | " + " | ".join(name for name, _ in columns) + " | selected epoch |",
        "|---:|---:|" + "---:|" * len(columns) + "---:|",
        *(f"| {seed} | {s:.0f} | " + " | ".join(f"{value(r):.1f}" for _, value in columns) + f" | {r['best_epoch']} |"
          for seed, s, r in rows),
    ]
    if len(rows) > 1:
        lines.append(f"| mean ± sd | {mean_spread([s for _, s, _ in rows])} | "
                     + " | ".join(mean_spread([value(r) for _, _, r in rows]) for _, value in columns) + " | |")
    lines += ["", f"The data stay fine-grained: a logistic regression on the generated images' global colour "
              f"statistics (the oracle of tests/test_synthbirds.py) reaches {colour:.1f}% test top-1 (chance "
              f"{100 / cfg.data.synthbirds.num_classes:.0f}%; the tests hold it under 20%).", ""]
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
