"""Mistakes and failures, as a user meets them: every CLI answers a mistake with one `error: ...` line and exit
status 2 (no traceback), a run killed before its first checkpoint can be resumed, and a non-finite loss stops the
run without writing non-finite weights."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fgvc.engine import trainer
from fgvc.engine.checkpoint import load_checkpoint, save_checkpoint
from tests.test_training import SCRATCH_PRESET, scratch_preset, tiny_overrides


def cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A damaged checkpoint of each kind, and a folder that exists."""
    scratch = tmp_path_factory.mktemp("mistakes")
    state = {"model": {"w": torch.ones(3)}, "config": {}, "classes": ["a"]}
    save_checkpoint(scratch / "flipped.pt", state)
    data = bytearray((scratch / "flipped.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (scratch / "flipped.pt").write_bytes(bytes(data))
    save_checkpoint(scratch / "truncated.pt", state)
    (scratch / "truncated.pt").write_bytes((scratch / "truncated.pt").read_bytes()[:300])
    (scratch / "exists").mkdir()
    (scratch / "runs" / "used").mkdir(parents=True)
    (scratch / "runs" / "used" / "metrics.jsonl").write_text("")
    return scratch


@pytest.fixture(scope="module")
def no_val_run(small_birds: Path, scratch: Path) -> Path:
    """The best.pt of a run trained without a validation split."""
    overrides = [*tiny_overrides(small_birds, scratch / "runs", "no_val"), "schedule.epochs=1", "data.val_fraction=0"]
    return trainer.train(scratch_preset(overrides)).run_dir / "best.pt"


@pytest.fixture(scope="module")
def mistakes(small_birds: Path, scratch: Path) -> dict[str, tuple[int, str]]:
    """The mistakes a new user makes first, each through the command line, all at once (each process spends most of
    its time importing torch)."""
    tiny = [f"data.root={small_birds}", f"output_dir={scratch / 'runs'}", "data.image_size=32"]
    offline = {"HF_HUB_OFFLINE": "1"}  # no network, found out at once rather than after the hub client's retries
    cases = {
        "train --dataset cub200 without --data-dir": cli("fgvc.train", "--dataset", "cub200"),
        "train --dataset cub": cli("fgvc.train", "--dataset", "cub", *tiny[1:]),
        "train --model resnet5000": cli("fgvc.train", "--model", "resnet5000"),
        "train model.pretrained=true offline": cli("fgvc.train", "--config", SCRATCH_PRESET, *tiny,
                                                   "model.pretrained=true", **offline),
        "evaluate a corrupted checkpoint": cli("fgvc.evaluate", "--checkpoint", str(scratch / "flipped.pt")),
        "evaluate a truncated checkpoint": cli("fgvc.evaluate", "--checkpoint", str(scratch / "truncated.pt")),
    }
    results = {}
    for name, process in cases.items():
        _, err = process.communicate(timeout=300)
        results[name] = (process.returncode, err)
    return results


EXPECTED = {
    "train --dataset cub200 without --data-dir": r"data.root \(--data-dir\): must point at CUB_200_2011",
    "train --dataset cub": r"data.dataset \(--dataset\): unknown dataset 'cub'; did you mean 'cub200'",
    "train --model resnet5000": r"model.backbone \(--model\): unknown timm model 'resnet5000'; similar timm names: "
                                r"resnet50,",
    "train model.pretrained=true offline": r"model.pretrained: cannot fetch the weights of test_resnet .*; offline, "
                                           r"point model.pretrained_file at a local copy",
    "evaluate a corrupted checkpoint": r"flipped.pt is corrupted: its SHA-256 does not match",
    "evaluate a truncated checkpoint": r"truncated.pt is damaged or not a checkpoint",
}


def assert_one_error_line(status: int, err: str, expected: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(expected, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_new_users_mistakes_get_one_line_from_the_command_line(mistakes: dict, case: str) -> None:
    assert_one_error_line(*mistakes[case], EXPECTED[case])


@pytest.mark.parametrize(("tool", "args", "expected"), [
    ("train", ["optim.lrr=0.1"], r"unknown key 'optim.lrr'; did you mean 'optim.lr'"),
    ("train", ["--resume", "{scratch}"], r"--resume .*mistakes.*: not a run folder \(it has no config.yaml\)"),
    ("evaluate", ["--checkpoint", "{scratch}/none.pt"], r"none.pt not found"),
    ("evaluate", ["--checkpoint", "{scratch}/flipped.pt", "--tta", "flip"], r"flipped.pt is corrupted"),
    ("predict", ["--checkpoint", "{scratch}/none.pt", "x.jpg"], r"none.pt not found"),
    ("visualize", ["--checkpoint", "{scratch}/truncated.pt"], r"truncated.pt is damaged"),
    ("data.check", ["--dataset", "cub200", "--data-dir", "{scratch}"], r"no images.txt here"),
    ("data.check", ["--dataset", "cub", "--data-dir", "{scratch}"], r"unknown dataset 'cub'"),
    ("data.export", ["--dataset", "cub200", "--data-dir", "{birds}", "--format", "imagefolder", "--out",
                     "{scratch}/exists"], r"exists already exists; choose a new folder"),
    ("data.synthbirds", ["--out", "{scratch}/b", "--num-classes", "0"], r"invalid synthbirds spec: num_classes"),
    ("data.synthbirds", ["--out", "/proc/no/such/folder"], r"^error: /proc/no.*: No such file or directory"),
    ("train", ["--model", "resnet50.badtag"], r"model.backbone \(--model\): Invalid pretrained tag \(badtag\)"),
    ("train", ["train.log_every=0"], r"train.log_every must be at least 1, got 0"),
    ("train", ["data.batch_size=0"], r"data.batch_size must be at least 1, got 0"),
    ("train", ["output_dir={scratch}/runs", "run_name=used", "data.root=/nowhere"],
     r"run folder .*used already exists and is not empty.*--resume"),  # before the missing data is even looked at
    ("data.check", ["--dataset", "aircraft100", "--data-dir", "{scratch}", "data.annotation_level=genus"],
     r"data.annotation_level: 'genus' is not an FGVC-Aircraft level"),
    ("evaluate", ["--checkpoint", "{no_val}", "--split", "val"], r"the val split .* is empty .*data.val_fraction=0"),
    ("visualize", ["--checkpoint", "{no_val}", "--split", "val"], r"the val split .* is empty"),
    ("evaluate", ["--checkpoint", "{no_val}", "--tta", "multiscale", "--scales", "0"],
     r"scales: 0 makes 0 x 0 views, which test_resnet cannot take: a view needs at least one pixel"),
    ("evaluate", ["--checkpoint", "{no_val}", "--output", "{scratch}/no/such/folder/e.json"],
     r"folder/e.json: No such file or directory"),
])
def test_every_cli_answers_a_mistake_with_one_line(tool: str, args: list[str], expected: str, scratch: Path,
                                                   small_birds: Path, request, capsys) -> None:
    module = importlib.import_module(f"fgvc.{tool}")
    places = {"scratch": scratch, "birds": small_birds}
    if any("{no_val}" in arg for arg in args):
        places["no_val"] = request.getfixturevalue("no_val_run")
    capsys.readouterr()
    status = module.main([arg.format(**places) for arg in args])
    assert_one_error_line(status, capsys.readouterr().err, expected)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_its_config(small_birds: Path, tmp_path: Path) -> None:
    overrides = ["--config", SCRATCH_PRESET, *tiny_overrides(small_birds, tmp_path, "killed"), "data.batch_size=1",
                 "schedule.epochs=2"]
    run_dir = tmp_path / "killed"
    process = cli("fgvc.train", *overrides)
    while not (run_dir / "config.yaml").is_file():  # written when training is about to start
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and not (run_dir / "last.pt").exists()
    # A new run refuses the folder; --resume starts it over from its saved config, saying so.
    again = subprocess.run([sys.executable, "-m", "fgvc.train", *overrides], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run([sys.executable, "-m", "fgvc.train", "--resume", str(run_dir)], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "stopped before its first checkpoint; starting it over" in resumed.stdout
    assert (run_dir / "results.json").is_file()
    whole = trainer.train(scratch_preset([*tiny_overrides(small_birds, tmp_path, "whole"), "data.batch_size=1",
                                          "schedule.epochs=2"]))
    expected = load_checkpoint(whole.run_dir / "last.pt")["model"]
    started_over = load_checkpoint(run_dir / "last.pt")["model"]
    assert all(torch.equal(started_over[key], expected[key]) for key in expected)


def strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_loss_stops_the_run(small_birds: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "diverged"
    overrides = ["--config", SCRATCH_PRESET, *tiny_overrides(small_birds, tmp_path, "diverged"), "optim.lr=1e6",
                 "optim.name=sgd", "train.checkpoint_every=1", "schedule.warmup_epochs=0"]
    done = subprocess.run([sys.executable, "-m", "fgvc.train", *overrides], capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "not finite" in lines[0] and "step" in lines[0], lines[0]
    assert not (run_dir / "best.pt").exists() and not (run_dir / "results.json").exists()
    if (run_dir / "last.pt").exists():  # what was kept is good
        assert "the last good checkpoint" in lines[0]
        weights = load_checkpoint(run_dir / "last.pt")["model"]
        assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_the_loss_check_names_the_step_and_the_terms(small_birds: Path, tmp_path: Path, monkeypatch) -> None:
    """The first non-finite loss stops training before its backward pass: step and every loss term named."""
    from fgvc.models.heads import Head

    calls = []

    def poisoned(self, forward, batch, outputs, criterion):
        calls.append(1)
        losses = criterion(outputs, batch)
        return {**losses, "loss": losses["loss"] * (float("nan") if len(calls) == 2 else 1.0)}

    monkeypatch.setattr(Head, "training_losses", poisoned)
    with pytest.raises(trainer.RunError, match=r"not finite at step 2 \(epoch 1, batch 2\): loss nan.*no checkpoint"):
        trainer.train(scratch_preset(tiny_overrides(small_birds, tmp_path, "poisoned")))
    assert len(calls) == 2 and not (tmp_path / "poisoned" / "last.pt").exists()
