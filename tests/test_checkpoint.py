"""Checkpoints: exact round trip, a flipped bit caught, no code executed on load, atomic and tidy writes."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch

from fgvc import files
from fgvc.engine import checkpoint
from fgvc.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fgvc.files import WriteError


def sample_state() -> dict:
    return {"model": {"w": torch.randn(5, 3), "b": torch.arange(4)}, "step": 7, "name": "x", "lrs": [0.1, 0.2]}


def test_round_trip_is_exact(tmp_path: Path) -> None:
    state = sample_state()
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["step"] == 7 and loaded["lrs"] == [0.1, 0.2]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_flipped_bit_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.zeros(1000)})
    data = bytearray(path.read_bytes())
    position = data.find(b"\x00" * 64, len(data) // 3)  # inside the tensor payload
    data[position + 10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}.*(SHA-256|damaged)"):
        load_checkpoint(path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_never_executes_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "sha256": "0", "payload": Exploit()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        load_checkpoint(path)
    torch.save({"plain": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="not an fgvc checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"generation": 1})

    def full(_descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(WriteError, match=f"disk full while writing {path}"):
        save_checkpoint(path, {"generation": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"generation": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
