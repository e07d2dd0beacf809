"""Self-supervised pretraining on synthbirds, measured: each method pretrained for the same wall-time budget on the
same small backbone, then probed on the labeled split, against the same backbone at random init and against
supervised training with the same budget.

    python experiments/pretraining.py --budget 120 --seeds 0 1 2 --raw experiments/results/pretraining.json \
        --out experiments/results/pretraining.md
    python experiments/pretraining.py --family vit --budget 120 --seeds 0 1 2 \
        --raw experiments/results/pretraining_vit.json --out experiments/results/pretraining_vit.md

The CNN family: SimCLR, MoCo v2, BYOL and SimSiam, with and without views drawn inside the object box, on the CPU
recipe's test_resnet (configs/synthbirds/pretrain.yaml: the quick start's 10 x 300 images, from scratch at 64 px).
The ViT family: DINO, with and without local crops centred on the parts, and MAE, on their recipes' test_vit with
8 px patches (configs/synthbirds/pretrain_dino.yaml, pretrain_mae.yaml), and for every ViT backbone where its
class-token attention looks (fgvc.build.attention_metrics on the test split), beside a map that always peaks at
the image centre. Pretraining reads the train split's images only, no labels, and runs no monitor, so the budget is
pretraining alone. Every backbone then gets the same two probes: a linear probe on its frozen, cached features
(fgvc.train, transfer.mode=linear_probe, selected on val, tested once) and the weighted k-NN (k 20, T 0.07) with
the train split as neighbours and the test split as queries. Every run trains in this one process, one after
another, so wall times compare side by side; experiments/README.md has the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
from report import emit, finished, header, mean_spread
from safetensors.torch import save_file

from fgvc.build import (
    attention_metrics,
    build_backbone,
    build_dataset,
    build_eval_loader,
    build_preprocessing,
    build_runtime,
    knn_probe,
    probe_config,
    seed_everything,
    without_weights,
)
from fgvc.config import Config, load_config
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.localization import meter_for
from fgvc.engine.pretraining import BACKBONE_FILE, Collapsed, pretrain
from fgvc.engine.trainer import train
from fgvc.models import create_backbone


@dataclasses.dataclass(frozen=True)
class Family:
    """The rows of one backbone family: its base recipe (random init and supervised training), the supervised
    run's overrides, and each pretrained row's name -> (recipe, overrides)."""

    recipe: str
    supervised: tuple[str, ...]
    methods: dict[str, tuple[str, tuple[str, ...]]]
    attention: bool = False  # a ViT: where its class-token attention looks, too


CNN_METHODS = ("simclr", "moco", "byol", "simsiam")
FAMILIES = {
    # Supervised training of the same backbone from scratch, with a linear head (the scratch preset's lr).
    "cnn": Family("synthbirds/pretrain.yaml", ("optim.lr=0.005", "optim.weight_decay=0.05"), {
        f"{method}{' in box' if in_box else ''}": ("synthbirds/pretrain.yaml",
                                                   (f"ssl.method={method}", f"ssl.views_in_box={in_box}"))
        for method, in_box in itertools.product(CNN_METHODS, (False, True))}),
    # The ViT at AdamW's usual 1e-3 for supervised training from scratch.
    "vit": Family("synthbirds/pretrain_mae.yaml", ("optim.lr=0.001", "optim.weight_decay=0.05"), {
        "dino": ("synthbirds/pretrain_dino.yaml", ()),
        "dino, local crops on parts": ("synthbirds/pretrain_dino.yaml", ("ssl.local_crops_on_parts=true",)),
        "mae": ("synthbirds/pretrain_mae.yaml", ()),
    }, attention=True),
}
RUN_NUMBERS = itertools.count()
CALIBRATION_STEPS = 12


def configured(scratch: Path, seed: int, recipe: str, *overrides: str) -> Config:
    return load_config(recipe, [f"output_dir={scratch}", f"run_name=run{next(RUN_NUMBERS)}", f"train.seed={seed}",
                                "ssl.monitor=false", "train.log_every=1000", *overrides])


def with_epochs(cfg: Config, epochs: int) -> Config:
    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, epochs=epochs))


def seconds_per_step(run, cfg: Config, tries: int = 2) -> float:
    """The wall time of an optimizer step: the running images/s a run logs after 2 x CALIBRATION_STEPS steps
    (counted from its first batch, so setup is left out), the best of `tries` runs (the least disturbed)."""
    rates = []
    for _ in range(tries):
        once = dataclasses.replace(cfg, run_name=f"run{next(RUN_NUMBERS)}",
                                   train=dataclasses.replace(cfg.train, log_every=CALIBRATION_STEPS))
        result = run(once, stop_after_steps=2 * CALIBRATION_STEPS)
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        rates.append([record for record in records if record["kind"] == "train"][-1]["images_per_s"])
    return cfg.data.batch_size / max(rates)


def epochs_within(run, cfg: Config, budget: float, steps_per_epoch: int) -> int:
    return max(1, math.floor(budget / (seconds_per_step(run, cfg) * steps_per_epoch)))


def probes(cfg: Config, backbone_file: Path, attention: bool) -> dict[str, float]:
    """Linear probe and k-NN test top-1 (%) of a backbone weights file on cfg's data; with `attention`, where the
    ViT's class-token attention peaks on the test split."""
    probe = finished(train(probe_config(cfg, backbone_file, backbone_file.parent)))
    model = dataclasses.replace(without_weights(cfg.model), pretrained_file=str(backbone_file))
    runtime = build_runtime(cfg)
    backbone = build_backbone(model, image_size=cfg.data.image_size).to(runtime.device)
    knn = knn_probe(cfg, backbone, runtime, split="test", k=cfg.ssl.knn_k, temperature=cfg.ssl.knn_temperature)
    results = {"linear": probe.test["top1"], "knn": knn["top1"]}
    return results | (attention_metrics(cfg, backbone, runtime) if attention else {})


