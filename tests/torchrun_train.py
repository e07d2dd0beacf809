"""What the distributed tests launch with torchrun when `python -m fgvc.train` cannot say it: train a config,
stopping after a number of steps (as an interruption would), and append a line "step epoch digest" of each rank's
whole model state (weights and buffers) to DIGEST_DIR/rank<r>.txt at every checkpoint, so the tests can see that
every rank holds the same model, and how often it checkpointed. With
NAN_LOSS=RANK:CALL in the environment, that rank's CALL-th loss (1-based) is NaN.

    torchrun --nproc_per_node 2 tests/torchrun_train.py DIGEST_DIR STOP_AFTER key=value ...   (STOP_AFTER 0: none)
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from fgvc.config import load_config
from fgvc.engine import trainer
from fgvc.errors import command
from fgvc.losses import LabelSmoothingCrossEntropy

SCRATCH_PRESET = "synthbirds/scratch_isqrt.yaml"


def digest(state: dict) -> str:
    sha = hashlib.sha256()
    for name, value in state.items():
        sha.update(name.encode())
        sha.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def poison_loss(rank: int, call: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    forward, calls = LabelSmoothingCrossEntropy.forward, []

    def poisoned(self, *args, **kwargs):
        calls.append(None)
        loss = forward(self, *args, **kwargs)
        return {**loss, "loss": loss["loss"] * float("nan")} if len(calls) == call else loss

    LabelSmoothingCrossEntropy.forward = poisoned


@command
def main() -> int:
    digests, stop_after, *overrides = sys.argv[1:]
    digests = Path(digests)
    digests.mkdir(parents=True, exist_ok=True)
    checkpoint_last = trainer.Run.checkpoint_last

    def checkpoint_and_digest(run: trainer.Run) -> None:
        checkpoint_last(run)
        with open(digests / f"rank{os.environ.get('RANK', '0')}.txt", "a") as lines:
            lines.write(f"{run.state.step} {run.state.epoch} {digest(run.setup.model.state_dict())}\n")

    trainer.Run.checkpoint_last = checkpoint_and_digest
    if "NAN_LOSS" in os.environ:
        poison_loss(*map(int, os.environ["NAN_LOSS"].split(":")))
    result = trainer.train(load_config(SCRATCH_PRESET, overrides), stop_after_steps=int(stop_after) or None)
    print(f"completed={result.completed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
