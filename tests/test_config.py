"""Config: schema defaults, YAML and key=value overrides, errors that name the key, round trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fgvc.build import build_model
from fgvc.config import (
    QUICK_START,
    RECIPES_DIR,
    Config,
    ConfigError,
    default_recipe,
    from_dict,
    load_config,
    load_run_config,
    to_dict,
    to_yaml,
    valid_keys,
)

# Runnable recipes; configs/_base/ holds the files they start from.
CONFIGS = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if "_base" not in p.parts)


def test_defaults_flags_file_and_overrides_merge_in_order(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 0.1\n  name: sgd\nschedule:\n  epochs: 30\n")
    cfg = load_config(recipe, ["optim.lr=0.05", "data.crop_scale=[0.5,1.0]"], {"epochs": 7, "data_dir": "/data/cub"})
    assert cfg.optim.lr == 0.05 and cfg.optim.name == "sgd"  # override beats file
    assert cfg.schedule.epochs == 7 and cfg.data.root == "/data/cub"  # flags beat file
    assert cfg.data.crop_scale == [0.5, 1.0] and cfg.model.backbone == Config().model.backbone


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("data.batchsize=8", "did you mean 'data.batch_size'?"),
    ("optim.lr=fast", "bad value for 'optim.lr'"),
    ("data.batch_size=3.5", "bad value for 'data.batch_size'"),
    ("train.channels_last=maybe", "bad value for 'train.channels_last'"),
    ("no_equals_sign", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_config(None, [override])


def test_bad_file_is_named(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  backbon: resnet50\n")
    with pytest.raises(ConfigError, match=rf"{recipe}.*unknown key 'model.backbon'; did you mean 'model.backbone'"):
        load_config(recipe)
    recipe.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_and_dict_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=0.02", "model.pretrained_file=/w/r.safetensors", "data.synthbirds.seed=4"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg
    assert load_run_config(saved) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_a_run_saved_before_a_key_existed_rebuilds_what_it_trained(tmp_path: Path) -> None:
    """A run saved before model.output_stride existed trained at the architecture's own stride: its checkpoint and
    config.yaml must not be rebuilt at the quick start's 16 (the weights would load, the predictions be wrong)."""
    cfg = load_config("synthbirds/scratch_isqrt")
    assert cfg.model.output_stride == 16
    old = to_dict(cfg)
    del old["model"]["output_stride"]
    assert from_dict(old).model.output_stride is None
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg).replace("  output_stride: 16\n", ""))
    assert "output_stride" not in saved.read_text()
    assert load_run_config(saved).model.output_stride is None
    assert load_run_config(saved) == from_dict(old)
    # Saved after the key existed: kept as saved, whichever value it has.
    assert from_dict(to_dict(cfg)).model.output_stride == 16
    assert from_dict({**old, "model": {**old["model"], "output_stride": 8}}).model.output_stride == 8


def test_design_key_names_exist() -> None:
    keys = set(valid_keys())
    for key in ("data.dataset", "data.root", "data.image_size", "data.resize_size", "data.batch_size", "data.workers",
                "data.val_fraction", "model.backbone", "model.pretrained", "model.pretrained_file", "model.head",
                "model.drop_rate", "model.drop_path_rate", "optim.name", "optim.lr", "optim.weight_decay",
                "optim.momentum", "optim.head_lr_mult", "schedule.epochs", "schedule.warmup_epochs",
                "regularization.label_smoothing", "train.seed", "train.amp", "train.channels_last", "train.compile",
                "train.grad_accum", "train.deterministic", "output_dir"):
        assert key in keys


@pytest.mark.parametrize("recipe", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_every_recipe_loads_and_names_its_aim(recipe: Path) -> None:
    assert isinstance(load_config(recipe), Config)
    header = " ".join(line.lstrip("# ") for line in recipe.read_text().splitlines() if line.startswith("#"))
    assert re.search(r"\d+(\.\d+)?(-\d+(\.\d+)?)?% test top-1", header), "a recipe says which number it aims at"


@pytest.mark.parametrize("recipe", sorted((RECIPES_DIR / "cub200").glob("*.yaml")), ids=lambda p: p.name)
def test_real_dataset_recipes_build_their_models(recipe: Path) -> None:
    cfg = load_config(recipe, ["model.pretrained=false"])  # the architecture, without downloading weights
    model = build_model(cfg.model, num_classes=200, image_size=cfg.data.image_size)
    assert model.head.fc.out_features == 200


def test_dataset_flag_picks_a_default_recipe() -> None:
    assert default_recipe("cub200") == RECIPES_DIR / "cub200" / "wsdan_inception_v3.yaml"
    assert default_recipe("cub200").is_file()
    assert default_recipe(None) == default_recipe("synthbirds") == RECIPES_DIR / QUICK_START
    assert default_recipe("folder") is None  # the schema defaults


def test_schema_defaults_are_a_general_recipe_and_the_quick_start_its_own() -> None:
    neutral, quick = load_config(), load_config(QUICK_START)
    assert (neutral.model.backbone, neutral.model.head, neutral.model.output_stride) == ("resnet50", "linear", None)
    assert neutral.data.image_size == 224 and neutral.schedule.epochs == 100
    assert (quick.model.backbone, quick.model.pretrained_package, quick.model.head) == (
        "tf_efficientnet_lite0", "efficientnet-lite0", "linear")
    scratch = load_config("synthbirds/scratch_isqrt")  # the from-scratch preset, kept as a recipe
    assert (scratch.model.backbone, scratch.model.head, scratch.model.output_stride) == ("test_resnet", "isqrt", 16)
    assert scratch.data == quick.data
    assert load_config("synthbirds/quickstart") == quick == load_config(RECIPES_DIR / QUICK_START)


def test_there_are_recipes() -> None:
    assert CONFIGS


def test_a_damaged_saved_config_is_refused_not_filled_with_defaults(tmp_path: Path) -> None:
    saved = tmp_path / "config.yaml"
    whole = to_yaml(load_config()).splitlines(keepends=True)
    for damaged in ("", "".join(whole[:30])):  # empty, or cut after its data section
        saved.write_text(damaged)
        with pytest.raises(ConfigError, match=f"run config {saved}: not a whole saved config"):
            load_run_config(saved)
    saved.write_text("".join(whole)[:200])  # cut inside a line: not YAML, said on one line
    with pytest.raises(ConfigError, match="is not valid YAML") as caught:
        load_run_config(saved)
    assert "\n" not in str(caught.value)
