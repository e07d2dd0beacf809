"""Part names and the left/right bookkeeping every part-aware step shares."""

from __future__ import annotations

import numpy as np

# CUB-200-2011's 15 parts, in the order (and with the ids, 1-based) of its parts/parts.txt.
CUB_PART_NAMES: tuple[str, ...] = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)


def mirror_permutation(part_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Index permutation that relabels parts after a mirror image: 'left X' <-> 'right X', others fixed.

    A mirrored photo of a bird's left side looks like its right side, so after a flip the keypoint that was
    annotated "left eye" is where a "right eye" annotation belongs.
    """
    index = {name: i for i, name in enumerate(part_names)}
    permutation = np.arange(len(part_names))
    for name, i in index.items():
        for side, other in (("left ", "right "), ("right ", "left ")):
            if name.startswith(side):
                partner = other + name[len(side) :]
                if partner not in index:
                    raise ValueError(f"part {name!r} has no {partner!r} partner in {list(part_names)}")
                permutation[i] = index[partner]
    return permutation
