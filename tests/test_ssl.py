"""Self-supervised pretraining through the engine: the methods learn, pretraining resumes bitwise, the backbone file
is what fgvc.train and create_model load, negatives are gathered across ranks with their gradient, and bad input
gets one clear error. (The losses, schedules, queue and views against their formulas: tests/test_ssl_units.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fgvc
from fgvc import pretrain as pretrain_cli
from fgvc import train as train_cli
from fgvc.build import build_backbone, build_method, check_pretraining
from fgvc.config import ConfigError, load_config
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.loop import Runtime
from fgvc.engine.pretraining import BACKBONE_FILE, Collapsed, CollapseGuard, pretrain
from fgvc.ssl import SSLMethod
from fgvc.ssl.losses import nt_xent
from tests.test_training import assert_bitwise_equal

GATHER_WORKER = Path(__file__).with_name("torchrun_gather.py")
METHOD_NAMES = ("simclr", "moco", "byol", "simsiam")


def ssl_overrides(root: Path, output: Path, name: str, method: str, *extra: str) -> list[str]:
    """30 training images at 32 px, batch 8 (3 steps an epoch), 2 epochs, the CPU recipe's small heads, no monitor."""
    return [f"data.root={root}", "data.image_size=32", "data.batch_size=8", "data.workers=0", f"output_dir={output}",
            f"run_name={name}", f"ssl.method={method}", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
            "train.log_every=1", "train.threads=1", "ssl.monitor=false", "ssl.moco.queue_size=20", *extra]


def pretrain_config(root: Path, output: Path, name: str, method: str, *extra: str):
    return load_config("synthbirds/pretrain", ssl_overrides(root, output, name, method, *extra))


def assert_steps_lower_the_loss(model: SSLMethod, views: list[torch.Tensor], reset=lambda: None) -> None:
    """The method's own loss on one fixed batch of views falls over 10 AdamW steps on it (the engine's hooks around
    each step); `reset` runs before every loss, with torch's seed fixed."""
    optimizer = torch.optim.AdamW([p for group in model.parameter_groups().values() for p in group], lr=1e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)
        reset()
        return model.training_step({"views": views})[1]["loss"]

    model.train()
    before = loss().item()
    for step in range(10):
        optimizer.zero_grad()
        loss().backward()
        model.before_optimizer_step(step)
        optimizer.step()
        model.after_optimizer_step(step)
    assert loss().item() < before - 1e-3, (before, loss().item())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_few_steps_lower_the_loss_on_a_tiny_model(small_birds: Path, tmp_path: Path, method: str) -> None:
    cfg = pretrain_config(small_birds, tmp_path, "steps", method, "train.channels_last=false")
    torch.manual_seed(0)
    model = build_method(cfg, check_pretraining(cfg), total_steps=10, steps_per_epoch=5)
    queue = {name: value.clone() for name, value in model.state_dict().items() if name.startswith("queue.")}
    # MoCo: the same key shuffle and the same queue each time (each step would queue this batch's keys again, until
    # its negatives were its positives).
    assert_steps_lower_the_loss(model, [torch.randn(8, 3, 32, 32) for _ in range(2)],
                                lambda: model.load_state_dict(queue, strict=False))


def run_pretraining(root: Path, output: Path, name: str, method: str, *, stop_after: int | None = None, extra=()):
    return pretrain(pretrain_config(root, output, name, method, *extra), stop_after_steps=stop_after)


@pytest.mark.parametrize("method", ["moco", "byol"])  # a queue, and a momentum target on its cosine schedule
def test_pretraining_resumes_bitwise(small_birds: Path, tmp_path: Path, method: str) -> None:
    whole = run_pretraining(small_birds, tmp_path, "whole", method)
    assert whole.completed
    first = run_pretraining(small_birds, tmp_path, "resumed", method, stop_after=4)  # mid-epoch 2
    assert not first.completed
    resumed = pretrain(fgvc.config.load_run_config(first.run_dir / "config.yaml"), resume_dir=first.run_dir)
    assert resumed.completed
    expected, got = (load_checkpoint(run.run_dir / "last.pt")["model"] for run in (whole, resumed))
    assert_bitwise_equal(expected, got)
    assert "queue.keys" in got if method == "moco" else any(key.startswith("target_backbone.") for key in got)
    weights = (run.run_dir / BACKBONE_FILE for run in (whole, resumed))
    assert len({file.read_bytes() for file in weights}) == 1


