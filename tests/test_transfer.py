"""Transfer learning: frozen backbones and stages, layer-wise lr decay, the feature cache and the k-NN probe."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.optim import param_groups_layer_decay

from fgvc import evaluate as evaluate_cli
from fgvc.build import build_training, knn_probe, load_model, use_cached_features
from fgvc.config import ConfigError, ModelConfig, load_config
from fgvc.data.cub import CUBDataset
from fgvc.engine import trainer
from fgvc.engine.loop import TrainState, evaluate, train_one_epoch
from fgvc.engine.optim import warmup_cosine
from fgvc.errors import FGVCError
from fgvc.models import FGVCModel
from fgvc.transfer import __main__ as transfer_cli
from fgvc.transfer.advise import STRATEGY_NAMES, Measurement, Thresholds, cell, table
from fgvc.transfer.features import FeatureCacheError
from fgvc.transfer.knn import knn_accuracy, knn_scores
from tests.test_training import scratch_preset, tiny_overrides

# A deterministic training transform (no flip, no jitter, the crop as large as the resize) equals the evaluation
# transform, so an uncached probe sees exactly the images its cache is made of.
NO_AUGMENTATION = ["data.hflip=0", "data.color_jitter=0", "data.resize_size=32", "model.drop_rate=0"]


def backbone_state(model: FGVCModel) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.backbone.state_dict().items()}


def train_checking_modes(setup, epochs: int = 2) -> int:
    """Train `epochs` epochs with a validation pass between them, asserting at every optimizer step that each
    frozen module is in eval mode and each trainable one in train mode; the number of steps checked."""
    frozen = setup.model.backbone.frozen_modules
    trainable = [m for m in setup.model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert frozen, "nothing was frozen"
    steps = []

    def check(state: TrainState, stats) -> bool:
        assert all(not module.training for module in frozen for module in module.modules())
        assert all(module.training for module in trainable)
        steps.append(state.step)
        return False

    state = TrainState()
    for epoch in range(epochs):
        setup.train_loader.set_epoch(epoch)
        state.epoch = epoch
        train_one_epoch(setup.model, setup.criterion, setup.optimization, setup.train_loader, setup.runtime, state,
                        after_step=check)
        state.batch = 0
        evaluate(setup.model, setup.val_loader, setup.runtime, num_classes=len(setup.classes))  # switches modes
    return len(steps)


def test_linear_probe_keeps_the_backbone_bitwise_and_in_eval_mode(small_birds: Path, tmp_path: Path) -> None:
    cfg = scratch_preset([*tiny_overrides(small_birds, tmp_path, "probe"), "transfer.mode=linear_probe",
                          "transfer.cache_features=false", "data.val_fraction=0.3"])
    setup = build_training(cfg)
    before, head_before = backbone_state(setup.model), setup.model.head.fc.weight.detach().clone()
    assert any("running_mean" in name for name in before)  # BatchNorm statistics are among what must stay
    assert train_checking_modes(setup) > 0
    for name, value in setup.model.backbone.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(setup.model.head.fc.weight, head_before)  # the head did train


@pytest.mark.parametrize(("backbone", "extra", "trainable_stages"), [
    ("test_resnet", [], 2), ("test_vit", ["data.image_size=32", "model.output_stride=null"], 3)])
def test_top_stages_train_and_the_rest_stay_frozen(small_birds: Path, tmp_path: Path, backbone: str,
                                                   extra: list[str], trainable_stages: int) -> None:
    cfg = scratch_preset([*tiny_overrides(small_birds, tmp_path, "top"), f"model.backbone={backbone}", *extra,
                          "transfer.mode=top", f"transfer.trainable_stages={trainable_stages}", "data.val_fraction=0.3",
                          "optim.weight_decay=0.5"])
    setup = build_training(cfg)
    stages = setup.model.backbone.stages()
    frozen_ids = {id(p) for stage in stages[:-trainable_stages] for p in stage}
    names = {id(p): name for name, p in setup.model.backbone.named_parameters()}
    before = backbone_state(setup.model)
    train_checking_modes(setup)
    after = setup.model.backbone.state_dict()
    for parameter_id, name in names.items():
        assert torch.equal(after[name], before[name]) == (parameter_id in frozen_ids), name
    for name in before:  # buffers: BatchNorm statistics of frozen stages unchanged
        owner = name.rsplit(".", 1)[0]
        if name.endswith("running_mean") and all(id(p) in frozen_ids for n, p in setup.model.backbone.named_parameters()
                                                 if n.startswith(owner + ".")):
            assert torch.equal(after[name], before[name]), name


def layer_lrs_over_steps(cfg, steps: list[int]) -> tuple[list[dict], dict[int, list[float]]]:
    setup = build_training(cfg)
    optimization = setup.optimization
    lrs = {}
    for step in range(max(steps) + 1):
        if step in steps:
            lrs[step] = [group["lr"] for group in optimization.optimizer.param_groups]
        optimization.optimizer.step()
        optimization.scheduler.step()
    return setup, lrs


@pytest.mark.parametrize(("backbone", "extra"), [("test_resnet", ["model.output_stride=null"]),
                                                 ("test_vit", ["data.image_size=32", "model.output_stride=null"])])
def test_layer_decay_reaches_every_step_of_the_schedule(small_birds: Path, tmp_path: Path, backbone: str,
                                                        extra: list[str]) -> None:
    decay, lr = 0.6, 0.01
    cfg = scratch_preset([*tiny_overrides(small_birds, tmp_path, "decay"), f"model.backbone={backbone}", *extra,
                          f"optim.layer_decay={decay}", f"optim.lr={lr}", "optim.head_lr_mult=3",
                          "schedule.warmup_epochs=1"])
    steps = [0, 2, 5, 9]
    setup, lrs = layer_lrs_over_steps(cfg, steps)
    per_epoch = setup.train_loader.batches_per_epoch
    groups = setup.optimization.optimizer.param_groups
    layers = setup.model.backbone.layers()
    depth_of = {id(p): depth for depth, layer in enumerate(layers) for p in layer}
    head_ids = {id(p) for p in setup.model.head.parameters()}
    # The oracle: timm's own layer-decay scales on the whole timm model (its classifier is the new layer).
    reference = timm.create_model(backbone, num_classes=3, **({"img_size": 32} if backbone == "test_vit" else {}))
    names = {id(p): n for n, p in reference.named_parameters()}
    timm_scale = {names[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(reference, layer_decay=decay)
                  for p in g["params"]}
    ours = {id(p): n.removeprefix("model.") for n, p in setup.model.backbone.named_parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if ids <= head_ids:
            expected = 3.0
        else:
            (depth,) = {depth_of[i] for i in ids}
            expected = decay ** (len(layers) - depth)
            assert all(timm_scale[ours[i]] == pytest.approx(expected) for i in ids)
            assert group["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in group["params"]) else 0.05)
        for step in steps:
            schedule = warmup_cosine(step, warmup_steps=per_epoch, total_steps=2 * per_epoch, min_ratio=0.0)
            assert lrs[step][groups.index(group)] == pytest.approx(lr * schedule * expected, rel=1e-12)
    assert len(groups) > 4 and {id(p) for g in groups for p in g["params"]} == {id(p) for p in
                                                                                setup.model.parameters()}


def probe_head(root: Path, output: Path, name: str, cache: bool, extra: tuple = ()) -> dict:
    cfg = scratch_preset([*tiny_overrides(root, output, name), *NO_AUGMENTATION, "transfer.mode=linear_probe",
                          f"transfer.cache_features={str(cache).lower()}", "transfer.cache_dtype=float32", *extra])
    result = trainer.train(cfg)
    return {k: v for k, v in trainer.load_checkpoint(result.run_dir / "last.pt")["model"].items()
            if k.startswith("head.")}, result


@pytest.mark.parametrize("unreadable", [False, True])
def test_the_cached_probe_trains_the_same_head_as_the_uncached_one(small_birds: Path, birds_copy: Path,
                                                                    tmp_path: Path, unreadable: bool, capsys) -> None:
    """Also with an unreadable training image: left out of its batch in both, so batches, steps and schedule are
    the same."""
    root, extra = small_birds, ()
    if unreadable:
        root, extra = birds_copy, ("data.max_bad_fraction=0.1",)
        Path(CUBDataset(birds_copy, "train").image_path(3)).write_bytes(b"not a JPEG")
    cached, cached_run = probe_head(root, tmp_path, "cached", True, extra)
    uncached, uncached_run = probe_head(root, tmp_path, "uncached", False, extra)
    assert ("unreadable train image" in capsys.readouterr().out) == unreadable
    for name in cached:
        torch.testing.assert_close(cached[name], uncached[name], rtol=1e-5, atol=1e-6)
    assert cached_run.val["top1"] == uncached_run.val["top1"]
    assert cached_run.test == uncached_run.test  # the test split runs the whole model on images


def test_a_file_cache_is_kept_in_the_run_folder_and_reused_on_resume(small_birds: Path, tmp_path: Path) -> None:
    cfg = scratch_preset([*tiny_overrides(small_birds, tmp_path, "file"), *NO_AUGMENTATION,
                          "transfer.mode=linear_probe", "transfer.cache_location=file"])
    first = trainer.train(cfg, stop_after_steps=2)
    cache_file = first.run_dir / "features" / "train.safetensors"
    written = cache_file.stat().st_mtime_ns
    resumed = trainer.train(load_config(first.run_dir / trainer.CONFIG_FILE), resume_dir=first.run_dir)
    assert resumed.completed and cache_file.stat().st_mtime_ns == written
    whole, _ = probe_head(small_birds, tmp_path, "whole", True, ("transfer.cache_dtype=float16",))
    final = trainer.load_checkpoint(resumed.run_dir / "last.pt")["model"]
    for name in whole:
        assert torch.equal(final[name], whole[name]), name  # fp16 cache, memory or file, resumed or not
    cache_file.write_bytes(b"not a safetensors file")
    setup = build_training(load_config(first.run_dir / trainer.CONFIG_FILE))
    with pytest.raises(FeatureCacheError, match="train.safetensors is damaged"):
        use_cached_features(setup, first.run_dir)


def test_a_cache_over_its_memory_budget_is_refused_before_the_backbone_runs(small_birds: Path,
                                                                          tmp_path: Path) -> None:
    cfg = scratch_preset([*tiny_overrides(small_birds, tmp_path, "big"), "transfer.mode=linear_probe",
                          "model.head=isqrt", "transfer.cache_max_gib=0.00001"])
    setup = build_training(cfg)
    with pytest.raises(FeatureCacheError, match=r"train feature cache would take 0.0 MiB \(30 images x 96 x 2 x 2 "
                                                 r"float16\), more than transfer.cache_max_gib=1e-05 GiB"):
        use_cached_features(setup)


@pytest.mark.parametrize(("overrides", "message"), [
    (["transfer.mode=partial"], "transfer.mode: 'partial' is unknown; choose one of full, linear_probe, top"),
    (["transfer.mode=top"], "transfer.trainable_stages: set it"),
    (["transfer.trainable_stages=2"], "transfer.trainable_stages: set it"),
    (["transfer.mode=top", "transfer.trainable_stages=9"], "trainable_stages: 9 is not between 1 and the 5 stages"),
    (["transfer.mode=top", "transfer.trainable_stages=0"], "transfer.trainable_stages must be null or at least 1"),
    (["transfer.mode=linear_probe", "optim.layer_decay=0.7"], "optim.layer_decay: transfer.mode=linear_probe"),
    (["optim.layer_decay=1.5"], "optim.layer_decay must be null or in"),
    (["transfer.cache_features=true"], "transfer.cache_features: features can be cached only when"),
    (["transfer.mode=linear_probe", "model.head=wsdan"], "the wsdan head's training passes run the backbone"),
    (["transfer.mode=linear_probe", "regularization.mixup_alpha=0.2"], "mixup, cutmix and snapmix mix images"),
    (["transfer.mode=linear_probe", "transfer.cache_dtype=int8"], "transfer.cache_dtype: 'int8' is unknown"),
])
def test_bad_transfer_settings_are_clear_errors(small_birds: Path, tmp_path: Path, overrides: list[str],
                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_training(scratch_preset([*tiny_overrides(small_birds, tmp_path, "bad"), *overrides]))


def test_a_linear_probe_of_random_features_is_a_warning(small_birds: Path, tmp_path: Path, capsys) -> None:
    build_training(scratch_preset([*tiny_overrides(small_birds, tmp_path, "warn"), "transfer.mode=linear_probe"]))
    assert "warning: transfer.mode=linear_probe with no pretrained weights (model.pretrained, pretrained_file or " \
           "pretrained_package): the probe measures random features" in capsys.readouterr().out


def test_features_only_backbones_know_their_stages() -> None:
    """A features_only model (model.feature_stage) has no group_matcher of its own; its stages come from the
    whole architecture's and cover exactly the layers that were built."""
    from fgvc.build import build_model
    model = build_model(ModelConfig(backbone="test_resnet", feature_stage=3), num_classes=3)
    stages = model.backbone.stages()
    assert len(stages) == 4 and sum(map(len, stages)) == len(list(model.backbone.parameters()))
    model.freeze_backbone(1)
    assert {id(p) for p in model.backbone.parameters() if p.requires_grad} == {id(p) for p in stages[-1]}
    # A wrapper that renames its layers cannot be split by the whole model's patterns: refused, not lumped together.
    renamed = build_model(ModelConfig(backbone="convnext_atto", feature_stage=2), num_classes=3)
    with pytest.raises(FGVCError, match="cannot be told apart .* need model.feature_stage=null"):
        renamed.freeze_backbone(1)
    renamed.freeze_backbone(0)  # a linear probe needs no stages
    assert not any(p.requires_grad for p in renamed.backbone.parameters())


