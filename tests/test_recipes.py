"""Recipes: every recipe resolves to the values it had before recipes composed (and before the quick start left the
schema), `base:` composition, recipe names, and --print-config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from fgvc import train as train_cli
from fgvc.build import build_preprocessing, head_options, with_preprocessing
from fgvc.config import (
    RECIPES_DIR,
    Config,
    ConfigError,
    ModelConfig,
    SSLConfig,
    TransferConfig,
    WSDANConfig,
    default_recipe,
    load_config,
    to_dict,
)
from fgvc.data.synthbirds import SynthBirdsSpec


# Every recipe's resolved config on the code before recipes composed, written by that code. The from-scratch preset
# (scratch_isqrt.yaml) is what `python -m fgvc.train` with no arguments resolved to then (the schema defaults); the
# quick start is now a pretrained recipe of its own. Keys have only been added since: their values follow.
def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "backbone_args":  # backbone_args is one value: a dict of kwargs
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


BEFORE = json.loads((Path(__file__).parent / "data" / "recipes_before.json").read_text())
SCRATCH_PRESET = "synthbirds/scratch_isqrt.yaml"
NEW_KEYS = {"data.mean": None, "data.std": None, "data.interpolation": None, "optim.layer_decay": None,
            "model.pretrained_package": None, "train.sync_batchnorm": False, "optim.clip_grad": None,
            "optim.clip_mode": "norm", "data.synthbirds.class_offset": 0, "data.synthbirds.domain": "standard",
            **{f"transfer.{f.name}": f.default for f in dataclasses.fields(TransferConfig)},
            **flatten({"ssl": dataclasses.asdict(SSLConfig())})}
HEAD_KEYS = {"model.head_dim", "model.isqrt_iterations", "model.num_attention_maps",
             *(f"model.wsdan.{f.name}" for f in dataclasses.fields(WSDANConfig))}


def unread_keys(cfg: Config) -> set[str]:
    """Keys nothing reads in this configuration: head options its head does not take, and the synthbirds
    generation settings of a run on another dataset."""
    taken = {f"model.wsdan.{k}" if k in WSDANConfig.__dataclass_fields__ else f"model.{k}"
             for k in head_options(cfg.model, cfg.model.head)}
    unread = HEAD_KEYS - taken
    if cfg.data.dataset != "synthbirds":
        unread |= {f"data.synthbirds.{f.name}" for f in dataclasses.fields(SynthBirdsSpec)}
    return unread


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_recipe_resolves_to_the_values_it_had(name: str) -> None:
    cfg = load_config(RECIPES_DIR / name)
    now, before = flatten(to_dict(cfg)), flatten(BEFORE[name])
    assert set(now) == set(before) | set(NEW_KEYS)
    assert {key: now[key] for key in NEW_KEYS} == NEW_KEYS
    changed = {key: (before[key], now[key]) for key in before if now[key] != before[key]}
    assert set(changed) <= unread_keys(cfg), changed
    if name in (SCRATCH_PRESET, "synthbirds/linear_test_resnet_long.yaml"):
        assert not changed  # the from-scratch preset's data and model, to the last value


def test_the_unread_keys_are_unread() -> None:
    """The exemption above is exact: the wsdan head takes none of head_dim / isqrt_iterations, the isqrt head none
    of WS-DAN's constants."""
    wsdan = load_config("cub200/wsdan_inception_v3")
    assert "model.head_dim" in unread_keys(wsdan) and "model.num_attention_maps" not in unread_keys(wsdan)
    isqrt = load_config("cub200/isqrt_resnet50")
    assert {"model.head_dim", "model.isqrt_iterations"}.isdisjoint(unread_keys(isqrt))
    assert "model.wsdan.logit_scale" in unread_keys(isqrt)
    assert set(head_options(ModelConfig(head="wsdan"), "wsdan")) >= {"num_attention_maps", "logit_scale", "drop_rate"}


def write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


def test_bases_merge_in_order_and_the_recipe_wins(tmp_path: Path) -> None:
    write(tmp_path / "common" / "a.yaml", {"optim": {"lr": 0.1, "name": "sgd"}, "schedule": {"epochs": 3}})
    write(tmp_path / "common" / "b.yaml", {"base": "a.yaml", "optim": {"lr": 0.2}, "data": {"batch_size": 7}})
    write(tmp_path / "c.yaml", {"schedule": {"epochs": 5}})
    recipe = write(tmp_path / "run.yaml", {"base": ["common/b.yaml", "c.yaml"], "data": {"batch_size": 9}})
    cfg = load_config(recipe, ["optim.momentum=0.5"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.2, 0.5)  # a, then b over it
    assert cfg.schedule.epochs == 5 and cfg.data.batch_size == 9  # later bases win, the recipe wins over all


def test_base_errors_name_the_file(tmp_path: Path) -> None:
    write(tmp_path / "x.yaml", {"base": "y.yaml"})
    write(tmp_path / "y.yaml", {"base": "x.yaml"})
    with pytest.raises(ConfigError, match="its bases lead back to it"):
        load_config(tmp_path / "x.yaml")
    missing = write(tmp_path / "m.yaml", {"base": "nowhere.yaml"})
    with pytest.raises(ConfigError, match=rf"{missing}: its base nowhere.yaml .* not found"):
        load_config(missing)
    bad = write(tmp_path / "bad.yaml", {"base": "x.yaml"})
    write(tmp_path / "x.yaml", {"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'x.yaml'}: unknown key 'optim.lrr'"):
        load_config(bad)  # the key is named in the base that has it
    with pytest.raises(ConfigError, match="not found"):
        load_config("cub200/no_such_recipe")


def test_no_recipe_is_a_copy_of_another() -> None:
    """The method x dataset recipes differ in their dataset alone: they start from one file per method."""
    for dataset in ("cub200", "cars196", "aircraft100"):
        for method in ("bilinear_vgg16", "isqrt_resnet50", "wsdan_inception_v3"):
            content = yaml.safe_load((RECIPES_DIR / dataset / f"{method}.yaml").read_text())
            assert content == {"base": f"../_base/{method}.yaml", "data": {"dataset": dataset}}


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path: Path, capsys) -> None:
    assert train_cli.main(["--print-config", "model.head=wsdan", f"output_dir={tmp_path}"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(default_recipe(None), ["model.head=wsdan", f"output_dir={tmp_path}"])
    assert printed == to_dict(with_preprocessing(cfg, build_preprocessing(cfg)))  # what the run would save
    # the quick start's ImageNet weights ask for their own preprocessing (timm's pretrained_cfg)
    assert printed["model"]["backbone"] == "tf_efficientnet_lite0" and printed["data"]["interpolation"] == "bicubic"
    assert list(tmp_path.iterdir()) == []
    assert train_cli.main(["--print-config", "--config", "cub200/isqrt_resnet50"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["head"] == "isqrt"