def assert_same_backbone(run_dir: Path, model: fgvc.FGVCModel, prefix: str = "backbone.") -> None:
    """`model`'s backbone computes what the pretraining run's last checkpoint's backbone under `prefix` (the online
    one by default) computes, at 32 px."""
    state = load_checkpoint(run_dir / "last.pt")["model"]
    backbone = build_backbone(fgvc.config.load_run_config(run_dir / "config.yaml").model, image_size=32)
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    images = torch.randn(2, 3, 32, 32)
    backbone.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model.backbone(images), backbone(images))


def test_the_backbone_file_loads_into_create_model_with_the_same_outputs(small_birds: Path, tmp_path: Path) -> None:
    result = run_pretraining(small_birds, tmp_path, "handoff", "simclr", extra=("schedule.epochs=1",))
    assert_same_backbone(result.run_dir, fgvc.create_model("isqrt", backbone="test_resnet", num_classes=3,
                                                           pretrained_file=str(result.run_dir / BACKBONE_FILE)))


def test_fgvc_train_starts_from_the_backbone_file_and_refuses_to_resume_a_pretraining_run(
        small_birds: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = run_pretraining(small_birds, tmp_path, "pre", "byol", extra=("schedule.epochs=1",))
    file = result.run_dir / BACKBONE_FILE
    status = train_cli.main(["--config", "synthbirds/scratch_isqrt", f"data.root={small_birds}", "data.image_size=32",
                             "data.batch_size=8", "data.workers=0", f"output_dir={tmp_path}", "run_name=fine",
                             "model.output_stride=null", "schedule.epochs=1", f"model.pretrained_file={file}",
                             "transfer.mode=linear_probe", "model.head=linear"])
    assert status == 0
    assert train_cli.main(["--resume", str(result.run_dir)]) == 2
    assert f"is a run of fgvc.pretrain; continue it with: python -m fgvc.pretrain --resume {result.run_dir}" in \
        capsys.readouterr().err


def test_the_cli_logs_the_embedding_std_monitors_and_evaluates(small_birds: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    args = [*ssl_overrides(small_birds, tmp_path, "cli", "simsiam", "ssl.monitor=true", "ssl.probe_epochs=2"),
            "--eval", "linear", "--eval", "knn"]
    assert pretrain_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "val k-NN top-1" in out and "linear probe test top-1" in out and "k-NN (k 20) test top-1" in out
    records = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert steps and all(0 <= r["embedding_std"] <= 1 and "top1" not in r for r in steps)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(0 <= r["knn"]["top1"] <= 100 for r in epochs)
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    probe = json.loads((tmp_path / "cli" / "linear_probe" / "results.json").read_text())
    assert results["evaluations"]["linear"]["test"] == probe["test"]
    assert set(results["evaluations"]) == {"linear", "knn"}


def test_a_collapse_stops_the_run_with_its_figures(small_birds: Path, tmp_path: Path) -> None:
    guard = CollapseGuard(floor=0.1, epochs=2)
    guard.check(0.001, 64, 1)
    guard.check(0.5, 64, 2)  # back above the floor: the count starts over
    guard.check(0.001, 64, 3)
    with pytest.raises(Collapsed, match=r"0.001, 0.001 in the last 2 epochs \(up to epoch 4\)"):
        guard.check(0.001, 64, 4)
    # A floor above any spread (1 / sqrt(D) at most) must stop a real run after ssl.collapse_epochs epochs.
    with pytest.raises(Collapsed, match="the embeddings collapsed.*last good checkpoint"):
        run_pretraining(small_birds, tmp_path, "collapse", "simsiam",
                        extra=("ssl.collapse_std=2", "ssl.collapse_epochs=1"))
    assert (tmp_path / "collapse" / "last.pt").is_file()


def make_unlabeled(root: Path, count: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"part{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_unlabeled_images_pretrain_and_eval_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_unlabeled(tmp_path / "photos")
    dataset = fgvc.create_dataset("unlabeled", root=str(root))
    assert len(dataset) == 10 and dataset.classes == [] and "label" not in dataset[0]
    args = ["--dataset", "unlabeled", "--data-dir", str(root), "--model", "test_resnet", f"output_dir={tmp_path}",
            "data.image_size=32", "data.batch_size=4", "data.workers=0", "schedule.epochs=1"]
    assert pretrain_cli.main([*args, "run_name=plain"]) == 0
    assert (tmp_path / "plain" / BACKBONE_FILE).is_file()
    assert pretrain_cli.main([*args, "run_name=probed", "--eval", "knn"]) == 2
    assert "ssl.eval (--eval): unlabeled has no labels to evaluate the backbone with" in capsys.readouterr().err
    assert not (tmp_path / "probed").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "simclrr"], "ssl.method (--method): unknown self-supervised method 'simclrr'; did you mean "
                              "'simclr'?"),
    (["--method", "dino", "--config", "synthbirds/pretrain"],
     "ssl.method: dino needs a ViT backbone (patch tokens), and model.backbone test_resnet is not one"),
    (["--method", "mae", "--config", "synthbirds/pretrain"], "ssl.method: mae needs a ViT backbone"),
    (["--method", "dino", "--model", "test_resnet"], "model.backbone_args: {'patch_size': 8} not taken by test_resnet"),
    (["--method", "simclr", "model.head=isqrt"], "model.head: pretraining trains no classifier head"),
    (["--method", "simclr", "regularization.mixup_alpha=0.2"], "regularization: mixup, cutmix and snapmix mix labels"),
    (["--method", "simclr", "ssl.eval=[linear,linear]"], "must name each of linear, knn at most"),
    (["--method", "simclr", "transfer.cache_features=true"], "transfer: pretraining trains the whole backbone"),
    (["--method", "simclr", "ssl.knn_temperature=0"], "ssl.knn_temperature must be positive, got 0"),
    (["--method", "byol", "ssl.byol.hidden_dim=-4"], "ssl.byol.hidden_dim must be at least 1, got -4"),
    (["--method", "simclr", "ssl.views_in_box=true", "--dataset", "unlabeled"],
     "ssl.views_in_box: unlabeled has no object boxes"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                     message: str) -> None:
    root = make_unlabeled(tmp_path / "photos")
    data = ["--data-dir", str(root)] if "unlabeled" in args else []
    assert pretrain_cli.main([*args, *data, f"output_dir={tmp_path}", "run_name=bad"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_negatives_gathered_over_ranks_give_the_one_process_loss_and_gradients(tmp_path: Path) -> None:
    """Two ranks hold 3 and 2 images of one batch of 5; each rank's anchors meet every rank's views. Their losses,
    weighted by their share of the anchors, sum to the loss of one process on the whole batch, and the gradient of
    each rank's rows (the backward all-reduced over ranks) is that process's gradient of them."""
    out = tmp_path / "gather"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(GATHER_WORKER), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{rank}.pt") for rank in range(2)]
    sys.path.insert(0, str(GATHER_WORKER.parent))
    try:
        from torchrun_gather import ROWS, TEMPERATURE, global_batch
    finally:
        sys.path.pop(0)
    z1, z2 = (z.requires_grad_(True) for z in global_batch())
    whole = nt_xent(z1, z2, TEMPERATURE)
    whole.backward()
    assert sum(rank["share"] * rank["loss"] for rank in ranks) == pytest.approx(whole.item(), rel=1e-12)
    for rank, (start, stop) in zip(ranks, ROWS, strict=True):
        torch.testing.assert_close(rank["grad1"], z1.grad[start:stop], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["grad2"], z2.grad[start:stop], rtol=1e-10, atol=1e-12)


def test_two_ranks_pretrain_with_gathered_negatives(small_birds: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "fgvc.pretrain", *ssl_overrides(small_birds, tmp_path, "ranks", "moco", "ssl.moco.key_bn_groups=2")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    state = load_checkpoint(tmp_path / "ranks" / "last.pt")["model"]
    # 2 epochs x 3 steps x 8 keys (every rank's 4) went into the queue of 20: the pointer wrapped to 48 % 20.
    assert int(state["queue.pointer"]) == 48 % 20
    assert (tmp_path / "ranks" / BACKBONE_FILE).is_file()


def test_pretraining_config_needs_no_ssl_section_in_older_runs() -> None:
    saved = fgvc.config.to_dict(load_config(None))
    del saved["ssl"]
    assert fgvc.config.from_dict(saved).ssl == load_config(None).ssl
    with pytest.raises(ConfigError, match="ssl.moco.queue_size must be at least 1"):
        load_config(None, ["ssl.moco.queue_size=0"])


def test_the_monitor_needs_a_val_split(small_birds: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ssl_overrides(small_birds, tmp_path, "novals", "simclr", "ssl.monitor=true", "data.val_fraction=0")
    assert pretrain_cli.main(args) == 2
    assert "ssl.monitor: the k-NN monitor runs on the val split, and data.val_fraction=0 carves none" in \
        capsys.readouterr().err


def test_views_reach_the_device_in_the_runtime_memory_format() -> None:
    runtime = Runtime(torch.device("meta"), channels_last=True)
    batch = runtime.batch({"views": [torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)], "index": torch.arange(2)})
    assert all(view.device.type == "meta" and view.is_contiguous(memory_format=torch.channels_last)
               for view in batch["views"])
