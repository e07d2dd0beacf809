"""Evaluate a checkpoint: top-1, top-5 and per-class accuracy, single crop (with the head's own test-time pass if it
has one, as WS-DAN does) and, on request, test-time augmentation as separate rows; the confusion matrix (CSV and
PNG) and the most confused class pairs; where the data has boxes or parts, where the model looks.

    python -m fgvc.evaluate --checkpoint runs/<run>/best.pt [--split test] [--tta flip multiscale tencrop]
    torchrun --nproc-per-node 4 -m fgvc.evaluate ...       # each rank a shard, every image counted once

Weighted k-NN of frozen backbone features (DINO's protocol: fgvc.transfer.knn), of a checkpoint's backbone or of
a backbone's pretrained weights, the train split's images as neighbours:

    python -m fgvc.evaluate --knn --checkpoint runs/<run>/best.pt [--split test] [--k 20] [--temperature 0.07]
    python -m fgvc.evaluate --knn --model resnet50 --pretrained-file resnet50.safetensors --dataset cub200 \
        --data-dir ~/data/CUB_200_2011 [--split val] [key=value ...]

Files written beside the checkpoint (or as --output says): <stem>-<split>.json, -confusion.csv, -confusion.png,
and with --save-probabilities the single-crop probabilities of every image (-probabilities.jsonl).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fgvc.build import build_backbone, build_distributed, build_runtime, knn_probe, load_model
from fgvc.config import load_config
from fgvc.data.splits import SPLITS
from fgvc.engine.distributed import Distributed
from fgvc.engine.inference import SINGLE_CROP, TTA_KINDS, EvaluationReport, evaluate_checkpoint, write_confusion_csv
from fgvc.engine.localization import localization_line
from fgvc.engine.logging import dumps
from fgvc.engine.tta import AVERAGES, DEFAULT_SCALES
from fgvc.errors import OptionError, command
from fgvc.files import write_atomically
from fgvc.transfer.knn import DEFAULT_K, DEFAULT_TEMPERATURE
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
    parser.add_argument("--checkpoint", help="best.pt or last.pt of a run")
    parser.add_argument("--knn", action="store_true", help="weighted k-NN of the frozen backbone features instead")
    parser.add_argument("--k", type=int, help=f"--knn: neighbours (default {DEFAULT_K})")
    parser.add_argument("--temperature", type=float, help=f"--knn: vote temperature (default {DEFAULT_TEMPERATURE})")
    parser.add_argument("--model", help="--knn without --checkpoint: model.backbone")
    parser.add_argument("--pretrained-file", help="--knn without --checkpoint: model.pretrained_file")
    parser.add_argument("--dataset", help="--knn without --checkpoint: data.dataset")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="--knn without --checkpoint: any config key (data.image_size=...)")
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
    args = parser.parse_intermixed_args(argv)
    refuse_unused(args, parser)
    if not args.knn and args.checkpoint is None:
        raise OptionError("checkpoint", "--checkpoint is required (a backbone alone is evaluated with --knn)")
    distributed = build_distributed(args.device)  # under torchrun: each rank evaluates its shard, rank 0 writes
    try:
        with distributed.explaining_lost_ranks():
            return knn_main(args, distributed) if args.knn else checkpoint_main(args, distributed)
    finally:
        distributed.close()


def checkpoint_main(args: argparse.Namespace, distributed: Distributed) -> int:
    report = evaluate_checkpoint(args.checkpoint, split=args.split, data_root=args.data_dir, device=args.device,
                                 batch_size=args.batch_size, tta=args.tta, average=args.average, scales=args.scales,
                                 keep_probabilities=args.save_probabilities, distributed=distributed)
    if not distributed.is_main:
        return 0
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


KNN_ONLY = ("k", "temperature", "model", "pretrained_file", "dataset", "overrides")
NOT_WITH_KNN = ("tta", "average", "scales", "batch_size", "save_probabilities")


def refuse_unused(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """An option the chosen evaluation would ignore is an error, not silently dropped."""
    unused = NOT_WITH_KNN if args.knn else KNN_ONLY
    given = [name for name in unused if getattr(args, name) not in (parser.get_default(name), [])]
    if given:
        names = ", ".join("key=value" if name == "overrides" else f"--{name.replace('_', '-')}" for name in given)
        raise OptionError("--knn", f"{names} {'do' if len(given) > 1 else 'does'} not apply "
                                 f"{'with' if args.knn else 'without'} --knn")


def knn_main(args: argparse.Namespace, distributed: Distributed) -> int:
    """--knn: the checkpoint's backbone on its run's data, or a backbone's weights on the data the flags name."""
    if args.checkpoint is not None:
        if args.model or args.pretrained_file or args.dataset or args.overrides:
            raise OptionError("checkpoint", "--knn --checkpoint evaluates the run's own backbone on its data; "
                                            "--model, --pretrained-file, --dataset and key=value do not apply")
        loaded = load_model(args.checkpoint, device=args.device, data_root=args.data_dir, distributed=distributed)
        cfg, backbone, runtime, source = loaded.config, loaded.model.backbone, loaded.runtime, args.checkpoint
    else:
        overrides = [*args.overrides, *([f"model.pretrained_file={args.pretrained_file}"] if args.pretrained_file
                                        else [])]
        cfg = load_config(None, overrides, {"model": args.model, "dataset": args.dataset, "data_dir": args.data_dir,
                                            "device": args.device})
        runtime = build_runtime(cfg, distributed=distributed)
        backbone = distributed.main_first(lambda: build_backbone(cfg.model, image_size=cfg.data.image_size))
        backbone = backbone.to(runtime.device)
        weights = (cfg.model.pretrained_file or cfg.model.pretrained_package
                   or ("hub weights" if cfg.model.pretrained else "random init"))
        source = f"{cfg.model.backbone} ({weights})"
    result = knn_probe(cfg, backbone, runtime, split=args.split, k=DEFAULT_K if args.k is None else args.k,
                       temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
                       distributed=distributed)
    if not distributed.is_main:
        return 0
    print(f"weighted k-NN (k={result['k']}, T={result['temperature']:g}) of {source}, {args.split} split on the "
          f"train split's neighbours: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%")
    if args.output:
        write_atomically(Path(args.output), dumps({"source": source, "split": args.split, **result}, indent=2) + "\n")
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
