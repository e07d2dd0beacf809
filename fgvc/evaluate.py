"""Evaluate a checkpoint: top-1, top-5 and per-class accuracy (single crop, plus the head's own test-time pass if it
has one, as WS-DAN does), and where the data has boxes or parts, where the model looks; printed and written as JSON.

    python -m fgvc.evaluate --checkpoint runs/<run>/best.pt [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fgvc.data.annotations import AnnotationError
from fgvc.data.cub import SPLITS
from fgvc.data.loader import TooManyUnreadableImages
from fgvc.engine.localization import localization_line
from fgvc.engine.trainer import evaluate_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--data-dir", help="read the data from here instead of the run's data.root")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--output", help="JSON file to write (default: <checkpoint>-<split>.json beside it)")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_checkpoint(args.checkpoint, split=args.split, data_root=args.data_dir,
                                      device=args.device, batch_size=args.batch_size)
    except (AnnotationError, TooManyUnreadableImages) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.with_name(f"{checkpoint.stem}-{args.split}.json")
    output.write_text(json.dumps(metrics, indent=2) + "\n")
    excluded = f", {metrics['excluded_images']} unreadable left out" if metrics.get("excluded_images") else ""
    print(f"{args.split} ({metrics['images']} images{excluded}): top-1 {metrics['top1']:.2f}%  top-5 "
          f"{metrics.get('top5', float('nan')):.2f}%  per-class {metrics['per_class_accuracy']:.2f}%")
    if localization := localization_line(metrics):
        print(localization)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
