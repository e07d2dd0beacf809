"""Checkpoints that are written atomically, verified on load, and never execute code when read.

A checkpoint file holds the serialized state together with its SHA-256: {"format", "sha256", "payload"}, so a
flipped bit is caught on load instead of loading silently. Writing is atomic (fgvc.files): the previous checkpoint
stays in place until the new one is complete.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from fgvc.errors import FGVCError
from fgvc.files import write_atomically

FORMAT = "fgvc-checkpoint-1"


class CheckpointError(FGVCError, RuntimeError):
    """A checkpoint that cannot be read; the message names the file. (Writing fails with fgvc.files.WriteError.)"""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()  # a view, not a copy: checkpoints of large models are hundreds of MB
    wrapped = io.BytesIO()
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(payload, dtype=torch.uint8)}, wrapped)
    write_atomically(path, wrapped.getbuffer())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint (weights_only: loading can never run code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged zip or pickle
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint: {error}") from error
    if not isinstance(wrapped, dict) or wrapped.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fgvc checkpoint (format {FORMAT})")
    payload = wrapped["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapped["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 does not match the stored one")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