def brute_force_knn(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, temperature: float,
                    num_classes: int) -> np.ndarray:
    """DINO's weighted k-NN in float64, one query at a time; ties: the earlier training row is nearer."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    scores = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        similarity = train @ (query / np.linalg.norm(query))
        nearest = sorted(range(len(train)), key=lambda i: (-similarity[i], i))[:k]
        for i in nearest:
            scores[q, labels[i]] += np.exp(similarity[i] / temperature)
    return scores


def test_knn_equals_a_float64_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    # Duplicated training rows with other labels tie exactly, for the k-th place and, as a query's only
    # neighbours, for the class vote (the lower class wins); queries equal to training rows hit similarity 1.
    train = rng.normal(size=(60, 6))
    train[30:45] = train[:15]
    labels = rng.integers(0, 5, size=60)
    labels[30:45] = (labels[:15] + 1 + rng.integers(0, 4, size=15)) % 5
    queries = np.concatenate([rng.normal(size=(20, 6)), train[:10]])
    query_labels = rng.integers(0, 5, size=30)
    for k, temperature in ((1, 0.07), (2, 0.07), (7, 0.07), (20, 0.5), (100, 0.07)):
        expected = brute_force_knn(train, labels, queries, k, temperature, 5)
        scores = knn_scores(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(queries),
                            num_classes=5, k=k, temperature=temperature, chunk_size=8)
        torch.testing.assert_close(scores, torch.from_numpy(expected), rtol=1e-6, atol=1e-9)
        accuracy = knn_accuracy(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(queries),
                                torch.from_numpy(query_labels), num_classes=5, k=k, temperature=temperature)
        assert accuracy["top1"] == pytest.approx(100 * np.mean(expected.argmax(1) == query_labels))
    tied = knn_scores(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(train[:15]), num_classes=5,
                      k=2, temperature=0.07)
    assert torch.equal(tied.argmax(1), torch.from_numpy(np.minimum(labels[:15], labels[30:45])))


@pytest.mark.parametrize(("recipe", "trainable", "layers"), [
    ("cub200/linear_probe_resnet50", 0, None), ("cub200/top_resnet50", 2, None),
    ("cars196/vit_small_layer_decay", None, 13)])
def test_the_transfer_recipes_build_what_they_say(recipe: str, trainable: int | None, layers: int | None) -> None:
    """Each recipe's backbone (without its weights) takes its transfer settings: the probe freezes all of ResNet-50,
    the top recipe leaves layer3 and layer4 training, the ViT's layer decay spans patch embedding + 12 blocks."""
    from fgvc.build import apply_transfer, build_model, optimizer_roles
    cfg = load_config(recipe)
    model = build_model(dataclasses.replace(cfg.model, pretrained=False), 10, image_size=cfg.data.image_size)
    apply_transfer(cfg, model)
    trainable_names = {name.split(".")[1] for name, p in model.backbone.named_parameters() if p.requires_grad}
    if trainable == 0:
        assert not trainable_names
    elif trainable == 2:
        assert trainable_names == {"layer3", "layer4"}
    roles, scales = optimizer_roles(cfg.optim, model)
    if layers is not None:
        assert len(scales) == layers and min(scales.values()) == pytest.approx(0.75 ** layers)


