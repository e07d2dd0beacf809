"""python -m fgvc.transfer advise: measure what the rule of thumb of transfer learning needs, and apply it.

    python -m fgvc.transfer advise --dataset cub200 --data-dir ~/data/CUB_200_2011 --model resnet50 \\
        --pretrained-file resnet50.safetensors [--out recipe.yaml] [key=value ...]

It counts the training images per class, runs the pretrained backbone and the same architecture at random init
over the train and validation images (k-NN of frozen features), prints the 2 x 2 table with the measured cell
marked and writes the recommended settings as a recipe (fgvc.transfer.advise explains the thresholds).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from fgvc.build import check_transfer, has_weights, transfer_measurement
from fgvc.config import ConfigError, load_config, recipe_path
from fgvc.errors import OutputExists, command
from fgvc.files import write_atomically
from fgvc.transfer.advise import Thresholds, recipe, table
from fgvc.transfer.knn import DEFAULT_K, DEFAULT_TEMPERATURE


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fgvc.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    advise = commands.add_parser("advise", help="measure size and similarity, recommend a transfer strategy")
    advise.add_argument("--config", help="a recipe to start from (default: the schema defaults)")
    advise.add_argument("--dataset", help="data.dataset")
    advise.add_argument("--data-dir", help="data.root")
    advise.add_argument("--model", help="model.backbone")
    advise.add_argument("--pretrained-file", help="model.pretrained_file: the weights to judge (offline)")
    advise.add_argument("--device", help="train.device")
    advise.add_argument("--k", type=int, default=DEFAULT_K)
    advise.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    advise.add_argument("--small-below", type=float, default=Thresholds.small_below,
                        help="images per class below which a target is small")
    advise.add_argument("--similar-gain", type=float, default=Thresholds.similar_gain,
                        help="k-NN top-1 gain (points) over random init from which a target is similar")
    advise.add_argument("--out", default="transfer_recipe.yaml", help="the recipe file to write")
    advise.add_argument("--force", action="store_true", help="overwrite --out")
    advise.add_argument("overrides", nargs="*", metavar="key=value", help="any config key (data.image_size=...)")
    return parser.parse_args(argv)


def check_recipe(text: str, out: Path) -> None:
    """Refuse to write a recipe that would not train: its keys must fit the schema and each other."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=out.parent, delete=False) as file:
        file.write(text)
    try:
        check_transfer(load_config(file.name))
    except ConfigError as error:
        raise ConfigError(f"the recommended settings do not fit the measured recipe ({error}); nothing written to "
                          f"{out}") from None
    finally:
        Path(file.name).unlink()


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise OutputExists(f"{out} exists; choose another --out, or --force to overwrite it")
    flags = {"dataset": args.dataset, "data_dir": args.data_dir, "model": args.model, "device": args.device}
    overrides = list(args.overrides) + ([f"model.pretrained_file={args.pretrained_file}"] if args.pretrained_file
                                        else [])
    cfg = load_config(args.config, overrides, flags)
    if not has_weights(cfg.model):
        raise ConfigError("advise judges pretrained weights: give --pretrained-file (or model.pretrained=true, or "
                          "model.pretrained_package)")
    measurement = transfer_measurement(cfg, k=args.k, temperature=args.temperature)
    thresholds = Thresholds(small_below=args.small_below, similar_gain=args.similar_gain)
    print(table(measurement, thresholds))
    # What was measured: the flags' keys and every key=value given, over the recipe it started from.
    base = {"data.dataset": cfg.data.dataset, "data.root": cfg.data.root, "data.image_size": cfg.data.image_size,
            **{f"model.{key}": getattr(cfg.model, key)
               for key in ("backbone", "pretrained", "pretrained_file", "pretrained_package")}}
    if cfg.data.dataset == "synthbirds":  # the generated data is part of what was measured
        base["data.synthbirds"] = dataclasses.asdict(cfg.data.synthbirds)
    base |= {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in overrides)}
    base_recipe = str(recipe_path(args.config).resolve()) if args.config else None
    text = recipe(measurement, base, thresholds, base_recipe)
    check_recipe(text, out)
    write_atomically(out, text)
    print(f"recommended settings written to {out}: python -m fgvc.train --config {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
