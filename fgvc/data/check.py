"""Pre-flight check: decode every image of a dataset's split(s) with the training decoder and list each bad file.

    python -m fgvc.data.check --dataset cub200 --data-dir ~/data/CUB_200_2011
    python -m fgvc.data.check --dataset aircraft100 --data-dir ~/data --split test data.annotation_level=family

By default the train, val and test splits are checked (every image of the dataset once), and the count of each is
printed. Exit status: 0 all readable, 1 some unreadable (each listed with its reason), 2 the annotations themselves
are bad (or another mistake, named on one line).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fgvc.build import build_dataset
from fgvc.config import DataConfig, load_config
from fgvc.data.images import ImageReadError, read_rgb
from fgvc.data.splits import SPLITS
from fgvc.errors import FGVCError, command

ALL = "all"  # train, val and test: every image of the dataset, each split counted


@dataclass
class CheckReport:
    checked: int = 0
    seconds: float = 0.0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), in dataset order

    @property
    def images_per_s(self) -> float:
        return self.checked / self.seconds if self.seconds > 0 else float("inf")


def check_images(paths: Sequence[str | os.PathLike], *, workers: int = 0) -> CheckReport:
    """Decode every file (in `workers` processes; 0: one per core) and report the unreadable ones."""
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    if workers == 1 or len(paths) < 64:  # a process pool costs more than it saves on a handful of files
        results = [_problem(path) for path in paths]
    else:
        # fork where there is one: a spawned worker spends seconds importing torch before its first image.
        methods = multiprocessing.get_all_start_methods()
        with multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers) as pool:
            results = pool.map(_problem, paths, chunksize=max(1, min(64, len(paths) // (4 * workers))))
    bad = [(str(path), reason) for path, reason in zip(paths, results, strict=True) if reason is not None]
    return CheckReport(len(paths), time.perf_counter() - start, bad)


def _problem(path: str | os.PathLike) -> str | None:
    try:
        read_rgb(path)
    except ImageReadError as error:
        return error.reason
    return None


def split_paths(data: DataConfig, splits: Sequence[str]) -> dict[str, list[Path]]:
    """Each split's image files, in dataset order, each file under the first split that lists it."""
    seen: set[Path] = set()
    paths = {}
    for split in splits:
        dataset = build_dataset(data, split)
        paths[split] = []
        for index in range(len(dataset)):
            path = dataset.image_path(index)
            if path is None:
                raise FGVCError(f"{data.dataset} is held decoded in memory by torchvision; there are no image "
                                "files to check")
            if path not in seen:
                seen.add(path)
                paths[split].append(path)
    return paths


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.data.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--split", default=ALL, choices=(ALL, *SPLITS))
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: one per core)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="data settings, e.g. data.remove_banner=false")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(None, args.overrides, {"dataset": args.dataset, "data_dir": args.data_dir})
    by_split = split_paths(cfg.data, ("train", "val", "test") if args.split == ALL else (args.split,))
    report = check_images([path for paths in by_split.values() for path in paths], workers=args.workers)
    for path, reason in report.bad:
        print(f"{path}: {reason}")
    counts = ", ".join(f"{split} {len(paths)}" for split, paths in by_split.items())
    print(f"checked {report.checked} images of {args.dataset} ({counts}) in {report.seconds:.1f} s "
          f"({report.images_per_s:.0f} images/s): {len(report.bad)} unreadable")
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
