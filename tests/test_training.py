"""The training spine: exact resume, learning, offline weights, the CLIs and the run folder."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from fgvc import evaluate as evaluate_cli
from fgvc import train as train_cli
from fgvc.build import build_model
from fgvc.config import ConfigError, ModelConfig, load_config, to_yaml
from fgvc.data.synthbirds import SynthBirdsSpec, generate
from fgvc.engine import trainer
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.loop import Optimization, Runtime, TrainState, train_one_epoch
from fgvc.engine.optim import build_optimizer, build_scheduler, parameter_groups, warmup_cosine
from fgvc.errors import OptionError
from fgvc.losses import LabelSmoothingCrossEntropy
from fgvc.models import FGVCModel, create_backbone
from fgvc.models.heads import LinearHead

SCRATCH_PRESET = "synthbirds/scratch_isqrt.yaml"


def scratch_preset(overrides: list[str]) -> trainer.Config:
    """The from-scratch synthbirds preset with `overrides` on top, as `python -m fgvc.train --config ... key=value`
    resolves them: the tests' runs start from it (their reference weights were made with it)."""
    return load_config(SCRATCH_PRESET, overrides)


def tiny_overrides(root: Path, output: Path, name: str) -> list[str]:
    """A model and schedule small enough for a few seconds on 2 cores, with dropout so that the RNG matters."""
    return [f"data.root={root}", "data.image_size=32", "data.batch_size=8", "data.workers=0", f"output_dir={output}",
            f"run_name={name}", "model.backbone=test_resnet", "model.head=linear", "model.drop_rate=0.3",
            "schedule.epochs=2",
            "schedule.warmup_epochs=0.5", "optim.lr=0.01", "train.log_every=1", "train.threads=1"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(small_birds: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("runs")
    result = trainer.train(scratch_preset(tiny_overrides(small_birds, output, "whole")))
    assert result.completed
    return output, final_weights(result.run_dir)


def interrupted_then_resumed(root: Path, output: Path, name: str, stop_after: int, extra: tuple = ()) -> dict:
    first = trainer.train(scratch_preset([*tiny_overrides(root, output, name), *extra]), stop_after_steps=stop_after)
    assert not first.completed
    assert load_checkpoint(first.run_dir / "last.pt")["state"]["step"] == stop_after
    resumed = trainer.train(load_config(first.run_dir / trainer.CONFIG_FILE), resume_dir=first.run_dir)
    assert resumed.completed
    return final_weights(resumed.run_dir)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# 30 training images at batch 8: 3 steps an epoch. Step 2 is mid-epoch, step 3 an epoch boundary.
@pytest.mark.parametrize("stop_after", [2, 3])
def test_resume_is_bitwise_exact(small_birds: Path, uninterrupted, stop_after: int) -> None:
    output, expected = uninterrupted
    assert_bitwise_equal(interrupted_then_resumed(small_birds, output, f"stop{stop_after}", stop_after), expected)


def test_wsdan_resume_is_bitwise_exact(small_birds: Path, tmp_path: Path) -> None:
    """WS-DAN's extra passes draw maps and thresholds from the RNG and move the class centers: all restored."""
    extra = ("model.head=wsdan", "model.num_attention_maps=4")
    whole = trainer.train(scratch_preset([*tiny_overrides(small_birds, tmp_path, "whole"), *extra]))
    resumed = interrupted_then_resumed(small_birds, tmp_path, "resumed", 2, extra)
    assert_bitwise_equal(resumed, final_weights(whole.run_dir))
    assert resumed["head.centers"].abs().sum() > 0


def test_mixing_resume_is_bitwise_exact_and_mixing_changes_training(small_birds: Path, uninterrupted,
                                                                    tmp_path: Path) -> None:
    """Mixup, CutMix and SnapMix draw from the batch's position: a resumed run mixes exactly as a whole one."""
    extra = ("regularization.mixup_alpha=0.8", "regularization.cutmix_alpha=1.0", "regularization.snapmix_prob=0.5")
    whole = trainer.train(scratch_preset([*tiny_overrides(small_birds, tmp_path, "whole"), *extra]))
    resumed = interrupted_then_resumed(small_birds, tmp_path, "resumed", 2, extra)
    assert_bitwise_equal(resumed, final_weights(whole.run_dir))
    unmixed = uninterrupted[1]
    assert any(not torch.equal(resumed[k], unmixed[k]) for k in unmixed)


@pytest.mark.parametrize("forget", ["rng", "scheduler"])
def test_resume_without_rng_or_scheduler_state_differs(small_birds: Path, uninterrupted, monkeypatch,
                                                       forget: str) -> None:
    """The resume test above can fail: drop one piece of restored state and the weights come out different."""
    output, expected = uninterrupted
    if forget == "rng":
        monkeypatch.setattr(trainer, "_set_rng_state", lambda state: None)
    else:
        monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "load_state_dict", lambda self, state: None)
    weights = interrupted_then_resumed(small_birds, output, f"forget-{forget}", 2)
    assert any(not torch.equal(weights[k], expected[k]) for k in expected)


def test_run_folder_and_clis(small_birds: Path, tmp_path: Path, capsys) -> None:
    assert train_cli.main(["--config", SCRATCH_PRESET, *tiny_overrides(small_birds, tmp_path, "cli")]) == 0
    printed = capsys.readouterr().out
    run_dir = tmp_path / "cli"
    assert "test" in printed and str(run_dir) in printed
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "best.pt", "last.pt", "results.json"):
        assert (run_dir / name).is_file(), name
    assert load_config(run_dir / "config.yaml").run_name == "cli"
    assert "git_commit" in json.loads((run_dir / "meta.json").read_text())
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("epoch") == 2 and kinds[-1] == "test" and "train" in kinds
    results = json.loads((run_dir / "results.json").read_text())
    # synthbirds has boxes and parts: the test evaluation says where the model looked
    assert 0 <= results["test"]["peak_in_box"] <= 100 and 0 <= results["test"]["peak_on_part"] <= 100
    assert "attention peak in the object box" in printed
    # ... and what to run next, with this run's own path.
    assert f"python -m fgvc.evaluate --checkpoint {run_dir / 'best.pt'}" in printed
    assert f"python -m fgvc.visualize --checkpoint {run_dir / 'best.pt'}" in printed

    # evaluate on the selected checkpoint reproduces the training run's final test evaluation
    assert evaluate_cli.main(["--checkpoint", str(run_dir / "best.pt"), "--split", "test"]) == 0
    evaluated = json.loads((run_dir / "best-test.json").read_text())
    assert evaluated["top1"] == pytest.approx(results["test"]["top1"])
    assert evaluated["per_class_accuracy"] == pytest.approx(results["test"]["per_class_accuracy"])
    assert evaluated["peak_on_part"] == pytest.approx(results["test"]["peak_on_part"])

    # the same run name again is refused; --resume takes no other options
    assert train_cli.main(["--config", SCRATCH_PRESET, *tiny_overrides(small_birds, tmp_path, "cli")]) == 2
    assert train_cli.main(["--resume", str(run_dir), "--epochs", "3"]) == 2
    assert "already exists" in capsys.readouterr().err


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(small_birds: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    overrides = [*tiny_overrides(small_birds, tmp_path, "lines"), "schedule.epochs=1"]
    trainer.train(scratch_preset(overrides))
    lines = capsys.readouterr().out
    assert "epoch 1/1 [1/3] loss" in lines and "img/s" in lines  # redirected output: one line per logging step
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    trainer.train(scratch_preset([*tiny_overrides(small_birds, tmp_path, "bar"), "schedule.epochs=1"]))
    bar = terminal.getvalue()
    assert "epoch 1/1" in bar and "3/3" in bar and "step/s" in bar and "<" in bar  # steps, rate and ETA
    assert "img_s=" in bar and "loss=" in bar and "acc=" in bar
    assert "[1/3] loss" not in capsys.readouterr().out  # the bar replaces the lines


def test_generation_shows_progress_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    generate(tmp_path / "birds", SynthBirdsSpec(num_classes=2, images_per_class=3, image_size=32))
    assert "drawing synthbirds" in terminal.getvalue() and "6/6" in terminal.getvalue()


def relabel_by_body_colour(root: Path) -> None:
    """Make each image's class its bird's body colour (a nuisance attribute of synthbirds, written in its
    attributes file): a coarse task on the same images and through the same loader."""
    names = dict(line.split(" ", 1) for line in (root / "attributes/attributes.txt").read_text().splitlines())
    colour = {}
    for line in (root / "attributes/image_attribute_labels.txt").read_text().splitlines():
        image_id, attribute_id, present, *_ = line.split()
        if present == "1" and names[attribute_id].startswith("has_primary_color::"):
            colour[image_id] = names[attribute_id].split("::")[1]
    classes = sorted(set(colour.values()))
    (root / "classes.txt").write_text("".join(f"{i + 1} {i + 1:03d}.{c}\n" for i, c in enumerate(classes)))
    ids = [line.split()[0] for line in (root / "images.txt").read_text().splitlines()]
    (root / "image_class_labels.txt").write_text("".join(f"{i} {classes.index(colour[i]) + 1}\n" for i in ids))


def test_a_tiny_model_learns_within_seconds(tmp_path: Path) -> None:
    """The real fine-grained classes take a tiny network minutes (README.md's quick start figures): bill or crown
    differences of a few pixels are not found in a hundred steps. The spine's ability to learn is shown on the
    same synthbirds images relabelled by body colour, six classes."""
    root = tmp_path / "birds"
    generate(root, SynthBirdsSpec(num_classes=4, images_per_class=60, image_size=48, difficulty=0.0, seed=1,
                                  train_fraction=0.6))
    relabel_by_body_colour(root)
    overrides = tiny_overrides(root, tmp_path, "learn") + [
        "schedule.epochs=15", "data.image_size=48", "model.drop_rate=0.0", "data.batch_size=16", "optim.lr=0.01",
        "data.val_fraction=0.0", "train.threads=2", "train.log_every=1000"]
    result = trainer.train(scratch_preset(overrides))
    assert result.test["top1"] > 30.0, result.test  # chance is 1/6


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_offline_pretrained_file_loads_exactly_its_weights(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=11)  # with a classifier that must be dropped
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(99)  # a different random init, so loading has to do the work
    backbone = create_backbone("test_resnet", pretrained_file=str(path))
    loaded = backbone.model.state_dict()
    assert loaded.keys() == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(OptionError, match="pretrained_file: .*missing.pth does not exist"):
        create_backbone("test_resnet", pretrained_file=str(tmp_path / "missing.pth"))


def test_output_stride_dilates_instead_of_downsampling() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 96)
    dilated = create_backbone("test_resnet", output_stride=16)  # the quick start's stride
    native = create_backbone("test_resnet")
    assert dilated(images).shape == (2, 96, 6, 6) and native(images).shape == (2, 96, 3, 3)
    # The same weights, so the same architecture up to the strides and dilations.
    assert {k: v.shape for k, v in dilated.state_dict().items()} == {k: v.shape for k, v in native.state_dict().items()}
    # A ViT has no output_stride argument: its own patch stride is accepted, another is not.
    assert create_backbone("test_vit", output_stride=16)(torch.randn(1, 3, 160, 160)).shape[-2:] == (10, 10)
    for backbone, stride, reason in (("test_vit", 8, "its features have stride 16"),
                                     ("vgg11", 16, "refused by an assertion")):  # timm's VGG asserts it is 32
        with pytest.raises(OptionError, match=f"output_stride: {stride} is not possible for {backbone} .*{reason}"):
            create_backbone(backbone, output_stride=stride)
    with pytest.raises(OptionError, match="backbone_args: may not set output_stride: use output_stride"):
        create_backbone("test_resnet", backbone_args={"output_stride": 8})


