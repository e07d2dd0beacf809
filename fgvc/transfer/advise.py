"""The rule of thumb of transfer learning, applied to measurements instead of guesses.

    small + similar   -> feature extraction (linear probe)       small + different -> fine-tune all, layer decay
    large + similar   -> fine-tune all, with layer-wise lr decay  large + different -> fine-tune all

Size is the training split's images per class. Similarity is how much better the pretrained backbone's frozen
features separate the target classes than the same architecture at random init: the gain, in points of weighted
k-NN top-1 on the validation split. The thresholds are the defaults of `Thresholds`; experiments/transfer.py
measures every strategy in each cell of a source/target pair whose domain gap is controlled, and
experiments/README.md says how the defaults follow from its table.

The seed's rule says "fine-tune the top layers" for a small, different target; measured (3 seeds), fine-tuning all
layers with layer-wise lr decay did better there (65.8 +- 1.8% against 62.4 +- 2.8% for the top two stages), so
that is what the advisor recommends; the top-stages mode stays (transfer.mode=top) for when memory or time is short.
Each recommendation sets every transfer key it depends on, so a recipe it is laid over cannot leave a conflicting
one (a layer decay under a linear probe, trainable_stages without mode top).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

SIZES, SIMILARITIES = ("small", "large"), ("similar", "different")

# What each cell recommends, as config keys (the settings experiments/transfer.py runs for each strategy).
RECOMMENDATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("small", "similar"): {"transfer.mode": "linear_probe", "transfer.trainable_stages": None,
                           "optim.layer_decay": None},
    ("small", "different"): {"transfer.mode": "full", "transfer.trainable_stages": None, "optim.layer_decay": 0.75},
    ("large", "similar"): {"transfer.mode": "full", "transfer.trainable_stages": None, "optim.layer_decay": 0.75},
    ("large", "different"): {"transfer.mode": "full", "transfer.trainable_stages": None, "optim.layer_decay": None},
}
STRATEGY_NAMES = {("small", "similar"): "feature extraction (linear probe)",
                  ("small", "different"): "fine-tune all, layer-wise lr decay",
                  ("large", "similar"): "fine-tune all, layer-wise lr decay",
                  ("large", "different"): "fine-tune all (or train from scratch)"}


@dataclass(frozen=True)
class Thresholds:
    """A target is small below `small_below` training images per class (CUB's 30 is small), and similar when the
    pretrained features beat random-init ones by at least `similar_gain` points of k-NN top-1."""

    small_below: float = 50.0
    similar_gain: float = 55.0


@dataclass(frozen=True)
class Measurement:
    images_per_class: float
    pretrained_knn: float  # weighted k-NN top-1 (%) of the pretrained frozen features on the validation split
    random_knn: float  # the same for the architecture at random init

    @property
    def gain(self) -> float:
        return self.pretrained_knn - self.random_knn


def cell(measurement: Measurement, thresholds: Thresholds = Thresholds()) -> tuple[str, str]:
    """(size, similarity) of the measured target."""
    size = "small" if measurement.images_per_class < thresholds.small_below else "large"
    similarity = "similar" if measurement.gain >= thresholds.similar_gain else "different"
    return size, similarity


def table(measurement: Measurement, thresholds: Thresholds = Thresholds()) -> str:
    """The 2 x 2 rule of thumb with the measured cell marked, and the figures that placed it there."""
    chosen = cell(measurement, thresholds)
    width = max(len(name) for name in STRATEGY_NAMES.values()) + 6
    header = (f"{'':14}{f'similar (gain >= {thresholds.similar_gain:g})':{width}}"
              f"{f'different (gain < {thresholds.similar_gain:g})':{width}}")
    rows = [header]
    for size in SIZES:
        label = f"< {thresholds.small_below:g}" if size == "small" else f">= {thresholds.small_below:g}"
        entries = [("[x] " if (size, similarity) == chosen else "[ ] ") + STRATEGY_NAMES[size, similarity]
                   for similarity in SIMILARITIES]
        rows.append(f"{f'{size} {label}':14}" + "".join(f"{entry:{width}}" for entry in entries))
    return "\n".join([
        f"size: {measurement.images_per_class:.1f} training images per class",
        f"similarity: k-NN top-1 {measurement.pretrained_knn:.1f}% with the pretrained features, "
        f"{measurement.random_knn:.1f}% at random init: gain {measurement.gain:+.1f} points",
        "", *rows, "",
        f"measured cell: {chosen[0]} + {chosen[1]} -> {STRATEGY_NAMES[chosen]}"])


def recipe(measurement: Measurement, base: dict[str, Any], thresholds: Thresholds = Thresholds(),
           base_recipe: str | None = None) -> str:
    """A recipe file (YAML): `base_recipe` (the recipe the measurement started from) if any, then `base` (the data
    and model keys that were measured) and the cell's recommended settings; its header says what was measured."""
    chosen = cell(measurement, thresholds)
    settings = {**base, **RECOMMENDATIONS[chosen]}
    nested: dict[str, Any] = {"base": base_recipe} if base_recipe is not None else {}
    for key, value in settings.items():  # dotted keys, at any depth (data.synthbirds.seed), later ones winning
        *sections, name = key.split(".")
        place = nested
        for section in sections:
            place = place.setdefault(section, {})
        place[name] = value
    header = [f"# Written by python -m fgvc.transfer advise: {chosen[0]} + {chosen[1]} -> {STRATEGY_NAMES[chosen]}.",
              f"# {measurement.images_per_class:.1f} training images per class (small below "
              f"{thresholds.small_below:g});",
              f"# k-NN top-1 {measurement.pretrained_knn:.1f}% pretrained vs {measurement.random_knn:.1f}% random "
              f"init, gain {measurement.gain:+.1f} points (similar from {thresholds.similar_gain:g}).",
              "#   python -m fgvc.train --config THIS_FILE"]
    return "\n".join(header) + "\n" + yaml.safe_dump(nested, sort_keys=False)
