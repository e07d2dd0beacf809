"""What robust decoding costs: the pre-flight check's throughput, and the training loader with fgvc's robust
decoder against a plain PIL loader (`np.asarray(Image.open(path).convert("RGB"))`), side by side in one run.

    python experiments/robust_input.py --out experiments/results/robust_input.md

The images are a synthbirds tree drawn at CUB's typical photo size (JPEG, --image-size px). The two loaders
alternate round by round and each figure is the median of --rounds, so machine noise hits both alike. Target:
robust decoding costs at most 10% of the plain loader's images/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from report import emit, header

from fgvc.data import cub
from fgvc.data.check import check_images
from fgvc.data.cub import CUBDataset
from fgvc.data.loader import build_loader
from fgvc.data.synthbirds import SynthBirdsSpec, generate
from fgvc.data.transforms import PartAwareTransform, train_transform


def plain_pil(path) -> np.ndarray:
    """The loader most trainers use: lazy open, convert, no checks (torchvision's default_loader, as an array)."""
    with open(path, "rb") as file:
        return np.asarray(Image.open(file).convert("RGB"))


def loader_rate(dataset: CUBDataset, image_size: int, batch_size: int, workers: int) -> float:
    transform = PartAwareTransform(train_transform(image_size), dataset.part_names)
    loader = build_loader(dataset, transform, batch_size=batch_size, seed=0, train=True, workers=workers)
    loader.set_epoch(0)
    start = time.perf_counter()
    images = sum(len(batch["label"]) for batch in loader)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--train-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir) / "CUB_200_2011"
        generate(root, SynthBirdsSpec(num_classes=10, images_per_class=args.images // 10, image_size=args.image_size,
                                      seed=0), workers=2)
        dataset = CUBDataset(root, "trainval")
        paths = [dataset.image_path(i) for i in range(len(dataset))]
        check = {workers: statistics.median(check_images(paths, workers=workers).images_per_s
                                            for _ in range(args.rounds)) for workers in (1, 2)}
        robust_reader = cub.read_rgb
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for name, reader in (("plain PIL", plain_pil), ("fgvc robust", robust_reader)):
                cub.read_rgb = reader  # the one place CUBDataset decodes
                for workers in (0, 2):
                    rates.setdefault((name, workers), []).append(
                        loader_rate(dataset, args.train_size, args.batch_size, workers))
        cub.read_rgb = robust_reader

    lines = header("Robust decoding: pre-flight check and training loader")
    lines += [f"Images: the {len(paths)} trainval JPEGs of a {args.images}-image synthbirds tree at {args.image_size} "
              f"px (CUB-sized photos). Median of "
              f"{args.rounds} rounds; the two loaders alternate within each round.", "",
              "## Pre-flight check (`python -m fgvc.data.check`: full decode of every file)", "",
              "| processes | images/s |", "|---:|---:|"]
    lines += [f"| {workers} | {rate:.0f} |" for workers, rate in check.items()]
    lines += ["", f"## Training loader, `train_transform({args.train_size})`, batch {args.batch_size}", "",
              "| loader workers | plain PIL images/s | fgvc robust images/s | robust / plain |",
              "|---:|---:|---:|---:|"]
    for workers in (0, 2):
        plain = statistics.median(rates[("plain PIL", workers)])
        robust = statistics.median(rates[("fgvc robust", workers)])
        lines.append(f"| {workers} | {plain:.0f} | {robust:.0f} | {robust / plain:.3f} |")
    lines += ["", "Target: robust / plain >= 0.90 (robust decoding may cost at most 10%)."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
