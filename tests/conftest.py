"""Shared fixtures: small synthbirds trees, generated once per test session."""

from __future__ import annotations

import os

# Triton decides at decoration time whether kernels run through its numpy interpreter, so this must precede every
# import of triton. There is no GPU here; on a GPU machine, TRITON_INTERPRET=0 runs the same tests compiled.
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402

from fgvc.data.synthbirds import SynthBirdsSpec, generate

SMALL_SPEC = SynthBirdsSpec(num_classes=6, images_per_class=10, train_fraction=0.6, image_size=64, seed=11)


@pytest.fixture(scope="session")
def small_birds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-image synthbirds tree. Read-only: tests that edit files use `birds_copy`."""
    root = tmp_path_factory.mktemp("birds") / "CUB_200_2011"
    generate(root, SMALL_SPEC)
    return root


@pytest.fixture
def birds_copy(small_birds: Path, tmp_path: Path) -> Path:
    """A private copy of the small tree that a test may corrupt."""
    root = tmp_path / "CUB_200_2011"
    shutil.copytree(small_birds, root)
    return root
