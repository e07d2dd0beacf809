"""Train a model.

    python -m fgvc.train                                   # the quick start: synthbirds on the CPU, a few minutes
    python -m fgvc.train --dataset cub200 --data-dir ~/data/CUB_200_2011
    python -m fgvc.train --config configs/synthbirds/linear_test_resnet_long.yaml optim.lr=0.01
    python -m fgvc.train --print-config model.head=wsdan   # the resolved config, without training
    python -m fgvc.train --resume runs/<run>                # continue an interrupted run exactly
    torchrun --nproc-per-node 4 -m fgvc.train ...          # one process a device (docs/distributed.md)

Without --config, the recipe is the quick start's (configs/synthbirds/quickstart.yaml), or with --dataset the
dataset's own recipe where it has one; key=value overrides apply on top. From Python, `fgvc.train(config)` trains a
config (fgvc.load_config) and returns its RunResult.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Sequence
from pathlib import Path

from fgvc.build import build_preprocessing, with_preprocessing
from fgvc.config import (
    DEFAULT_RECIPES,
    FLAG_KEYS,
    Config,
    ConfigError,
    default_recipe,
    load_config,
    load_run_config,
    to_yaml,
)
from fgvc.engine.distributed import is_main_process
from fgvc.engine.localization import localization_line
from fgvc.engine.trainer import BEST, CONFIG_FILE, RunResult, train
from fgvc.errors import command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return run_parser("python -m fgvc.train", __doc__).parse_intermixed_args(argv)


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options of a command that makes a run (fgvc.train, fgvc.pretrain): recipe, resume, flags, overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe: a file, or a name under configs/ (cub200/isqrt_resnet50)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dataset", help="data.dataset: synthbirds, cub200, cars196, aircraft100, folder, mnist, "
                                          "cifar10, cifar100, imagenet, unlabeled (fgvc.pretrain)")
    parser.add_argument("--data-dir", help="data.root")
    parser.add_argument("--download", action="store_const", const=True,
                        help="data.download=true: fetch the official archive into --data-dir if missing")
    parser.add_argument("--model", help="model.backbone: any timm model name")
    parser.add_argument("--output-dir", help="output_dir: where run folders are made")
    parser.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--epochs", type=int, help="schedule.epochs")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. optim.lr=0.01")
    return parser


def resolve(args: argparse.Namespace, recipes: dict[str | None, str] = DEFAULT_RECIPES) -> Config:
    """The config the arguments describe: a run's saved one for --resume, else recipe + flags + overrides."""
    flags = {name: getattr(args, name, None) for name in FLAG_KEYS}  # --method is fgvc.pretrain's
    if args.resume:
        if args.config or args.overrides or any(v is not None for v in flags.values()):
            raise ConfigError("--resume continues a run with its saved config; it takes no other options")
        saved = Path(args.resume) / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: not a run folder (it has no {CONFIG_FILE})")
        return load_run_config(saved)
    recipe = args.config or default_recipe(args.dataset, recipes)
    if recipe is not None and args.config is None and args.dataset is not None and not args.print_config:
        print(f"--dataset {args.dataset}: using the recipe {recipe} (--config chooses another)")
    return load_config(recipe, args.overrides, flags)


def format_results(result: RunResult) -> str:
    rows = [("val (selected)", result.val), ("test", result.test)]
    lines = [f"{'':16}{'top-1':>8}{'top-5':>8}{'per-class':>11}"]
    for name, metrics in rows:
        if metrics is not None:
            lines.append(f"{name:16}{metrics['top1']:8.2f}{metrics.get('top5', float('nan')):8.2f}"
                         f"{metrics['per_class_accuracy']:11.2f}")
    if result.test is not None and (localization := localization_line(result.test)):
        lines.append(f"test {localization}")
    best = result.run_dir / BEST
    lines += [f"selected epoch {result.best_epoch}, {result.seconds:.0f} s; run folder: {result.run_dir}",
              "next:",
              f"  python -m fgvc.evaluate --checkpoint {best} --tta flip tencrop",
              f"  python -m fgvc.visualize --checkpoint {best} --count 8"]
    return "\n".join(lines)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve(args)
    if args.print_config:  # as the run would save it: with the preprocessing it resolves to
        print(to_yaml(with_preprocessing(cfg, build_preprocessing(cfg))), end="")
        return 0
    result = train(cfg, resume_dir=args.resume)
    if result.completed and is_main_process():  # under torchrun, rank 0 reports for all
        print(format_results(result))
    return 0


class _CallableModule(types.ModuleType):
    """This module is also the API's `fgvc.train(config)`: the package attribute `fgvc.train` is this module (as
    any import of it makes it), so calling it trains."""

    def __call__(self, cfg: Config) -> RunResult:
        """Train `cfg` (fgvc.load_config), select on validation, evaluate once on test: the result names the run
        folder and its metrics."""
        return train(cfg)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
