"""Pictures of where a trained model looks, one PNG per image of a split.

    python -m fgvc.visualize --checkpoint runs/<run>/best.pt [--split test] [--count 8 | --indices 3 17 42]
                             [--source auto|gradcam] [--out DIR]
    python -m fgvc.visualize --checkpoint runs/<pretraining run>/last.pt          # a self-supervised ViT's attention
    python -m fgvc.visualize --checkpoint runs/<MAE run>/last.pt --mae            # MAE's reconstructions

Each picture shows the input as the model saw it (the evaluation crop) with the object box (green), the head's
attention crop box where it crops at test time (cyan) and the visible part keypoints (white) where the data has
them, the top-3 predictions, and each map laid over the image: a localizer's attention maps (the strongest
--max-maps and the mean of all), otherwise the class activation map of the top-1 class; --source gradcam shows
Grad-CAM instead, for any head. All maps of a picture share one colour scale and one colour bar.

A pretraining run's checkpoint (python -m fgvc.pretrain, a ViT) shows the class token's last-layer attention, each
head and their mean, with the box and the parts, and prints the localization metrics of the mean map over the
whole split (peak in the object box, peak on a discriminating part; no label makes the maps). With --mae, an MAE
run's checkpoint gives one PNG of the chosen images: the input, its masked patches blanked (--seed draws the mask),
the reconstruction, and the reconstruction pasted among the visible patches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fgvc.build import (
    LoadedMethod,
    LoadedModel,
    attention_metrics,
    dataset_for,
    is_pretraining,
    load_model,
    load_pretraining,
    run_split,
)
from fgvc.config import ConfigError
from fgvc.data.images import ImageReadError
from fgvc.data.splits import SPLITS
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.inference import MAP_SOURCES, where_it_looks
from fgvc.engine.localization import localization_line, meter_for
from fgvc.errors import command
from fgvc.ssl.mae import MAE
from fgvc.viz import attention_figure, image_grid, save_figure, to_uint8_image


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=SPLITS)
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--count", type=int, default=8, help="this many images of the split, sampled with --seed")
    chosen.add_argument("--indices", type=int, nargs="+", help="these images of the split (0-based)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default="auto", choices=MAP_SOURCES)
    parser.add_argument("--max-maps", type=int, default=12, help="attention maps shown (the strongest)")
    parser.add_argument("--mae", action="store_true", help="an MAE pretraining run's reconstructions")
    parser.add_argument("--data-dir", help="read the data from here instead of the run's data.root")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="folder for the PNGs (default: visualize/ beside the checkpoint)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "visualize"
    state = load_checkpoint(args.checkpoint)
    if is_pretraining(state):
        pretrained = load_pretraining(args.checkpoint, device=args.device, data_root=args.data_dir, state=state)
        dataset = run_split(pretrained.config, args.split)
        indices = chosen_images(parser, args, len(dataset))
        if args.mae:
            return reconstructions(pretrained, dataset, indices, args, out)
        return attention_pictures(pretrained, dataset, indices, args, out)
    if args.mae:
        parser.error(f"--mae shows an MAE pretraining run's reconstructions; {args.checkpoint} is a classifier's")
    trained = load_model(args.checkpoint, device=args.device, data_root=args.data_dir, state=state)
    dataset = dataset_for(trained, args.split)
    return classifier_pictures(trained, dataset, chosen_images(parser, args, len(dataset)), args, out)


def classifier_pictures(trained: LoadedModel, dataset, indices: list[int], args: argparse.Namespace,
                        out: Path) -> int:
    """Each chosen image with the maps of where the classifier looks (--source) and its top-3 predictions."""
    transform = trained.transform(part_names=dataset.part_names)
    failures = 0
    for index, sample in readable_samples(dataset, indices, transform):
        if sample is None:
            failures += 1
            continue
        looked = where_it_looks(trained, sample["image"], source=args.source, max_maps=args.max_maps)
        true = dataset.classes[sample["label"]]
        verdict = "right" if looked.predictions[0][0] == true else "wrong"
        title = f"{image_name(args.split, index, dataset)}: true class {true}; top-1 {verdict}"
        seen = to_uint8_image(sample["image"], trained.preprocessing.mean, trained.preprocessing.std)
        figure = attention_figure(seen, looked.maps, title=title,
                                  box=sample["bbox"].tolist() if "bbox" in sample else None, crop_box=looked.crop_box,
                                  parts=sample["parts"].numpy() if "parts" in sample else None,
                                  predictions=looked.predictions)
        print(save_figure(figure, out / f"{args.split}-{index:05d}.png"))
    return 1 if failures else 0


def chosen_images(parser: argparse.ArgumentParser, args: argparse.Namespace, size: int) -> list[int]:
    """--indices (checked against the split's size), else --count images sampled with --seed."""
    if args.indices is not None:
        bad = [i for i in args.indices if not 0 <= i < size]
        if bad:
            parser.error(f"--indices {bad} outside 0..{size - 1} of the {args.split} split")
        return args.indices
    return sorted(np.random.default_rng(args.seed).choice(size, min(args.count, size), replace=False).tolist())


def readable_samples(dataset, indices: list[int], transform) -> Iterator[tuple[int, dict | None]]:
    """(index, the transformed sample) for each index; None, reported on stderr, for an unreadable image."""
    for index in indices:
        try:
            yield index, transform(dataset[index], seed=0)
        except ImageReadError as error:
            print(f"{error.path}: unreadable: {error.reason}", file=sys.stderr)
            yield index, None


def image_name(split: str, index: int, dataset) -> str:
    return f"{split} #{index} ({Path(str(dataset.image_path(index))).name})"


def attention_pictures(pretrained: LoadedMethod, dataset, indices: list[int], args: argparse.Namespace,
                       out: Path) -> int:
    """Each chosen image with its class-token attention heads and their mean; then the split's metrics."""
    backbone, runtime = pretrained.method.evaluated_backbone, pretrained.runtime
    preprocessing = pretrained.preprocessing
    failures = 0
    for index, sample in readable_samples(dataset, indices, pretrained.transform(dataset.part_names)):
        if sample is None:
            failures += 1
            continue
        with torch.no_grad():
            heads = backbone.cls_attention(runtime.images(sample["image"][None]))[0].float().cpu()
        maps = [(f"head {head + 1}", heads[head].numpy()) for head in range(len(heads))]
        seen = to_uint8_image(sample["image"], preprocessing.mean, preprocessing.std)
        figure = attention_figure(seen, [*maps, ("mean of the heads", heads.mean(dim=0).numpy())],
                                  title=f"{image_name(args.split, index, dataset)}: class-token attention, last block",
                                  box=sample["bbox"].tolist() if "bbox" in sample else None,
                                  parts=sample["parts"].numpy() if "parts" in sample else None)
        print(save_figure(figure, out / f"attention-{args.split}-{index:05d}.png"))
    if meter_for(dataset) is None:
        print(f"{pretrained.config.data.dataset} has no object boxes or part keypoints: no localization metrics")
    else:
        metrics = attention_metrics(pretrained.config, backbone, runtime, args.split)
        print(f"{args.split} split, class-token {localization_line(metrics)}")
    return 1 if failures else 0


def reconstructions(pretrained: LoadedMethod, dataset, indices: list[int], args: argparse.Namespace,
                    out: Path) -> int:
    """One PNG of the chosen images' MAE reconstructions, the mask drawn with --seed."""
    method, runtime, preprocessing = pretrained.method, pretrained.runtime, pretrained.preprocessing
    if not isinstance(method, MAE):
        raise ConfigError(f"--mae: {args.checkpoint} pretrained {pretrained.config.ssl.method}, not mae")
    transform = pretrained.transform(dataset.part_names)
    samples = [(index, sample) for index, sample in readable_samples(dataset, indices, transform) if sample is not None]
    if not samples:
        raise ConfigError(f"--mae: none of the chosen images of the {args.split} split is readable")
    images = runtime.images(torch.stack([sample["image"] for _, sample in samples]))
    generator = torch.Generator(images.device).manual_seed(args.seed)
    pictures = [images, *method.reconstructions(images, generator)]
    rows = [(f"{args.split} #{index}",
             [to_uint8_image(picture[row], preprocessing.mean, preprocessing.std) for picture in pictures])
            for row, (index, _) in enumerate(samples)]
    titles = ["input", f"masked ({method.mask_ratio:.0%})", "reconstruction", "reconstruction + visible"]
    print(save_figure(image_grid(rows, titles), out / f"mae-{args.split}.png"))
    return 1 if len(samples) < len(indices) else 0


if __name__ == "__main__":
    sys.exit(main())
