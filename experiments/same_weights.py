"""Final weights of short training runs, hashed, from any checkout of fgvc: the proof that a refactor left training
unchanged.

    python experiments/same_weights.py --against /tmp/old --quick-start --out experiments/results/same_weights.md
    python experiments/same_weights.py --code /tmp/old --weights tests/data/reference_weights.safetensors

Every run goes through the command line (`python -m fgvc.train ...`, which with no --config or --dataset is the
quick start on every version), in a fresh process with PYTHONPATH pointing at `--code` (default: this checkout), so
the same script measures the code before and after a change. The tiny runs train on the tests' small synthbirds
tree (tests/conftest.py's SMALL_SPEC) with one thread; their weights are written as safetensors (one key prefix a
run) with each run's SHA-256, torch's version and the CPU's kernel capability in the metadata, which
tests/test_build.py compares the current code against (bitwise where torch and the CPU capability are the same,
since kernels round differently elsewhere). The table gives each run's hash per checkout, side by side.
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
from report import emit, header
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parents[1]
# tests/conftest.py's SMALL_SPEC, as generator flags (difficulty: the generator's default, 0.5).
SMALL_TREE = ["--num-classes", "6", "--images-per-class", "10", "--train-fraction", "0.6", "--image-size", "64",
              "--seed", "11"]
# The from-scratch preset (the quick start before it became a pretrained one), read from this checkout's file so that
# older versions, which lack it, train the same recipe. Narrow channels keep the reference file small.
SCRATCH_PRESET = HERE / "configs" / "synthbirds" / "scratch_isqrt.yaml"
TINY = ["model.backbone_args.stem_width=8", "model.backbone_args.channels=[8,8,16,16]", "data.image_size=32",
        "data.batch_size=8", "schedule.epochs=2", "train.threads=1", "train.log_every=1000"]
TINY_RUNS = {  # the from-scratch preset, WS-DAN's extra passes, and the mixing stack with dropout
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


def tiny_runs(code: Path, scratch: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The final weights of each tiny run, trained by `code`."""
    env = {**os.environ, "FGVC_DATA_ROOT": str(scratch / "cache")}
    tree = scratch / "birds"
    run(code, ["-m", "fgvc.data.synthbirds", "--out", str(tree), *SMALL_TREE], env)
    weights = {}
    for name, overrides in TINY_RUNS.items():
        run(code, ["-m", "fgvc.train", "--config", str(SCRATCH_PRESET), "--output-dir", str(scratch / "runs"),
                   f"run_name={name}", f"data.root={tree}", *TINY, *overrides], env)
        weights[name] = final_weights(scratch / "runs" / name)
    return weights


def quick_start(code: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The final weights of the quick start (`python -m fgvc.train`, seed 0) trained by `code`."""
    env = {**os.environ, "FGVC_DATA_ROOT": str(scratch / "cache")}
    run(code, ["-m", "fgvc.train", "--output-dir", str(scratch / "runs"), "run_name=quickstart"], env)
    return final_weights(scratch / "runs" / "quickstart")


def hashes(code: Path, with_quick_start: bool) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as scratch:
        found = {name: weights_sha256(w) for name, w in tiny_runs(code, Path(scratch) / "tiny").items()}
        if with_quick_start:
            found["quick start (full, seed 0)"] = weights_sha256(quick_start(code, Path(scratch) / "quick"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=HERE, help="the checkout whose fgvc trains")
    parser.add_argument("--against", type=Path, help="a second checkout: hash both, side by side, into a table")
    parser.add_argument("--quick-start", action="store_true", help="also train and hash the full quick start")
    parser.add_argument("--weights", type=Path, help="safetensors file for --code's tiny runs' weights")
    parser.add_argument("--out", type=Path, help="write the markdown table here (also printed)")
    args = parser.parse_args()
    code = args.code.resolve()
    if args.weights is not None:
        with tempfile.TemporaryDirectory() as scratch:
            weights = tiny_runs(code, Path(scratch))
        machine = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        tensors = {f"{name}/{key}": value.contiguous() for name, w in weights.items() for key, value in w.items()}
        metadata = {**machine, **{f"sha256/{name}": weights_sha256(w) for name, w in weights.items()}}
        save_file(tensors, str(args.weights), metadata=metadata)
    codes = [code] + ([args.against.resolve()] if args.against is not None else [])
    found = [hashes(c, args.quick_start) for c in codes]
    lines = [*header("Final weights of short runs, by checkout"),
             f"Checkouts: {', '.join(f'`{c}`' for c in codes)} (SHA-256 of the final weights, first 16 hex digits).",
             "", "| run | " + " | ".join(c.name for c in codes) + (" | equal |" if len(codes) > 1 else ""),
             "|---|" + "---|" * len(codes) + ("---|" if len(codes) > 1 else "")]
    for name in found[0]:
        digests = [f[name] for f in found]
        equal = f" {'yes' if len(set(digests)) == 1 else '**no**'} |" if len(codes) > 1 else ""
        lines.append(f"| {name} | " + " | ".join(f"`{d[:16]}`" for d in digests) + " |" + equal)
    emit([*lines, ""], args.out)


if __name__ == "__main__":
    main()
