"""DINO and MAE through the engine: a few steps lower their losses, DINO resumes bitwise (centre, teacher and the
temperature schedule's step included), local crops are cut from the parts, the backbone file is a plain ViT's,
fgvc.visualize shows and measures where the ViT looks and draws MAE's reconstructions, the CLI picks each method's
recipe, and bad input gets one clear error. (The losses, masking, crops and attention against their formulas:
tests/test_ssl_vit_units.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fgvc
from fgvc import evaluate as evaluate_cli
from fgvc import pretrain as pretrain_cli
from fgvc import visualize as visualize_cli
from fgvc.build import attention_metrics, build_method, build_pretraining, check_pretraining
from fgvc.config import load_config, load_run_config
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.loop import Runtime
from fgvc.engine.pretraining import BACKBONE_FILE, pretrain
from tests.test_ssl import assert_same_backbone, assert_steps_lower_the_loss, make_unlabeled
from tests.test_training import assert_bitwise_equal

# 32 px global crops of 8 px patches (4 x 4), 16 px local ones, small heads.
SMALL_HEADS = ("ssl.dino.out_dim=32", "ssl.dino.hidden_dim=16", "ssl.dino.bottleneck_dim=8",
               "ssl.mae.decoder_dim=16", "ssl.mae.decoder_depth=1", "ssl.mae.decoder_heads=2")


def vit_overrides(root: Path, output: Path, name: str, *extra: str) -> list[str]:
    """30 training images at 32 px, batch 8 (3 steps an epoch), 2 epochs, no monitor."""
    return [f"data.root={root}", "data.image_size=32", "data.batch_size=8", "data.workers=0", f"output_dir={output}",
            f"run_name={name}", "schedule.epochs=2", "schedule.warmup_epochs=0.5", "train.log_every=1",
            "train.threads=1", "ssl.monitor=false", *SMALL_HEADS, *extra]


def vit_config(root: Path, output: Path, name: str, method: str, *extra: str):
    crops = ("ssl.local_crops=2", "ssl.local_size=16") if method == "dino" else ()
    return load_config(f"synthbirds/pretrain_{method}", vit_overrides(root, output, name, *crops, *extra))


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_a_few_steps_lower_the_loss_on_a_tiny_vit(small_birds: Path, tmp_path: Path, method: str) -> None:
    """DINO's teacher and centre are held (EMA coefficients 1), so the student learns to match fixed targets; MAE's
    mask is the same each time."""
    held = ("ssl.dino.momentum=1", "ssl.dino.center_momentum=1", "ssl.dino.freeze_last_layer=0")
    cfg = vit_config(small_birds, tmp_path, "steps", method, "train.channels_last=false", *held)
    torch.manual_seed(0)
    model = build_method(cfg, check_pretraining(cfg), total_steps=10, steps_per_epoch=10)
    views = ([torch.randn(8, 3, 32, 32)] if method == "mae"
             else [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(2)])
    assert_steps_lower_the_loss(model, views)


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_pretraining_resumes_bitwise(small_birds: Path, tmp_path: Path, method: str) -> None:
    """DINO with its centre, teacher, temperature schedule and part-centred crops; MAE with its masks."""
    extra = (("ssl.local_crops_on_parts=true", "ssl.dino.warmup_teacher_temp_epochs=2", "ssl.dino.teacher_temp=0.07")
             if method == "dino" else ())
    whole = pretrain(vit_config(small_birds, tmp_path, "whole", method, *extra))
    first = pretrain(vit_config(small_birds, tmp_path, "resumed", method, *extra), stop_after_steps=4)  # epoch 2
    assert whole.completed and not first.completed
    resumed = pretrain(load_run_config(first.run_dir / "config.yaml"), resume_dir=first.run_dir)
    assert resumed.completed
    expected, got = (load_checkpoint(run.run_dir / "last.pt")["model"] for run in (whole, resumed))
    assert_bitwise_equal(expected, got)
    if method == "dino":
        assert got["center"].abs().sum() > 0 and int(got["steps_done"]) == 6
        assert {key.split(".")[0] for key in got} >= {"teacher_backbone", "teacher_head", "head", "backbone"}
    assert len({(run.run_dir / BACKBONE_FILE).read_bytes() for run in (whole, resumed)}) == 1


def test_dino_and_mae_cut_their_crops_as_asked(small_birds: Path, tmp_path: Path) -> None:
    dino = build_pretraining(vit_config(small_birds, tmp_path, "crops", "dino", "ssl.local_crops_on_parts=true"))
    views = next(iter(dino.train_loader))["views"]
    assert [tuple(view.shape) for view in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert dino.optimization.clip_grad == 3.0 and dino.optimization.clip_mode == "parameter"  # the recipe's
    local = dino.train_loader.loader.dataset.transform.local
    assert local.on_parts and local.size == 16 and local.count == 2
    mae = build_pretraining(vit_config(small_birds, tmp_path, "masked", "mae"))
    assert [tuple(view.shape) for view in next(iter(mae.train_loader))["views"]] == [(8, 3, 32, 32)]


def test_the_dino_backbone_file_is_the_teachers_as_a_plain_vit(small_birds: Path, tmp_path: Path) -> None:
    """Trained with position embeddings resampled to every crop's grid (even where the ViT asked for a fixed size),
    handed on as the teacher's weights, which a fixed-size ViT at 32 px loads."""
    fixed = {"patch_size": 8, "dynamic_img_size": False}
    cfg = vit_config(small_birds, tmp_path, "handoff", "dino", "schedule.epochs=1",
                     "model.backbone_args.dynamic_img_size=false")
    method = build_method(cfg, check_pretraining(cfg), total_steps=3, steps_per_epoch=3)
    assert method.backbone(torch.randn(1, 3, 16, 16)).shape[-2:] == (2, 2)  # a local crop's grid
    result = pretrain(cfg)
    model = fgvc.create_model("linear", backbone="test_vit", num_classes=3, image_size=32, backbone_args=fixed,
                              pretrained_file=str(result.run_dir / BACKBONE_FILE))
    assert model.backbone.refuses_size(16, 16) is not None
    assert_same_backbone(result.run_dir, model, prefix="teacher_backbone.")


