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

from fgvc.errors import FGVCError, load_failure, quiet_weights_only_load
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


def load_weights_only(path: Path, error: type[Exception], *, missing: str, damaged: str) -> Any:
    """torch.load with weights_only (loading can never run code), its failures raised as `error` with the given
    messages (`damaged` gets torch's reason appended)."""
    if not path.is_file():
        raise error(missing)
    try:
        with quiet_weights_only_load():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as reason:  # torch raises many types for a damaged zip or pickle
        raise error(f"{damaged}: {load_failure(reason)}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint (weights_only: loading can never run code)."""
    path = Path(path)
    wrapped = load_weights_only(path, CheckpointError, missing=f"checkpoint {path} not found",
                                damaged=f"checkpoint {path} is damaged or not a checkpoint")
    if not isinstance(wrapped, dict) or wrapped.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fgvc checkpoint (format {FORMAT})")
    stored, payload = wrapped.get("sha256"), wrapped.get("payload")
    if not isinstance(stored, str) or not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 or its payload is missing")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != stored:
        raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 does not match the stored one")
    try:
        with quiet_weights_only_load():
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as reason:  # a payload made elsewhere with a matching SHA-256
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {load_failure(reason)}") from None
