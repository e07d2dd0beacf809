"""Pictures of where a trained model looks, one PNG per image of a split.

    python -m fgvc.visualize --checkpoint runs/<run>/best.pt [--split test] [--count 8 | --indices 3 17 42]
                             [--source auto|gradcam] [--out DIR]

Each picture shows the input as the model saw it (the evaluation crop) with the object box (green), the head's
attention crop box where it crops at test time (cyan) and the visible part keypoints (white) where the data has
them, the top-3 predictions, and each map laid over the image: a localizer's attention maps (the strongest
--max-maps and the mean of all), otherwise the class activation map of the top-1 class; --source gradcam shows
Grad-CAM instead, for any head. All maps of a picture share one colour scale and one colour bar.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fgvc.build import dataset_for, load_model
from fgvc.data.images import ImageReadError
from fgvc.data.splits import SPLITS
from fgvc.engine.inference import MAP_SOURCES, where_it_looks
from fgvc.errors import command
from fgvc.viz import attention_figure, save_figure, to_uint8_image


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
    parser.add_argument("--data-dir", help="read the data from here instead of the run's data.root")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="folder for the PNGs (default: visualize/ beside the checkpoint)")
    args = parser.parse_args(argv)
    trained = load_model(args.checkpoint, device=args.device, data_root=args.data_dir)
    dataset = dataset_for(trained, args.split)
    if args.indices is not None:
        bad = [i for i in args.indices if not 0 <= i < len(dataset)]
        if bad:
            parser.error(f"--indices {bad} outside 0..{len(dataset) - 1} of the {args.split} split")
        indices = args.indices
    else:
        count = min(args.count, len(dataset))
        indices = sorted(np.random.default_rng(args.seed).choice(len(dataset), count, replace=False).tolist())
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "visualize"
    transform = trained.transform(part_names=dataset.part_names)
    failures = 0
    for index in indices:
        try:
            sample = transform(dataset[index], seed=0)
        except ImageReadError as error:
            print(f"{error.path}: unreadable: {error.reason}", file=sys.stderr)
            failures += 1
            continue
        looked = where_it_looks(trained, sample["image"], source=args.source, max_maps=args.max_maps)
        true = dataset.classes[sample["label"]]
        verdict = "right" if looked.predictions[0][0] == true else "wrong"
        title = (f"{args.split} #{index} ({Path(str(dataset.image_path(index))).name}): true class {true}; "
                 f"top-1 {verdict}")
        seen = to_uint8_image(sample["image"], trained.preprocessing.mean, trained.preprocessing.std)
        figure = attention_figure(seen, looked.maps, title=title,
                                  box=sample["bbox"].tolist() if "bbox" in sample else None, crop_box=looked.crop_box,
                                  parts=sample["parts"].numpy() if "parts" in sample else None,
                                  predictions=looked.predictions)
        path = save_figure(figure, out / f"{args.split}-{index:05d}.png")
        print(path)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
