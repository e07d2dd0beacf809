"""Final weights of short training runs, hashed, from any checkout of fgvc: the proof that a refactor left training
unchanged.

    python experiments/same_weights.py --code /tmp/old-checkout --out tests/data/reference_weights.safetensors
    python experiments/same_weights.py --code /tmp/old-checkout --quick-start    # the full quick start, ~4 minutes

Every run goes through the command line (`python -m fgvc.train ...`, which with no --config or --dataset is the
quick start on every version), in a fresh process with PYTHONPATH pointing at `--code` (default: this checkout), so
the same script measures the code before and after a change. The tiny runs train on the tests' small synthbirds
tree (tests/conftest.py's SMALL_SPEC) with one thread; their weights are written as safetensors (one key prefix a
run) with each run's SHA-256, torch's version and the CPU's kernel capability in the metadata, which
tests/test_build.py compares the current code against (bitwise where torch and the CPU capability are the same,
since kernels round differently elsewhere). The full quick start prints its SHA-256 only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parents[1]
# tests/conftest.py's SMALL_SPEC, as generator flags (difficulty: the generator's default, 0.5).
SMALL_TREE = ["--num-classes", "6", "--images-per-class", "10", "--train-fraction", "0.6", "--image-size", "64",
              "--seed", "11"]
# Narrow channels keep the reference file small; the code paths are the quick start's.
TINY = ["model.backbone_args.stem_width=8", "model.backbone_args.channels=[8,8,16,16]", "data.image_size=32",
        "data.batch_size=8", "schedule.epochs=2", "train.threads=1", "train.log_every=1000"]
TINY_RUNS = {  # the quick-start preset, WS-DAN's extra passes, and the mixing stack with dropout
    "quickstart": [],
    "wsdan": ["model.head=wsdan", "model.num_attention_maps=4"],
    "mixing": ["model.head=linear", "model.drop_rate=0.3", "regularization.mixup_alpha=0.8",
               "regularization.cutmix_alpha=1.0", "regularization.snapmix_prob=0.5"],
}


def run(code: Path, args: list[str], env: dict[str, str]) -> None:
    path = os.pathsep.join([str(code), str(code / "kernels")])
    subprocess.run([sys.executable, *args], check=True, env={**env, "PYTHONPATH": path}, cwd=code)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's last.pt, read from the checkpoint format directly (no fgvc import)."""
    wrapped = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    payload = wrapped["payload"].numpy().tobytes()
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)["model"]


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=HERE, help="the checkout whose fgvc trains")
    parser.add_argument("--out", type=Path, help="safetensors file for the tiny runs' weights")
    parser.add_argument("--quick-start", action="store_true", help="hash the full quick start instead")
    args = parser.parse_args()
    code = args.code.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "FGVC_DATA_ROOT": str(scratch / "cache")}
        if args.quick_start:
            run(code, ["-m", "fgvc.train", "--output-dir", str(scratch / "runs"), "run_name=quickstart"], env)
            digest = weights_sha256(final_weights(scratch / "runs" / "quickstart"))
            print(f"quick start, seed 0: final weights SHA-256 {digest}")
            return
        tree = scratch / "birds"
        run(code, ["-m", "fgvc.data.synthbirds", "--out", str(tree), *SMALL_TREE], env)
        tensors, hashes = {}, {}
        for name, overrides in TINY_RUNS.items():
            run(code, ["-m", "fgvc.train", "--output-dir", str(scratch / "runs"), f"run_name={name}",
                       f"data.root={tree}", *TINY, *overrides], env)
            weights = final_weights(scratch / "runs" / name)
            hashes[name] = weights_sha256(weights)
            tensors.update({f"{name}/{key}": value.contiguous() for key, value in weights.items()})
            print(f"{name}: final weights SHA-256 {hashes[name]}")
        if args.out is not None:
            machine = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
            save_file(tensors, str(args.out), metadata={**machine, **{f"sha256/{n}": h for n, h in hashes.items()}})


if __name__ == "__main__":
    main()