@pytest.mark.parametrize(("images_per_class", "gain", "expected"), [
    (30, 60.0, ("small", "similar")), (30, 5.0, ("small", "different")),
    (200, 60.0, ("large", "similar")), (200, 5.0, ("large", "different")),
    (50, 55.0, ("large", "similar")), (49.9, 54.9, ("small", "different"))])  # the thresholds themselves
def test_the_advisor_picks_each_cell(images_per_class: float, gain: float, expected: tuple[str, str]) -> None:
    measurement = Measurement(images_per_class, pretrained_knn=20.0 + gain, random_knn=20.0)
    assert cell(measurement) == expected
    marked = [line for line in table(measurement).splitlines() if "[x] " in line]
    assert len(marked) == 1 and marked[0].startswith(expected[0])
    assert STRATEGY_NAMES[expected] in marked[0].split("[x] ")[1]
    assert cell(measurement, Thresholds(small_below=10, similar_gain=100)) == ("large", "different")


def backbone_file(path: Path) -> Path:
    """A test_resnet backbone's weights under timm's names, as model.pretrained_file takes them."""
    from fgvc.build import build_model
    model = build_model(ModelConfig(backbone="test_resnet"), num_classes=3)
    save_file({name.removeprefix("backbone.model."): value.contiguous() for name, value in model.state_dict().items()
               if name.startswith("backbone.model.")}, path)
    return path


