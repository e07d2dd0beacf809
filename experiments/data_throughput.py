"""Data-side throughput: synthbirds generation speed on one core, and the training loader at 0 and 2 workers.

    python experiments/data_throughput.py --out experiments/results/data_throughput.md

Generation is timed three ways in one run, so the ratios are comparable on a noisy machine: drawing only (in
memory), drawing + JPEG encoding (in memory), and the whole `generate` call (files, annotations, atomic rename).
Each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from report import emit, header

from fgvc.data.cub import CUBDataset
from fgvc.data.loader import build_loader
from fgvc.data.synthbirds import SynthBirdsSpec, class_attributes, generate, image_rng, render_bird
from fgvc.data.transforms import PartAwareTransform, train_transform


def median_rate(count: int, run, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def generation_rates(spec: SynthBirdsSpec, repeats: int, workdir: Path) -> dict[str, float]:
    classes = class_attributes(spec.num_classes, spec.seed)
    count = spec.num_classes * spec.images_per_class

    def draw(encode: bool) -> None:
        for image_id in range(1, count + 1):
            bird = render_bird(classes[(image_id - 1) % len(classes)], image_rng(spec.seed, image_id),
                               spec.image_size, spec.difficulty)
            if encode:
                Image.fromarray(bird.image).save(io.BytesIO(), format="JPEG", quality=95, subsampling=0)

    def write() -> None:
        generate(workdir / "generated", spec, overwrite=True)

    return {
        "draw only (in memory)": median_rate(count, lambda: draw(False), repeats),
        "draw + JPEG encode (in memory)": median_rate(count, lambda: draw(True), repeats),
        "generate() to disk (complete dataset)": median_rate(count, write, repeats),
    }


def loader_rates(root: Path, image_size: int, batch_size: int, repeats: int) -> dict[int, float]:
    dataset = CUBDataset(root, "trainval")
    transform = PartAwareTransform(train_transform(image_size), dataset.part_names)
    rates = {}
    for workers in (0, 2):
        loader = build_loader(dataset, transform, batch_size=batch_size, seed=0, train=True, workers=workers)
        next(iter(loader))  # start the workers before timing

        def one_epoch(loader=loader) -> None:
            for batch in loader:
                batch["image"].sum()

        images = len(loader) * batch_size
        rates[workers] = median_rate(images, one_epoch, repeats)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here (also printed)")
    parser.add_argument("--image-size", type=int, default=128, help="synthbirds image size")
    parser.add_argument("--crop-size", type=int, default=112, help="training crop of the loader preset")
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for generation; the loader's workers are separate processes

    spec = SynthBirdsSpec(num_classes=10, images_per_class=args.images_per_class, image_size=args.image_size)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as workdir:
        generation = generation_rates(spec, args.repeats, Path(workdir))
        loading = loader_rates(Path(workdir) / "generated", args.crop_size, 32, args.repeats)

    count = spec.num_classes * spec.images_per_class
    lines = [
        *header("Data throughput"),
        f"Median of {args.repeats} runs.",
        "",
        f"## synthbirds generation, {args.image_size} px, one process ({count} images, difficulty "
        f"{spec.difficulty}); target 200 images/s",
        "",
        "| stage | images/s |",
        "|---|---:|",
        *(f"| {stage} | {rate:.0f} |" for stage, rate in generation.items()),
        "",
        f"## Training loader, preset `train_transform({args.crop_size})` (random resized crop, flip, colour "
        f"jitter, normalize), batch 32, on the {args.image_size} px images",
        "",
        "| workers | images/s |",
        "|---:|---:|",
        *(f"| {workers} | {rate:.0f} |" for workers, rate in loading.items()),
        "",
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