def test_backbone_args_reach_timm_and_survive_the_saved_config(tmp_path: Path) -> None:
    cfg = scratch_preset(["model.backbone_args.stem_width=8", "model.backbone_args.channels=[16,24,24,40]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved).model.backbone_args == {"stem_width": 8, "channels": [16, 24, 24, 40]}
    built = build_model(cfg.model, 3).backbone.model
    reference = timm.create_model("test_resnet", num_classes=0, stem_width=8, channels=(16, 24, 24, 40),
                                  output_stride=16)
    shapes = {name: tensor.shape for name, tensor in built.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in reference.state_dict().items()}
    assert built.num_features == 40
    with pytest.raises(ConfigError, match="model.backbone_args: may not set num_classes"):
        build_model(ModelConfig(backbone="test_resnet", backbone_args={"num_classes": 5}), 3)
    for stride in (None, 16):
        with pytest.raises(ConfigError, match="model.backbone_args: .*not taken by test_resnet.*no_such_argument"):
            build_model(ModelConfig(backbone="test_resnet", output_stride=stride,
                                    backbone_args={"no_such_argument": 1}), 3)


def test_parameter_groups_and_schedule() -> None:
    model = build_model(ModelConfig(backbone="test_resnet"), num_classes=5)
    groups = {g["name"]: g for g in parameter_groups(model.parameter_groups(), lr=0.1, weight_decay=0.01,
                                                     head_lr_mult=10)}
    assert groups["head"]["lr"] == pytest.approx(1.0) and groups["backbone"]["lr"] == pytest.approx(0.1)
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"] + groups["head_no_decay"]["params"])
    assert groups["backbone_no_decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 0.01
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    assert {id(p) for g in groups.values() for p in g["params"]} == {id(p) for p in model.parameters()}
    schedule = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(14)]
    assert schedule[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert schedule[4] == pytest.approx(1.0) and schedule[-1] > 0.1 and schedule[-1] < 0.15
    assert all(a >= b for a, b in zip(schedule[4:], schedule[5:], strict=False))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_steps_like_the_plain_one(name: str) -> None:
    """On the CPU the optimizer uses torch's fused kernel; given the same gradients, three of its steps match the
    plain for-loop implementation (same gradients, because Adam turns rounding-level gradient differences on
    near-zero elements into lr-sized steps)."""
    models = [build_model(ModelConfig(backbone="test_resnet"), num_classes=5) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())

    def groups(model: FGVCModel) -> list[dict]:
        return parameter_groups(model.parameter_groups(), lr=0.05, weight_decay=0.01)

    fused = build_optimizer(groups(models[0]), name=name, lr=0.05, momentum=0.9)
    assert fused.defaults["fused"]
    plain_class = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
    plain_options = {} if name == "adamw" else {"momentum": 0.9}
    plain = plain_class(groups(models[1]), lr=0.05, foreach=False, **plain_options)
    initial_fc = models[0].head.fc.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for fused_param, plain_param in zip(models[0].parameters(), models[1].parameters(), strict=True):
            fused_param.grad = torch.randn(fused_param.shape, generator=generator)
            plain_param.grad = fused_param.grad.clone()
        fused.step()
        plain.step()
    for fused_param, plain_param in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused_param, plain_param, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[0].head.fc.weight, initial_fc)  # the steps did move the weights


def test_vit_tokens_become_a_feature_map() -> None:
    backbone = create_backbone("test_vit")
    features = backbone(torch.randn(2, 3, 160, 160))
    assert features.shape == (2, backbone.num_features, 10, 10)


@pytest.mark.parametrize(("backbone", "stage", "size", "expected"), [("test_resnet", 3, 96, (192, 6, 6)),
                                                                     ("test_vit", 1, 160, (64, 10, 10))])
def test_an_earlier_feature_stage_is_pooled_and_later_ones_not_built(backbone: str, stage: int, size: int,
                                                                     expected: tuple) -> None:
    torch.manual_seed(0)
    early = create_backbone(backbone, feature_stage=stage)  # each architecture's own strides
    assert early(torch.randn(2, 3, size, size)).shape == (2, *expected) and early.num_features == expected[0]
    full = create_backbone(backbone)
    assert sum(p.numel() for p in early.parameters()) < sum(p.numel() for p in full.parameters())
    model = build_model(ModelConfig(backbone=backbone, feature_stage=stage, head="isqrt", head_dim=8), 3)
    assert model(torch.randn(2, 3, size, size))["logits"].shape == (2, 3)


def test_gradient_accumulation_equals_the_large_batch() -> None:
    """Two accumulated batches of 4 make the same SGD step as one batch of 8; an epoch's last, partial group is
    averaged over the batches it has (here 3 batches, accumulation 2: groups of 2 and 1)."""
    def linear_model() -> FGVCModel:
        torch.manual_seed(0)
        return FGVCModel(torch.nn.Identity(), LinearHead(6, 3))  # 1 x 1 "feature maps"

    generator = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(4, 6, 1, 1, generator=generator, dtype=torch.float64),
                "label": torch.randint(0, 3, (4,), generator=generator)} for _ in range(3)]

    def run(loader: list[dict], grad_accum: int) -> torch.Tensor:
        model = linear_model().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = build_scheduler(optimizer, epochs=1, steps_per_epoch=2, warmup_epochs=0, base_lr=0.5, min_lr=0.5)
        train_one_epoch(model, LabelSmoothingCrossEntropy(0.1), Optimization(optimizer, scheduler, grad_accum), loader,
                        Runtime(torch.device("cpu")), TrainState())
        return model.head.fc.weight.detach()

    merged = [{key: torch.cat([batches[0][key], batches[1][key]]) for key in batches[0]}, batches[2]]
    torch.testing.assert_close(run(batches, grad_accum=2), run(merged, grad_accum=1), rtol=1e-12, atol=1e-12)