def test_advise_measures_writes_a_recipe_that_trains(small_birds: Path, tmp_path: Path, capsys) -> None:
    weights = backbone_file(tmp_path / "weights.safetensors")
    out = tmp_path / "advice.yaml"
    args = ["advise", "--dataset", "synthbirds", "--data-dir", str(small_birds), "--model", "test_resnet",
            "--pretrained-file", str(weights), "--out", str(out), "--similar-gain", "-1000", "data.image_size=32",
            "data.workers=0", "data.val_fraction=0.3", "data.synthbirds.difficulty=0.3"]
    assert transfer_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "measured cell: small + similar -> feature extraction (linear probe)" in printed
    assert re.search(r"k-NN top-1 \d+\.\d% with the pretrained features, \d+\.\d% at random init", printed)
    cfg = load_config(out, [f"output_dir={tmp_path}", "data.workers=0", "schedule.epochs=1", "data.batch_size=8"])
    assert (cfg.transfer.mode, cfg.model.pretrained_file, cfg.data.image_size) == ("linear_probe", str(weights), 32)
    assert (cfg.data.val_fraction, cfg.data.synthbirds.difficulty) == (0.3, 0.3)  # every key=value measured
    assert trainer.train(cfg).completed
    assert transfer_cli.main(args) == 2 and "exists" in capsys.readouterr().err  # never overwritten silently
    # The recommendation laid over what was measured must train: a linear probe cannot cache under mixup.
    mixing = tmp_path / "mixing.yaml"
    mixing_args = [str(mixing) if arg == str(out) else arg for arg in args]
    assert transfer_cli.main([*mixing_args, "regularization.mixup_alpha=0.2"]) == 2
    assert "mixup, cutmix and snapmix mix images" in capsys.readouterr().err and not mixing.exists()