def test_visualize_shows_and_measures_attention_and_draws_mae_reconstructions(
        small_birds: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dino = pretrain(vit_config(small_birds, tmp_path, "dino", "dino", "schedule.epochs=1"))
    checkpoint = str(dino.run_dir / "last.pt")
    assert visualize_cli.main(["--checkpoint", checkpoint, "--indices", "0", "3", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == ["attention-test-00000.png",
                                                                        "attention-test-00003.png"]
    cfg = load_run_config(dino.run_dir / "config.yaml")
    backbone = fgvc.build.load_pretraining(checkpoint, device="cpu").method.teacher_backbone  # what DINO evaluates
    metrics = attention_metrics(cfg, backbone, Runtime(torch.device("cpu")))
    assert set(metrics) == {"peak_in_box", "peak_on_part"}
    assert (f"test split, class-token attention peak in the object box {metrics['peak_in_box']:.1f}%, on a "
            f"discriminative part {metrics['peak_on_part']:.1f}%") in out
    assert visualize_cli.main(["--checkpoint", checkpoint, "--mae"]) == 2
    assert f"--mae: {checkpoint} pretrained dino, not mae" in capsys.readouterr().err
    assert evaluate_cli.main(["--checkpoint", checkpoint]) == 2
    assert "is a checkpoint of python -m fgvc.pretrain, which has no classifier" in capsys.readouterr().err

    mae = pretrain(vit_config(small_birds, tmp_path, "mae", "mae", "schedule.epochs=1"))
    assert visualize_cli.main(["--checkpoint", str(mae.run_dir / "last.pt"), "--mae", "--count", "3",
                               "--out", str(tmp_path / "m")]) == 0
    assert [path.name for path in (tmp_path / "m").iterdir()] == ["mae-test.png"]


def test_visualize_draws_attention_on_data_without_boxes_and_says_it_measures_none(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_unlabeled(tmp_path / "photos")
    cfg = vit_config(root, tmp_path, "plain", "dino", "data.dataset=unlabeled", "schedule.epochs=1",
                     "data.batch_size=4")
    run = pretrain(cfg)
    assert visualize_cli.main(["--checkpoint", str(run.run_dir / "last.pt"), "--split", "train", "--indices", "1",
                               "--out", str(tmp_path / "a")]) == 0
    assert "unlabeled has no object boxes or part keypoints: no localization metrics" in capsys.readouterr().out
    assert [path.name for path in (tmp_path / "a").iterdir()] == ["attention-train-00001.png"]
    assert visualize_cli.main(["--checkpoint", str(run.run_dir / "last.pt"), "--split", "val"]) == 2
    assert "unlabeled images have no val split (only train, all of them)" in capsys.readouterr().err


def test_two_ranks_pretrain_dino_with_one_centre(small_birds: Path, tmp_path: Path) -> None:
    """The centre is the mean over every rank's teacher outputs: a collective in every forward."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "fgvc.pretrain", "--config", "synthbirds/pretrain_dino",
               *vit_overrides(small_birds, tmp_path, "ranks", "ssl.local_crops=2", "ssl.local_size=16",
                              "schedule.epochs=1")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    state = load_checkpoint(tmp_path / "ranks" / "last.pt")["model"]
    assert int(state["steps_done"]) == 3 and state["center"].abs().sum() > 0
    assert (tmp_path / "ranks" / BACKBONE_FILE).is_file()


def test_the_cli_picks_each_vit_methods_recipe(capsys: pytest.CaptureFixture) -> None:
    for method, key in (("dino", "local_crops: 4"), ("mae", "decoder_dim: 64")):
        assert pretrain_cli.main(["--method", method, "--print-config"]) == 0
        printed = capsys.readouterr().out
        assert "backbone: test_vit" in printed and f"method: {method}" in printed and key in printed
    assert pretrain_cli.main(["--method", "byol", "--print-config"]) == 0
    assert "backbone: test_resnet" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "dino", "ssl.local_size=12"],
     "ssl.local_size: 12 px crops cannot be cut into the 8 px patches of test_vit; use a multiple of 8"),
    (["--method", "dino", "data.image_size=36"],
     "data.image_size: 36 px crops cannot be cut into the 8 px patches of test_vit"),
    (["--method", "simclr", "ssl.local_crops=2"], "ssl.local_crops: simclr takes no local crops; multi-crop is "
                                                  "DINO's"),
    (["--method", "mae", "ssl.local_crops_on_parts=true"], "ssl.local_crops_on_parts: there are no local crops"),
    (["--config", "synthbirds/pretrain_dino", "ssl.local_crops_on_parts=true", "--dataset", "unlabeled"],
     "ssl.local_crops_on_parts: unlabeled has no part keypoints"),
    (["--method", "dino", "ssl.part_jitter=0.5"], "ssl.part_jitter must be in [0, 0.5)"),
    (["--method", "mae", "ssl.mae.mask_ratio=1"], "ssl.mae.mask_ratio must be in (0, 1), got 1"),
    (["--method", "mae", "ssl.mae.decoder_heads=3"],
     "ssl.mae.decoder_heads: 3 heads do not divide the decoder's width"),
    (["--method", "dino", "optim.clip_mode=value"], "optim.clip_mode: 'value' is unknown; choose one of norm, "
                                                    "parameter"),
])
def test_bad_input_is_one_clear_line(small_birds: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     args: list[str], message: str) -> None:
    root = make_unlabeled(tmp_path / "photos") if "unlabeled" in args else small_birds
    assert pretrain_cli.main([*args, "--data-dir", str(root), "data.workers=0", "data.batch_size=8",
                              f"output_dir={tmp_path}", "run_name=bad"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
