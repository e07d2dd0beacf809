"""The public Python API (`import fgvc`): each function against what the build layer and the registries give, and
the README's example, run as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import fgvc
from fgvc.build import LoadedModel
from fgvc.config import Config, ConfigError
from fgvc.data import DATASETS
from fgvc.errors import FGVCError
from fgvc.models import HEADS, FGVCModel
from tests.test_training import SCRATCH_PRESET, tiny_overrides

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The body of the first fenced block after `<!-- marker -->` in README.md (as .ci/run reads its commands)."""
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"README.md has no <!-- {marker} --> block"
    return match.group(1)


def test_the_readme_example_runs(tmp_path: Path) -> None:
    code = readme_block("python-api")
    assert len(code.strip().splitlines()) <= 15
    env = {**os.environ, "FGVC_DATA_ROOT": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"test top-1 \d+\.\d%", done.stdout) and "true:" in done.stdout
    assert list((tmp_path / "runs").glob("*/best.pt"))


def test_the_api_is_what_import_fgvc_offers() -> None:
    assert set(fgvc.__all__) >= {"create_model", "list_heads", "list_datasets", "create_dataset", "load_model",
                                 "load_config", "train"}
    for name in fgvc.__all__:
        assert getattr(fgvc, name).__doc__, f"fgvc.{name} is documented"
    assert fgvc.list_heads() == HEADS.list() and {"linear", "bilinear", "isqrt", "wsdan"} <= set(fgvc.list_heads())
    assert fgvc.list_datasets() == DATASETS.list() and "cub200" in fgvc.list_datasets()
    with pytest.raises(AttributeError):
        fgvc.no_such_function  # noqa: B018


def test_create_model_takes_model_keys_as_options(tmp_path: Path) -> None:
    model = fgvc.create_model("isqrt", backbone="test_resnet", num_classes=7, head_dim=8, output_stride=16)
    assert isinstance(model, FGVCModel) and model.training
    assert model.head.fc.in_features == 8 * 9 // 2 and model.head.fc.out_features == 7
    assert model.forward_features(torch.randn(1, 3, 96, 96)).shape[-2:] == (6, 6)
    wsdan = fgvc.create_model("wsdan", backbone="test_resnet", num_classes=3, num_attention_maps=4,
                              wsdan={"logit_scale": 10.0})
    assert wsdan.head.logit_scale == 10.0 and wsdan.head.attention[0].out_channels == 4
    vit = fgvc.create_model("linear", backbone="test_vit", num_classes=3, image_size=64)
    assert vit(torch.randn(1, 3, 64, 64))["logits"].shape == (1, 3)
    with pytest.raises(ConfigError, match="unknown key 'model.head_dm'; did you mean 'model.head_dim'"):
        fgvc.create_model("isqrt", backbone="test_resnet", num_classes=3, head_dm=8)
    with pytest.raises(ConfigError, match="model.head: unknown head .isqr."):
        fgvc.create_model("isqr", backbone="test_resnet", num_classes=3)

    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = fgvc.create_model("linear", backbone="test_resnet", num_classes=3,
                               pretrained_file=tmp_path / "w.safetensors")
    assert torch.equal(loaded.backbone.model.conv1[0].weight, state["conv1.0.weight"])


def test_create_dataset_gives_dict_samples(small_birds: Path) -> None:
    birds = fgvc.create_dataset("synthbirds", small_birds, "test", val_fraction=0.2)
    sample = birds[0]
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (64, 64, 3)
    x0, y0, x1, y1 = sample["bbox"]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    assert sample["parts"].shape == (15, 3) and len(birds.classes) == 6
    cub = fgvc.create_dataset("cub200", small_birds, "train", val_fraction=0.2)
    assert len(cub) + len(fgvc.create_dataset("cub200", small_birds, "val", val_fraction=0.2)) == 36
    with pytest.raises(FGVCError, match="root: must point at"):
        fgvc.create_dataset("cub200", None, "train")


def test_load_config_train_and_load_model(small_birds: Path, tmp_path: Path) -> None:
    cfg = fgvc.load_config(SCRATCH_PRESET, [*tiny_overrides(small_birds, tmp_path, "api"),
                                                     "schedule.epochs=1"])
    assert isinstance(cfg, Config) and fgvc.load_config().model.backbone == "resnet50"  # None: the schema defaults
    result = fgvc.train(cfg)
    trained = fgvc.load_model(result.run_dir / "best.pt")
    assert isinstance(trained, LoadedModel) and not trained.model.training
    assert trained.classes == fgvc.create_dataset("synthbirds", small_birds, "test").classes
    birds = fgvc.create_dataset("synthbirds", small_birds, "test")
    sample = birds[0]
    image = trained.transform(birds.part_names)(sample, seed=0)["image"]  # parts move with the image
    assert image.shape == (3, 32, 32)
    ranked = trained.predict(sample["image"], topk=2)
    probabilities = torch.softmax(trained.logits(image[None])[0], dim=0)
    assert ranked[0] == (trained.classes[int(probabilities.argmax())], pytest.approx(float(probabilities.max())))