def test_evaluate_knn_of_a_checkpoint_and_of_a_backbone(small_birds: Path, tmp_path: Path, capsys) -> None:
    result = trainer.train(scratch_preset([*tiny_overrides(small_birds, tmp_path, "knn"), "data.val_fraction=0.3"]))
    checkpoint = result.run_dir / "best.pt"
    assert evaluate_cli.main(["--knn", "--checkpoint", str(checkpoint), "--split", "val", "--k", "5",
                              "--output", str(tmp_path / "knn.json")]) == 0
    assert "weighted k-NN (k=5, T=0.07)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "knn.json").read_text())
    # The oracle: the same backbone's pooled features through knn_accuracy directly.
    loaded = load_model(checkpoint)
    expected = knn_probe(loaded.config, loaded.model.backbone, loaded.runtime, split="val", k=5)
    assert saved["top1"] == expected["top1"] and saved["split"] == "val"
    weights = backbone_file(tmp_path / "weights.safetensors")
    assert evaluate_cli.main(["--knn", "--model", "test_resnet", "--pretrained-file", str(weights), "--dataset",
                              "synthbirds", "--data-dir", str(small_birds), "--split", "test",
                              "data.image_size=32", "data.workers=0"]) == 0
    assert f"test_resnet ({weights})" in capsys.readouterr().out
    assert evaluate_cli.main(["--knn", "--checkpoint", str(checkpoint), "--model", "resnet50"]) == 2
    assert evaluate_cli.main(["--knn", "--checkpoint", str(checkpoint), "--tta", "flip"]) == 2
    assert evaluate_cli.main(["--checkpoint", str(checkpoint), "--k", "5"]) == 2
    assert "--knn: --k does not apply without --knn" in capsys.readouterr().err
    assert evaluate_cli.main(["--split", "val"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
