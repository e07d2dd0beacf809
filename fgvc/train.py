"""Train a model.

    python -m fgvc.train                                   # the quick start: synthbirds on the CPU, a few minutes
    python -m fgvc.train --dataset cub200 --data-dir ~/data/CUB_200_2011
    python -m fgvc.train --config configs/synthbirds/linear_test_resnet_long.yaml optim.lr=0.01
    python -m fgvc.train --resume runs/<run>                # continue an interrupted run exactly
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fgvc.config import FLAG_KEYS, ConfigError, default_recipe, load_config, load_run_config
from fgvc.data.annotations import AnnotationError
from fgvc.data.download import DownloadError
from fgvc.data.loader import TooManyUnreadableImages
from fgvc.engine.localization import localization_line
from fgvc.engine.trainer import CONFIG_FILE, RunResult, train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fgvc.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe merged onto the defaults")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("--dataset", help="data.dataset: synthbirds, cub200, cars196, aircraft100, folder, mnist, "
                                          "cifar10, cifar100, imagenet")
    parser.add_argument("--data-dir", help="data.root")
    parser.add_argument("--download", action="store_const", const=True,
                        help="data.download=true: fetch the official archive into --data-dir if missing")
    parser.add_argument("--model", help="model.backbone: any timm model name")
    parser.add_argument("--output-dir", help="output_dir: where run folders are made")
    parser.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--epochs", type=int, help="schedule.epochs")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. optim.lr=0.01")
    return parser.parse_intermixed_args(argv)


def format_results(result: RunResult) -> str:
    rows = [("val (selected)", result.val), ("test", result.test)]
    lines = [f"{'':16}{'top-1':>8}{'top-5':>8}{'per-class':>11}"]
    for name, metrics in rows:
        if metrics is not None:
            lines.append(f"{name:16}{metrics['top1']:8.2f}{metrics.get('top5', float('nan')):8.2f}"
                         f"{metrics['per_class_accuracy']:11.2f}")
    if result.test is not None and (localization := localization_line(result.test)):
        lines.append(f"test {localization}")
    lines.append(f"selected epoch {result.best_epoch}, {result.seconds:.0f} s; run folder: {result.run_dir}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {name: getattr(args, name) for name in FLAG_KEYS}
    try:
        if args.resume:
            if args.config or args.overrides or any(v is not None for v in flags.values()):
                raise ConfigError("--resume continues a run with its saved config; it takes no other options")
            result = train(load_run_config(Path(args.resume) / CONFIG_FILE), resume_dir=args.resume)
        else:
            recipe = args.config or default_recipe(args.dataset)
            if recipe is not None and args.config is None:
                print(f"--dataset {args.dataset}: using the recipe {recipe} (--config chooses another)")
            result = train(load_config(recipe, args.overrides, flags))
    except (ConfigError, FileExistsError, AnnotationError, DownloadError, TooManyUnreadableImages) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.completed:
        print(format_results(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
