"""Evaluate a checkpoint: top-1, top-5 and per-class accuracy, single crop (with the head's own test-time pass if it
has one, as WS-DAN does) and, on request, test-time augmentation as separate rows; the confusion matrix (CSV and
PNG) and the most confused class pairs; where the data has boxes or parts, where the model looks.

    python -m fgvc.evaluate --checkpoint runs/<run>/best.pt [--split test] [--tta flip multiscale tencrop]

Files written beside the checkpoint (or as --output says): <stem>-<split>.json, -confusion.csv, -confusion.png,
and with --save-probabilities the single-crop probabilities of every image (-probabilities.jsonl).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fgvc.data.splits import SPLITS
from fgvc.engine.inference import SINGLE_CROP, TTA_KINDS, EvaluationReport, evaluate_checkpoint, write_confusion_csv
from fgvc.engine.localization import localization_line
from fgvc.engine.logging import dumps
from fgvc.engine.tta import AVERAGES, DEFAULT_SCALES
from fgvc.errors import command
from fgvc.files import write_atomically
from fgvc.viz import confusion_figure, save_figure


def format_report(report: EvaluationReport) -> str:
    excluded = report.rows[SINGLE_CROP].get("excluded_images", 0)
    width = max(len(name) for name in report.rows) + 2
    lines = [f"{report.split}, {report.images} images" + (f" ({excluded} unreadable left out)" if excluded else ""),
             f"{'':{width}}{'top-1':>8}{'top-5':>8}{'per-class':>11}"]
    for name, row in report.rows.items():
        lines.append(f"{name:{width}}{row['top1']:8.2f}{row.get('top5', float('nan')):8.2f}"
                     f"{row['per_class_accuracy']:11.2f}")
    if len(report.rows) > 1:
        lines.append(f"(test-time augmentation averages {report.average}; the single-crop row is the headline figure)")
    if localization := localization_line(report.rows[SINGLE_CROP]):
        lines.append(localization)
    confused = report.to_json()["most_confused"][:5]
    if confused:
        lines.append("most confused (true -> predicted):")
        lines += [f"  {pair['true']} -> {pair['predicted']}: {pair['count']} ({pair['share_of_true_class']:.1f}% of "
                  "the true class)" for pair in confused]
    return "\n".join(lines)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--tta", nargs="*", default=[], choices=TTA_KINDS, help="test-time augmentation rows")
    parser.add_argument("--average", default="probs", choices=AVERAGES,
                        help="how TTA views are averaged: probabilities (default) or logits")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                        help="multi-scale factors of the evaluation crop")
    parser.add_argument("--data-dir", help="read the data from here instead of the run's data.root")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--output", help="JSON file to write (default: <checkpoint>-<split>.json beside it)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write every image's single-crop class probabilities (JSON lines)")
    args = parser.parse_args(argv)
    report = evaluate_checkpoint(args.checkpoint, split=args.split, data_root=args.data_dir, device=args.device,
                                 batch_size=args.batch_size, tta=args.tta, average=args.average, scales=args.scales,
                                 keep_probabilities=args.save_probabilities)
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.with_name(f"{checkpoint.stem}-{args.split}.json")
    stem = output.with_suffix("")
    write_atomically(output, dumps(report.to_json(), indent=2) + "\n")
    write_confusion_csv(report.confusion, report.classes, stem.with_name(f"{stem.name}-confusion.csv"))
    save_figure(confusion_figure(report.confusion, report.classes), stem.with_name(f"{stem.name}-confusion.png"))
    if args.save_probabilities:
        with open(stem.with_name(f"{stem.name}-probabilities.jsonl"), "w") as file:
            for index in sorted(report.probabilities):
                file.write(dumps({"index": index, "path": report.image_paths[index],
                                  "probabilities": report.probabilities[index].tolist()}) + "\n")
    print(format_report(report))
    print(f"written to {output} (and the confusion matrix beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