def random_init(scratch: Path, seed: int, family: Family) -> dict:
    cfg = configured(scratch, seed, family.recipe)
    seed_everything(seed)
    backbone = create_backbone(cfg.model.backbone, image_size=cfg.data.image_size,
                               backbone_args=cfg.model.backbone_args)
    file = scratch / cfg.run_name / BACKBONE_FILE
    file.parent.mkdir(parents=True)
    save_file({name: value.contiguous() for name, value in backbone.model.state_dict().items()}, file)
    return {**probes(cfg, file, family.attention), "seconds": 0.0, "epochs": 0}


def supervised(scratch: Path, seed: int, family: Family, epochs: int) -> dict:
    cfg = with_epochs(configured(scratch, seed, family.recipe, *family.supervised), epochs)
    result = finished(train(cfg))
    state = load_checkpoint(result.run_dir / "best.pt")["model"]
    prefix = "backbone.model."
    file = result.run_dir / BACKBONE_FILE
    save_file({name[len(prefix):]: value.contiguous() for name, value in state.items() if name.startswith(prefix)},
              file)
    return {**probes(cfg, file, family.attention), "own_head": result.test["top1"], "seconds": result.seconds,
            "epochs": epochs}


def pretrained(scratch: Path, seed: int, family: Family, name: str, epochs: int) -> dict:
    recipe, overrides = family.methods[name]
    cfg = with_epochs(configured(scratch, seed, recipe, *overrides), epochs)
    try:
        result = finished(pretrain(cfg))
    except Collapsed as error:
        print(f"{name} seed {seed}: {error}", flush=True)
        return {"collapsed": True, "epochs": epochs}
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [record for record in records if record["kind"] == "epoch"][-1]
    std = {"embedding_std": last_epoch["train"]["embedding_std"]} if "embedding_std" in last_epoch["train"] else {}
    return {**probes(cfg, result.run_dir / BACKBONE_FILE, family.attention), "seconds": result.seconds,
            "epochs": epochs, "loss": last_epoch["train"]["loss"], **std}


@torch.no_grad()
def centre_peaks(scratch: Path, family: Family) -> dict[str, float]:
    """The localization metrics of a map that always peaks at the image centre (no model): what a centre prior
    alone scores on the test split."""
    cfg = configured(scratch, 0, family.recipe)
    dataset = build_dataset(cfg.data, "test")
    meter = meter_for(dataset)
    side = cfg.data.image_size
    grid = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    bump = -(grid[:, None] ** 2 + grid[None, :] ** 2)
    for batch in build_eval_loader(cfg, dataset, build_preprocessing(cfg), split="test"):
        meter.update(bump.expand(len(batch["image"]), side, side), batch)
    return meter.compute()


def steps_per_epoch(cfg: Config) -> int:
    """Optimizer steps an epoch: the train split carved from the generated train images (data.val_fraction per
    class, as fgvc.data.splits does), in whole batches."""
    images = round(cfg.data.synthbirds.num_classes * cfg.data.synthbirds.images_per_class
                   * cfg.data.synthbirds.train_fraction * (1 - cfg.data.val_fraction))
    return images // cfg.data.batch_size


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    family = FAMILIES[args.family]
    per_epoch = steps_per_epoch(configured(scratch, args.seeds[0], family.recipe))
    budgets = {"supervised": epochs_within(train, configured(scratch, 0, family.recipe, *family.supervised),
                                           args.budget, per_epoch)}
    for name, (recipe, overrides) in family.methods.items():
        budgets[name] = epochs_within(pretrain, configured(scratch, 0, recipe, *overrides), args.budget, per_epoch)
    print(f"epochs within {args.budget} s: {budgets}", flush=True)
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed by seed, so that a slower stretch of the machine hits every row alike
        rows.setdefault("random init", []).append(random_init(scratch, seed, family))
        rows.setdefault("supervised", []).append(supervised(scratch, seed, family, budgets["supervised"]))
        for name in family.methods:
            rows.setdefault(name, []).append(pretrained(scratch, seed, family, name, budgets[name]))
            print(name, seed, rows[name][-1], flush=True)
    results = {"family": args.family, "budget": args.budget, "seeds": args.seeds, "rows": rows}
    return results | ({"centre_prior": centre_peaks(scratch, family)} if family.attention else {})


STD_NOTE = {
    "cnn": "spread embeddings have std about 1 / sqrt(D): 0.088 for SimCLR's, MoCo's and BYOL's 128, 0.0625 for "
           "SimSiam's 256; collapsed ones 0",
    "vit": "DINO's is the std of the 64-wide class-token embedding, about 0.125 when spread and 0 when collapsed; MAE "
           "logs none",
}


def table(results: dict) -> list[str]:
    family = results.get("family", "cnn")  # tables made before the ViT family have none
    rows = results["rows"]
    attention = "centre_prior" in results
    random_linear = statistics.mean(run["linear"] for run in rows["random init"])
    lines = header(f"Self-supervised pretraining on synthbirds ({family.upper()}), {results['budget']:.0f} s of "
                   "training each")
    lines += ["", f"Seeds {', '.join(map(str, results['seeds']))}; test top-1 (%), mean ± standard deviation over the "
                  "seeds. Chance is 10%. Loss and embedding std: the last epoch's means "
                  f"({STD_NOTE[family]}).", ""]
    extra = " peak in box | peak on part |" if attention else ""
    lines += [f"| backbone | epochs | training (s) | final loss | embedding std | linear probe | k-NN | "
              f"linear probe − random init |{extra}", "|---|" + "---:|" * (7 + 2 * attention)]
    for name, all_runs in rows.items():
        runs = [run for run in all_runs if not run.get("collapsed")]
        collapsed = len(all_runs) - len(runs)
        if not runs:
            blanks = " |" * (4 + 2 * attention)
            lines.append(f"| {name} | {all_runs[0]['epochs']} | | collapsed in every seed |{blanks}")
            continue
        gain = statistics.mean(run["linear"] for run in runs) - random_linear
        seconds = statistics.median(run["seconds"] for run in runs)
        trained = [run for run in runs if "loss" in run]
        loss = f"{statistics.mean(r['loss'] for r in trained):.3f}" if trained else ""
        stds = [r["embedding_std"] for r in trained if "embedding_std" in r]
        std = f"{statistics.mean(stds):.3f}" if stds else ""
        note = f" ({collapsed} collapsed)" if collapsed else ""
        peaks = "".join(f" {mean_spread([r[key] for r in runs])} |" for key in ("peak_in_box", "peak_on_part")
                        if attention)
        lines.append(f"| {name}{note} | {runs[0]['epochs']} | {seconds:.0f} | {loss} | {std} | "
                     f"{mean_spread([r['linear'] for r in runs])} | {mean_spread([r['knn'] for r in runs])} | "
                     f"{gain:+.1f} |{peaks}")
    own = mean_spread([run["own_head"] for run in rows["supervised"]])
    lines += ["", f"Supervised with its own linear head (trained with the backbone): {own}% test top-1.",
              "Training seconds include each run's setup (data, model) and exclude the probes."]
    if attention:
        prior = results["centre_prior"]
        lines += ["Peak in box / on part: % of test images whose class-token attention (last block, mean of the "
                  "heads) peaks inside the object box / within 10% of the image side of a visible part that "
                  "discriminates the class (fgvc.engine.localization); no label makes the maps. A map that always "
                  f"peaks at the image centre scores {prior['peak_in_box']:.1f}% / {prior['peak_on_part']:.1f}%."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="cnn", help="the CNN methods or the ViT ones")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of training per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--raw", type=Path, help="write (or, with --from-raw, read) the measurements as JSON")
    parser.add_argument("--from-raw", action="store_true", help="render the table from --raw without training")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.from_raw:
        results = json.loads(args.raw.read_text())
    else:
        with tempfile.TemporaryDirectory() as scratch:
            results = measure(args, Path(scratch))
        if args.raw is not None:
            args.raw.write_text(json.dumps(results, indent=1) + "\n")
    emit(table(results), args.out)


if __name__ == "__main__":
    main()
