"""The reliability suite: each promise fgvc makes about failures, tried many times, at random moments where a moment
matters, by real processes that are signalled, killed, starved of disk or fed bad files.

    python experiments/reliability.py --out experiments/results/reliability.md   # every promise
    python experiments/reliability.py --only R1 R3                               # a subset
    python experiments/reliability.py --only R2 --trials 20 --seed 3             # more (or other) random trials

One table row per promise: what is promised, the trials made, the trials that failed, and the command that repeats
that row alone. Below the table, what each row tried and every failure, in words. Promises are entries of
PROMISES: a function (args, workdir) -> Outcome and one line of what it checks, so a promise is added by writing one
function. `--trials` sets the number of random trials of the promises that draw them (its default is each one's
own); promises that walk a fixed list of cases (bad files, load paths) ignore it. Random choices (steps, delays,
positions) come from --seed. Everything but R10 runs on a 60-image synthbirds tree (the tests' SMALL_SPEC) and the
tests' tiny test_resnet runs (tests/test_training.py's tiny_overrides on the from-scratch preset), one torch thread
each; R10 times the from-scratch preset itself on part of its data. The whole suite takes about 10 minutes on 2
cores. Real `python -m fgvc.*` processes (under torchrun for R8 and R10) run where a process must be signalled,
killed, limited, launched as ranks or must print its one `error:` line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from report import emit, header

from fgvc.data.check import main as check_main
from fgvc.data.cub import CUBDataset
from fgvc.data.loader import EpochSampler, UnreadableImages, build_loader
from fgvc.data.synthbirds import generate
from fgvc.data.transforms import PartAwareTransform, eval_transform
from fgvc.engine import trainer
from fgvc.engine.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from fgvc.engine.inference import evaluate_checkpoint
from fgvc.errors import FGVCError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import SMALL_SPEC  # noqa: E402
from tests.test_datasets import car_records, make_aircraft, make_cars_split_layout, make_folder_tree, struct_array  # noqa: E402
from tests.test_images import write_png_rgb16  # noqa: E402
from tests.test_reliability import Plant, torch_zip  # noqa: E402
from tests.test_training import SCRATCH_PRESET, scratch_preset, tiny_overrides  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# What a promise's trials found, and the registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One promise's trials: how many, each failed trial (what it was, what went wrong), and notes on what the
    trials covered."""

    trials: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return len(self.failed)

    @property
    def problems(self) -> list[str]:
        """A description of each failed trial."""
        return [f"{label}: {what}" for label, what in self.failed]

    def trial(self, label: str, problems: list[str]) -> bool:
        """Count one trial; it failed if any problem was found (each is printed at once)."""
        self.trials += 1
        if problems:
            self.failed.append((label, "; ".join(problems)))
            print(f"  FAIL {self.problems[-1][:400]}", flush=True)
        else:
            print(f"  ok   {label}", flush=True)
        return not problems


@dataclass(frozen=True)
class Promise:
    run: Callable[[argparse.Namespace, Path], Outcome]
    what: str
    trials: int | None = None  # the default --trials; None: a fixed list of cases, --trials ignored


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: the data, tiny runs, processes
# ---------------------------------------------------------------------------------------------------------------


def birds(workdir: Path) -> Path:
    """The tests' 60-image synthbirds tree (SMALL_SPEC), generated once per invocation; read-only."""
    root = workdir / "birds" / "CUB_200_2011"
    if not (root / "images.txt").is_file():
        generate(root, SMALL_SPEC)
    return root


def run_args(data: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """`python -m fgvc.train` arguments of a tiny run (the tests' tiny_overrides on the from-scratch preset)."""
    return ["--config", SCRATCH_PRESET, *tiny_overrides(data, runs, name), *extra]


@dataclass
class Cli:
    """A `python -m fgvc.<tool>` process; its output goes to files (a full pipe would block it)."""

    popen: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = 600) -> int:
        return self.popen.wait(timeout)

    def running(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def cli(tool: str, args: list[str], logs: Path, *, env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None) -> Cli:
    logs.parent.mkdir(parents=True, exist_ok=True)
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        popen = subprocess.Popen([sys.executable, "-m", f"fgvc.{tool}", *args], stdout=stdout, stderr=stderr,
                                 env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
    return Cli(popen, out, err)


def finished(tool: str, args: list[str], logs: Path, **options) -> Cli:
    process = cli(tool, args, logs, **options)
    process.wait()
    return process


def one_error_line(process: Cli) -> list[str]:
    """Problems with how a CLI refused: fgvc's promise is exit status 2 and one `error: ...` line, no traceback."""
    lines = [line for line in process.stderr().splitlines() if line.strip()]
    problems = []
    if process.popen.returncode != 2:
        problems.append(f"exit status {process.popen.returncode}, not 2")
    if any("Traceback" in line for line in lines):
        problems.append(f"a traceback ending in {lines[-1].strip()!r}")
    elif len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr has {len(lines)} lines, not one `error:` line: {' | '.join(lines)!r}")
    return problems


def error_line(process: Cli) -> str:
    lines = [line for line in process.stderr().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def weights(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / name)["model"]


def differences(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors are not bitwise equal (or are missing on either side)."""
    keys = sorted(set(got) | set(expected))
    return [key for key in keys if key not in got or key not in expected or not torch.equal(got[key], expected[key])]


def bitwise(got: dict, expected: dict, what: str) -> list[str]:
    differ = differences(got, expected)
    return [f"{what}: {len(differ)} of {len(expected)} tensors differ ({', '.join(differ[:3])})"] if differ else []


def steps_logged(run_dir: Path) -> int:
    """Optimizer steps the run has logged (train.log_every=1: one metrics line a step)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return text.count('"kind": "train"')


def wait_until(condition: Callable[[], bool], process: Cli, timeout: float = 300, poll: float = 0.002) -> bool:
    """Poll until `condition` holds (True) or the process has ended without it (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not process.running():
            return condition()
        time.sleep(poll)
    raise TimeoutError("the process neither got there nor ended")


def checkpoint_step(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path)["state"]["step"])
    except (FGVCError, KeyError):
        return None


def resume(run_dir: Path, logs: Path, **options) -> tuple[Cli, list[str]]:
    """`python -m fgvc.train --resume run_dir` to its end; the problems if it did not complete."""
    process = finished("train", ["--resume", str(run_dir)], logs, **options)
    problems = []
    if process.popen.returncode != 0:
        problems.append(f"--resume exited {process.popen.returncode}: {error_line(process)[:300]}")
    elif not (run_dir / "results.json").is_file():
        problems.append("--resume exited 0 without results.json")
    return process, problems


def quietly(cfg, **options) -> trainer.RunResult:
    """trainer.train in this process, its progress lines kept off the suite's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer.train(cfg, **options)


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# R1: interrupted at random steps, resumed exactly
# ---------------------------------------------------------------------------------------------------------------

# 30 training images at batch 4: 7 steps an epoch, 21 in all; validation after each epoch.
R1_RUN = ("data.batch_size=4", "schedule.epochs=3")
R1_STEPS = 21


def r1_interrupt_resume(args: argparse.Namespace, workdir: Path) -> Outcome:
    """SIGTERM (fgvc.engine.trainer stops at the next step, checkpoints, exits 0) or kill -9 (after a checkpoint,
    with train.checkpoint_every=1) at a random step, then `python -m fgvc.train --resume`; the final weights must be
    bitwise those of an uninterrupted run with the same data.workers. Trials alternate over data.workers 0, 1, 2
    and the two signals."""
    outcome, rng = Outcome(), np.random.default_rng([args.seed, 1])
    data, runs = birds(workdir), workdir / "r1"
    plans = [(workers, sig) for workers in (0, 1, 2) for sig in (signal.SIGTERM, signal.SIGKILL)]
    references: dict[int, dict] = {}
    stopped_at = []
    for n in range(args.trials):
        workers, sig = plans[n % len(plans)]
        extra = (*R1_RUN, f"data.workers={workers}")
        if workers not in references:
            whole = finished("train", run_args(data, runs, f"whole-w{workers}", *extra), runs / f"whole-w{workers}")
            if whole.popen.returncode != 0:
                raise RuntimeError(f"the uninterrupted run failed: {whole.stderr()[-2000:]}")
            references[workers] = weights(runs / f"whole-w{workers}")
        kill = sig == signal.SIGKILL
        step = int(rng.integers(1, R1_STEPS - 1))  # the step after which the signal is sent
        delay = float(rng.uniform(0, 0.03)) if kill else 0.0
        name = f"{'kill' if kill else 'term'}-w{workers}-{n}"
        run_dir = runs / name
        process = cli("train", run_args(data, runs, name, *extra, *(["train.checkpoint_every=1"] if kill else [])),
                      runs / name)
        reached = wait_until(lambda run_dir=run_dir, step=step, kill=kill: steps_logged(run_dir) >= step
                             and (not kill or (run_dir / "last.pt").is_file()), process)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        status = process.wait()
        problems = [] if reached else [f"the run ended before step {step}: {error_line(process)[:200]}"]
        if kill and status != -signal.SIGKILL:
            problems.append(f"exit status {status} after kill -9")
        if not kill and status != 0:
            problems.append(f"exit status {status} after SIGTERM, not 0 ({error_line(process)[:200]})")
        if not kill and "stopped at step" not in process.stdout():
            problems.append("no `stopped at step` line after SIGTERM")
        stopped = checkpoint_step(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None
        if (run_dir / "last.pt").is_file() and stopped is None:
            problems.append("last.pt does not load")
        stopped_at.append(stopped)
        if not problems:
            _, problems = resume(run_dir, runs / f"{name}-resume")
        if not problems:
            problems = bitwise(weights(run_dir), references[workers], "final weights")
        where = f"last.pt at step {stopped}" if stopped is not None else "no last.pt"
        label = (f"{'kill -9' if kill else 'SIGTERM'} after step {step}{f' + {delay * 1000:.0f} ms' if kill else ''}"
                 f" ({where}), data.workers={workers}")
        outcome.trial(label, problems)
    kept = sorted(s for s in stopped_at if s is not None)
    outcome.notes.append(f"Checkpoints resumed from were at steps {kept} of {R1_STEPS} (the tiny run at batch 4, "
                         "3 epochs, dropout 0.3); each resumed run was compared with an uninterrupted run of the "
                         "same data.workers.")
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# R2: kill -9 inside checkpoint writes
# ---------------------------------------------------------------------------------------------------------------

# Wider channels make last.pt 27 MB, so that a write (fgvc.files.write_atomically: temp file, write, fsync,
# rename) lasts 13-20 ms on this machine's disk; the kill comes at a random delay inside that window.
R2_RUN = (*R1_RUN, "model.backbone_args.channels=[32,64,128,256]", "train.checkpoint_every=1")
R2_KILL_WINDOW = 0.012
R2_CHAIN = 5  # kills per run before it is resumed to its end


def wait_for_write(run_dir: Path, process: Cli, skip: int, targets: tuple[str, ...]) -> str | None:
    """The temp file of the (skip+1)-th write of one of `targets` from now (None if the process ends first)."""
    seen: set[str] = set()
    prefixes = tuple(f".{target}." for target in targets)
    while process.running():
        try:
            names = [name for name in os.listdir(run_dir) if name.endswith(".tmp") and name.startswith(prefixes)]
        except FileNotFoundError:
            names = []
        for name in names:
            if name not in seen:
                seen.add(name)
                if skip == 0:
                    return name
                skip -= 1
        time.sleep(0.0003)
    return None


def loadable(run_dir: Path) -> list[str]:
    problems = []
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).is_file():
            try:
                load_checkpoint(run_dir / name)
            except FGVCError as error:
                problems.append(f"torn {name}: {error}")
    return problems


def r2_kill_in_save(args: argparse.Namespace, workdir: Path) -> Outcome:
    """kill -9 at a random moment inside a last.pt or best.pt write (its temp file seen, then a random delay);
    every checkpoint left loads (SHA-256 verified), and each run, killed again and again, resumes to its end.
    Trials: kills that landed inside a write (its temp file was left behind), and one per run resumed to the end."""
    outcome, rng = Outcome(), np.random.default_rng([args.seed, 2])
    data, runs = birds(workdir), workdir / "r2"
    reference = finished("train", run_args(data, runs, "whole", *R2_RUN), runs / "whole")
    if reference.popen.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {reference.stderr()[-2000:]}")
    expected = weights(runs / "whole")
    inside = attempts = 0
    equal_runs, stale, chains = 0, 0, 0
    while inside < args.trials and attempts < 3 * args.trials:
        name = f"chain{chains}"
        chains += 1
        run_dir = runs / name
        process = cli("train", run_args(data, runs, name, *R2_RUN), runs / f"{name}-0")
        for kill in range(1, R2_CHAIN + 1):
            skip, delay = int(rng.integers(0, 3)), float(rng.uniform(0, R2_KILL_WINDOW))
            # best.pt is written once an epoch (last.pt every step): every fourth kill waits for it.
            targets = ("best.pt",) if attempts % 4 == 3 else ("last.pt", "best.pt")
            skip = 0 if targets == ("best.pt",) else skip
            temp = wait_for_write(run_dir, process, skip, targets)
            if temp is None:
                break
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            attempts += 1
            target = temp[1:].split(".pt.")[0] + ".pt"
            problems = loadable(run_dir)
            if (run_dir / temp).exists():
                inside += 1
                outcome.trial(f"{name}: kill -9 {delay * 1000:.1f} ms into writing {target} (checkpoint write "
                              f"{skip + 1} of this process)", problems)
            elif problems:  # after the rename: not inside a write, but still a promise
                outcome.trial(f"{name}: kill -9 {delay * 1000:.1f} ms after {target}'s write began (renamed)",
                              problems)
            if problems or inside >= args.trials:
                break
            process = cli("train", ["--resume", str(run_dir)], runs / f"{name}-{kill}")
        if process.running():
            process.wait()
        if process.popen.returncode not in (0, -signal.SIGKILL):
            outcome.trial(f"{name}: resumed", [f"exit status {process.popen.returncode}: "
                                               f"{error_line(process)[:300]}"])
            continue
        _, problems = (None, []) if (run_dir / "results.json").is_file() else resume(run_dir, runs / f"{name}-end")
        outcome.trial(f"{name}: resumed to its end after its kills", problems)
        if not problems:
            equal_runs += not differences(weights(run_dir), expected)
            stale += len(leftovers(run_dir))
    outcome.notes.append(
        f"{attempts} kills in {chains} runs, {inside} of them inside a write (the temp file left behind); the kills "
        f"came 0-{R2_KILL_WINDOW * 1000:.0f} ms after the temp file appeared. Final weights bitwise equal to an "
        f"uninterrupted run: {equal_runs} of {chains} runs (R1's promise, not counted here). Stale temp files of "
        f"killed writes left in the run folders after they completed: {stale} (nothing removes them).")
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# R3: corrupt and odd-mode image files
# ---------------------------------------------------------------------------------------------------------------


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 7, y * 10, (x + y) * 4], axis=-1).astype(np.uint8)


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png(width: int, height: int, depth: int, colour: int, row: bytes) -> bytes:
    """A PNG of `height` copies of one raw `row` (without its filter byte), compressed as it streams."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, line = zlib.compressobj(9), b"\0" + row
    body = b"".join(compressor.compress(line * 1000) for _ in range(height // 1000))
    body += compressor.compress(line * (height % 1000)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def corrupt_files(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    """Bad files as they turn up in scraped datasets: (content, the words read_rgb's reason must contain)."""
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpeg, png_file = encoded(photo, "JPEG"), encoded(photo, "PNG")
    broken_crc = bytearray(png_file)
    broken_crc[29] ^= 0x01  # the IHDR chunk's CRC
    return {
        "truncated JPEG": (jpeg[: int(len(jpeg) * rng.uniform(0.3, 0.9))], "truncated"),
        "truncated PNG": (png_file[: int(len(png_file) * rng.uniform(0.3, 0.9))], "truncated"),
        "JPEG whose scan data is zeroed": (jpeg[:300] + bytes(len(jpeg) - 300), "corrupt"),
        "zero bytes": (b"", "empty"),
        "random bytes": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image"),
        "a text file": (b"image not available\n", "not an image"),
        "an HTML error page": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not an image"),
        "PNG with a broken header checksum": (bytes(broken_crc), "not an image"),
        "decompression bomb, 20000 x 20000 1-bit PNG": (png(20000, 20000, 1, 0, bytes(2500)), "decompression bomb"),
        "decompression bomb, 10000 x 10000 1-bit PNG (Pillow only warns)": (png(10000, 10000, 1, 0, bytes(1250)),
                                                                            "decompression bomb"),
        "truncated GIF": (encoded(photo, "GIF")[:-600], "truncated"),
        "floating-point TIFF (no known 8-bit range)": (encoded(Image.fromarray(np.full((8, 8), 0.5, np.float32)),
                                                               "TIFF"), "cannot convert mode F"),
    }


# EXIF orientation -> the transform that displays the stored pixels upright (the EXIF 2.3 table).
ORIENTATIONS = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: np.rot90(np.fliplr(a), 1),
                6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1)}


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return colour.astype(np.float64) * a + 255 * (1 - a)


def odd_files(rng: np.random.Generator) -> dict[str, tuple[Callable[[Path], None], np.ndarray, int]]:
    """Files in modes a plain convert("RGB") gets wrong: (write the file, the RGB array fgvc.data.images documents,
    tolerance). References are computed here from the stored values, not by Pillow's conversions."""
    rgb, size = gradient(), (24, 32)
    grey16 = rng.integers(256, 65536, size, dtype=np.uint16)  # above 255: clipping would show
    rgb16 = rng.integers(0, 65536, (*size, 3), dtype=np.uint16)
    alpha = rng.integers(0, 256, size, dtype=np.uint8)
    index = rng.integers(0, 4, size, dtype=np.uint8)
    palette = np.array([[10, 20, 30], [200, 0, 50], [0, 255, 0], [90, 90, 250]], dtype=np.uint8)
    bits = rng.integers(0, 2, size, dtype=np.uint8).astype(bool)
    int32 = rng.integers(0, 65536, size).astype(np.int32)
    paletted = Image.frombytes("P", (size[1], size[0]), index.tobytes())
    paletted.putpalette(palette.flatten().tolist())
    transparent = np.where((index == 2)[..., None], 255, palette[index])

    def save(image: Image.Image, format: str, **options) -> Callable[[Path], None]:
        return lambda path: image.save(path, format=format, **options)

    def cmyk(path: Path) -> None:
        Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG", quality=95)

    def grey_jpeg(path: Path) -> None:
        Image.fromarray(rgb).convert("L").save(path, format="JPEG", quality=95)

    def rotated(orientation: int) -> Callable[[Path], None]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        return save(Image.fromarray(rgb), "PNG", exif=exif)

    cases = {
        "16-bit greyscale PNG (scaled, not clipped)": (save(Image.fromarray(grey16), "PNG"),
                                                       np.repeat(np.rint(grey16 / 257)[..., None], 3, 2), 0),
        "16-bit RGB PNG (scaled, not clipped)": (lambda path: write_png_rgb16(path, rgb16), rgb16 / 257, 1),
        "32-bit integer TIFF within 0..65535 (scaled)": (save(Image.fromarray(int32), "TIFF"),
                                                         np.repeat(np.rint(int32 / 257)[..., None], 3, 2), 0),
        "RGBA PNG (composited over white)": (save(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
                                             over_white(rgb, alpha), 1),
        "greyscale + alpha (LA) PNG": (save(Image.fromarray(np.dstack([rgb[..., 0], alpha])), "PNG"),
                                       over_white(np.repeat(rgb[..., :1], 3, 2), alpha), 1),
        "palette PNG": (save(paletted, "PNG"), palette[index], 0),
        "palette PNG with a transparent entry": (save(paletted, "PNG", transparency=2), transparent, 0),
        "greyscale (L) PNG": (save(Image.fromarray(rgb[..., 1]), "PNG"), np.repeat(rgb[..., 1:2], 3, 2), 0),
        "1-bit PNG": (save(Image.fromarray(bits), "PNG"), np.repeat(bits[..., None] * 255, 3, 2), 0),
        "greyscale JPEG": (grey_jpeg, None, 0),  # reference: the stored (decoded) grey values
        "CMYK JPEG without a profile": (cmyk, None, 1),  # reference: (255 - C)(255 - K) / 255 per channel
    }
    for orientation, transform in ORIENTATIONS.items():
        cases[f"EXIF orientation {orientation} PNG"] = (rotated(orientation), transform(rgb), 0)
    return cases


def stored_reference(name: str, path: Path) -> np.ndarray:
    """References computed from a lossy file's own stored values."""
    with Image.open(path) as image:
        values = np.asarray(image).astype(np.float64)
    if name.startswith("CMYK"):
        c, m, y, k = np.moveaxis(values, -1, 0)
        return np.stack([(255 - c) * (255 - k) / 255, (255 - m) * (255 - k) / 255, (255 - y) * (255 - k) / 255], -1)
    return np.repeat(values[..., None], 3, 2)


def plain_convert_fails(path: Path, reference: np.ndarray, tolerance: int) -> bool:
    with Image.open(path) as image:
        plain = np.asarray(image.convert("RGB")).astype(np.float64)
    return plain.shape != reference.shape or np.abs(plain - reference).max() > tolerance


def check_cli_report(root: Path) -> tuple[int, dict[str, str]]:
    """`python -m fgvc.data.check` on a CUB tree: its exit status and {path: reason} of the files it lists."""
    done = subprocess.run([sys.executable, "-m", "fgvc.data.check", "--dataset", "cub200", "--data-dir", str(root),
                           "--workers", "1"], capture_output=True, text=True)
    listed = {}
    for line in done.stdout.splitlines():
        path, _, reason = line.partition(": ")
        if path.startswith(str(root)):
            listed[path] = reason
    return done.returncode, listed


def loader_passes(root: Path, bad: set[str], seed: int) -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """Each split through an evaluation loader (in order, no workers) and a training loader (shuffled, 2 workers):
    (what, problems, the reasons the loader reported). The batches must hold exactly the readable samples of
    their positions in the epoch's order, each with its own label: nothing substituted, nothing repeated."""
    for split in ("trainval", "test"):
        dataset = CUBDataset(root, split)
        transform = PartAwareTransform(eval_transform(32), dataset.part_names)
        bad_indices = {i for i in range(len(dataset)) if str(dataset.image_path(i)) in bad}
        for train, workers, batch_size in ((False, 0, 5), (True, 2, 4)):
            unreadable = UnreadableImages(split, len(dataset), 1.0, echo=lambda _: None)
            loader = build_loader(dataset, transform, batch_size=batch_size, seed=seed, train=train,
                                  unreadable=unreadable, workers=workers)
            loader.set_epoch(1)
            got = [batch for batch in loader]
            order = EpochSampler(len(dataset), seed=seed, shuffle=train).order(1)
            chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            if train:
                chunks = [chunk for chunk in chunks if len(chunk) == batch_size]
            expected = [[i for i in chunk if i not in bad_indices] for chunk in chunks]
            seen = [batch["index"].tolist() if batch else [] for batch in got]
            problems = []
            if seen != expected:
                problems.append(f"batch indices {seen} instead of {expected}")
            labels = [(i, int(label)) for batch in got if batch for i, label in zip(batch["index"].tolist(),
                                                                                   batch["label"], strict=True)]
            wrong = [i for i, label in labels if label != int(dataset.targets[i])]
            if wrong:
                problems.append(f"labels of other samples at indices {wrong}")
            what = f"{split} split, {'training' if train else 'evaluation'} loader, {workers} workers"
            yield what, problems, dict(unreadable.reasons)


def r3_bad_images(args: argparse.Namespace, workdir: Path) -> Outcome:
    """Corrupt files are each named with their reason by `python -m fgvc.data.check` and by the loader, which
    leaves them out of their batch and never substitutes another sample; odd modes decode as fgvc.data.images
    documents (16-bit scaled, alpha over white, EXIF applied, ...), checked against references computed from the
    stored values. Trials: one per file, one per loader pass."""
    outcome, rng = Outcome(), np.random.default_rng([args.seed, 3])
    root = workdir / "r3" / "CUB_200_2011"
    shutil.rmtree(root.parent, ignore_errors=True)
    shutil.copytree(birds(workdir), root)
    relative = [line.split(" ", 1)[1] for line in (root / "images.txt").read_text().splitlines()]
    corrupt, odd = corrupt_files(rng), odd_files(rng)
    chosen = rng.permutation(len(relative))[: len(corrupt) + len(odd)]
    paths = [root / "images" / relative[i] for i in chosen]
    corrupt_paths = dict(zip(corrupt, paths[: len(corrupt)], strict=True))
    odd_paths = dict(zip(odd, paths[len(corrupt) :], strict=True))
    for name, (content, _) in corrupt.items():
        corrupt_paths[name].write_bytes(content)
    expected = {}
    for name, (write, reference, tolerance) in odd.items():
        write(odd_paths[name])
        expected[name] = (reference if reference is not None else stored_reference(name, odd_paths[name]), tolerance)
    status, listed = check_cli_report(root)
    bad = {str(path) for path in corrupt_paths.values()}
    passes = list(loader_passes(root, bad, args.seed))
    reported: dict[str, str] = {}
    for _, _, reasons in passes:
        reported.update(reasons)
    if status != 1:
        outcome.notes.append(f"`python -m fgvc.data.check` exited {status}, not 1")
    for name, (_, words) in corrupt.items():
        path = str(corrupt_paths[name])
        problems = []
        if words not in listed.get(path, ""):
            problems.append(f"fgvc.data.check said {listed.get(path, 'nothing')!r}, not a reason with {words!r}")
        if words not in reported.get(path, ""):
            problems.append(f"the loader reported {reported.get(path, 'nothing')!r}, not a reason with {words!r}")
        outcome.trial(f"corrupt: {name}", problems)
    place = {}
    for split in ("trainval", "test"):
        dataset = CUBDataset(root, split)
        place.update({str(dataset.image_path(i)): (dataset, i) for i in range(len(dataset))})
    for name, (reference, tolerance) in expected.items():
        path = str(odd_paths[name])
        problems = []
        if path in listed or path in reported:
            problems.append(f"refused: {listed.get(path) or reported.get(path)}")
        else:
            dataset, index = place[path]
            image = dataset[index]["image"]
            if image.shape != reference.shape or image.dtype != np.uint8:
                problems.append(f"decoded as {image.dtype} {image.shape}, expected uint8 {reference.shape}")
            elif (error := np.abs(image.astype(np.float64) - reference).max()) > tolerance:
                problems.append(f"pixels off by up to {error:.0f} from the reference (tolerance {tolerance})")
        outcome.trial(f"odd mode: {name}", problems)
    for what, problems, _ in passes:
        outcome.trial(f"no substitutes: {what}", problems)
    naive = sum(plain_convert_fails(odd_paths[name], *expected[name]) for name in expected)
    outcome.notes.append(f"{len(corrupt)} corrupt and {len(odd)} odd-mode files in place of random images of the "
                         "60-image tree; `fgvc.data.check` as a process, the loaders in this one. Control: a plain "
                         f"`Image.open(path).convert(\"RGB\")` fails {naive} of the {len(odd)} odd-mode trials.")
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# R4: malformed annotation files
# ---------------------------------------------------------------------------------------------------------------


def edit_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def check_says(dataset: str, root: Path) -> tuple[int, str]:
    """`python -m fgvc.data.check` in this process: (status, stderr); an exception escaping it is a traceback."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = check_main(["--dataset", dataset, "--data-dir", str(root), "--workers", "1"])
    except Exception as error:  # what a user would see as a traceback
        return -1, f"{type(error).__name__}: {error}"
    return status, err.getvalue()


def malformed_cases(workdir: Path) -> Iterator[tuple[str, str, Path, str, str]]:
    """(dataset kind, what is wrong, data dir, the place the error must name, words it must contain), each made
    in a fresh copy of a tree in the layout the dataset ships in."""
    def cub(name: str) -> Path:
        root = workdir / "r4" / name / "CUB_200_2011"
        shutil.copytree(birds(workdir), root)
        return root

    root = cub("id")
    edit_line(root / "images.txt", 7, "seven 001.x/y.jpg")
    yield "cub200", "images.txt: an image id that is not a number", root, f"{root / 'images.txt'}:7:", "image id"
    root = cub("missing")
    first = (root / "images.txt").read_text().splitlines()[3].split(" ", 1)[1]
    (root / "images" / first).unlink()
    yield "cub200", "images.txt: a listed image file missing", root, f"{root / 'images.txt'}:4:", "not found"
    root = cub("class")
    edit_line(root / "image_class_labels.txt", 12, "12 201")
    yield ("cub200", "image_class_labels.txt: class id out of range", root,
           f"{root / 'image_class_labels.txt'}:12:", "out of range")
    root = cub("split")
    edit_line(root / "train_test_split.txt", 5, "4 1")
    yield ("cub200", "train_test_split.txt: an image listed twice", root, f"{root / 'train_test_split.txt'}:5:",
           "already has")
    root = cub("boxes")
    text = (root / "bounding_boxes.txt").read_text()
    (root / "bounding_boxes.txt").write_text(text[: text.rstrip().rfind(" ")])  # cut inside the last line
    lines = text.count("\n")
    yield ("cub200", "bounding_boxes.txt: truncated inside its last line", root,
           f"{root / 'bounding_boxes.txt'}:{lines}:", "expected 5 fields")
    root = cub("inf")
    edit_line(root / "bounding_boxes.txt", 9, "9 1.0 2.0 inf 4.0")
    yield "cub200", "bounding_boxes.txt: an infinite width", root, f"{root / 'bounding_boxes.txt'}:9:", "finite"
    root = cub("parts")
    edit_line(root / "parts" / "part_locs.txt", 33, "3 3 10.0 10.0 2")
    yield "cub200", "part_locs.txt: visible 2", root, f"{root / 'parts' / 'part_locs.txt'}:33:", "visible"
    root = cub("certainty")
    labels = root / "attributes" / "image_attribute_labels.txt"
    edit_line(labels, 50, " ".join(labels.read_text().splitlines()[49].split()[:3] + ["7", "0.0"]))
    yield "cub200", "image_attribute_labels.txt: certainty 7", root, f"{labels}:50:", "certainty"
    root = cub("utf8")
    (root / "classes.txt").write_bytes((root / "classes.txt").read_bytes().replace(b"\n3 ", b"\n3 Caf\xe9 ", 1))
    yield "cub200", "classes.txt: a Latin-1 byte, not UTF-8", root, f"{root / 'classes.txt'}:3:", "not UTF-8"

    data = make_aircraft(workdir / "r4" / "aircraft-class") / "fgvc-aircraft-2013b" / "data"
    edit_line(data / "images_variant_train.txt", 2, "1025794 Cessna 999")
    yield ("aircraft100", "images_variant_train.txt: a class not in variants.txt", data,
           f"{data / 'images_variant_train.txt'}:2:", "not in variants.txt")
    data = make_aircraft(workdir / "r4" / "aircraft-box") / "fgvc-aircraft-2013b" / "data"
    edit_line(data / "images_box.txt", 3, f"{(data / 'images_box.txt').read_text().split()[10]} 30 4 3 39")
    yield "aircraft100", "images_box.txt: xmax below xmin", data, f"{data / 'images_box.txt'}:3:", "xmax"
    data = make_aircraft(workdir / "r4" / "aircraft-utf8") / "fgvc-aircraft-2013b" / "data"
    (data / "variants.txt").write_bytes((data / "variants.txt").read_bytes().replace(b"Cessna", b"C\xe9ssna", 1))
    line = next(n for n, text in enumerate((data / "variants.txt").read_bytes().split(b"\n"), 1) if b"\xe9" in text)
    yield ("aircraft100", "variants.txt: a Latin-1 byte, not UTF-8", data, f"{data / 'variants.txt'}:{line}:",
           "UTF-8")

    for field_name, value, words in (("class", 4, "class = 4 outside"), ("bbox_x2", 0, "empty box")):
        base = make_cars_split_layout(workdir / "r4" / f"cars-{field_name}")
        records = car_records("train")
        records[2][field_name] = value
        mat = base / "devkit" / "cars_train_annos.mat"
        scipy.io.savemat(mat, {"annotations": struct_array(records)})
        yield "cars196", f"cars_train_annos.mat: {words.split(' =')[0]} of record 2", base, f"{mat}: annotations[2]", \
            words

    root = make_folder_tree(workdir / "r4" / "folder", splits=("train", "val", "test"))
    shutil.copytree(root / "val" / "c", root / "val" / "stray")
    yield "folder", "val/ with a class folder train/ lacks", root, f"{root / 'val'}:", "stray"


def r4_bad_annotations(args: argparse.Namespace, workdir: Path) -> Outcome:
    """Each malformed annotation file gets one `error:` line (an FGVCError) from `python -m fgvc.data.check` that
    names the file and line (for MATLAB files the record, for ImageFolder trees the folder) and what is wrong.
    Trials: one per kind of damage."""
    outcome = Outcome()
    kinds = set()
    for dataset, what, root, place, words in malformed_cases(workdir):
        kinds.add(dataset)
        status, err = check_says(dataset, root)
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if status == -1:
            problems.append(f"a traceback ending in {err}")
        elif status != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"status {status}, stderr {err.strip()[:300]!r}")
        elif not lines[0].startswith(f"error: {place}") or words not in lines[0]:
            problems.append(f"the error does not name {place!r} and {words!r}: {lines[0][:300]!r}")
        outcome.trial(f"{dataset}: {what}", problems)
    outcome.notes.append(f"Datasets: {', '.join(sorted(kinds))}; `fgvc.data.check`'s main() called in this process "
                         "(its `command` wrapper, as the CLI runs it; an exception escaping it would be a traceback).")
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# R5: disk full, truncation, flipped bits
# ---------------------------------------------------------------------------------------------------------------

# Run inside the child: save generation 1, then generation 2 too large for the disk (tmpfs) or the file-size limit.
SAVE_CHILD = """
import json, os, resource, signal, subprocess, sys, torch
from fgvc.engine.checkpoint import load_checkpoint, save_checkpoint
folder, size, limit, first, second = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
os.makedirs(folder, exist_ok=True)
if size:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], check=True)
path = os.path.join(folder, "last.pt")
save_checkpoint(path, {"generation": 1, "w": torch.ones(first // 4)})
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(path, {"generation": 2, "w": torch.ones(second // 4)})
    error = None
except Exception as caught:
    error = f"{type(caught).__name__}: {caught}"
kept = load_checkpoint(path)
print(json.dumps({"error": error, "generation": kept["generation"], "intact": bool((kept["w"] == 1).all())
                  and len(kept["w"]) == first // 4, "files": sorted(os.listdir(folder))}))
"""

# Inside a user and mount namespace: a tmpfs as the output folder, then a training run that fills it.
TRAIN_CHILD = """
import json, os, subprocess, sys
from fgvc.engine.checkpoint import load_checkpoint
folder, size, train = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(folder, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], check=True)
done = subprocess.run([sys.executable, "-m", "fgvc.train", *train], capture_output=True, text=True)
run = os.path.join(folder, "full")
step = load_checkpoint(os.path.join(run, "last.pt"))["state"]["step"] if os.path.isfile(os.path.join(run, "last.pt")) \
    else None
print(json.dumps({"status": done.returncode, "stderr": done.stderr, "step": step, "files": sorted(os.listdir(run))}))
"""


def namespaced(code: str, *argv: str) -> dict | str:
    """Run `code` as root of a new user + mount namespace (`unshare -rm`): its JSON result, or why it could not run."""
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        return f"unshare -rm failed ({done.returncode}): {done.stderr.strip()[-300:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def limited(limit: int) -> Callable[[], None]:
    """A preexec_fn: files larger than `limit` bytes cannot be written (write() fails with EFBIG)."""
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def failed_save(result: dict | str, path_words: str, says: str) -> list[str]:
    if isinstance(result, str):
        return [result]
    problems = []
    if result["error"] is None or "WriteError" not in result["error"] or path_words not in result["error"]:
        problems.append(f"raised {result['error']!r}, not a WriteError naming {path_words}")
    elif says not in result["error"]:
        problems.append(f"the error says {result['error']!r}, not {says!r}")
    if result["generation"] != 1 or not result["intact"]:
        problems.append(f"the previous checkpoint is not intact (generation {result['generation']})")
    if result["files"] != ["last.pt"]:
        problems.append(f"files left: {result['files']}")
    return problems


def damaged_load(path: Path, data: bytes, original: dict) -> str | None:
    """None when a damaged copy is refused with CheckpointError (or loads the very same state); else a problem."""
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():  # torch warns about the odd pickle protocols some flips make
            warnings.simplefilter("ignore")
            loaded = load_checkpoint(path)
    except CheckpointError:
        return None
    except Exception as error:
        return f"{type(error).__name__} instead of CheckpointError: {str(error)[:120]}"
    if same_state(loaded, original):
        return "identical"
    return "loaded silently, with a different state"


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def r5_disk_full_and_damage(args: argparse.Namespace, workdir: Path) -> Outcome:
    """A save that fails for lack of space (a full tmpfs in a user + mount namespace: ENOSPC) or of the file-size
    limit (RLIMIT_FSIZE: EFBIG), in the library and in a training run, keeps the previous checkpoint loadable and
    leaves no temp file, and the error names the file; a checkpoint truncated at a random length, or with one bit
    flipped at a random position, is refused on load with CheckpointError; then every byte of a small checkpoint in
    turn gets one flipped bit (random), the wrapper's keys and zip structure included. A flip that loads the
    identical state passes (the SHA-256 guards what is loaded). --trials: truncations, and random flips."""
    outcome, rng = Outcome(), np.random.default_rng([args.seed, 5])
    data, runs = birds(workdir), workdir / "r5"
    stopped = quietly(scratch_preset(tiny_overrides(data, runs, "stopped")), stop_after_steps=2).run_dir
    last = stopped / "last.pt"
    size = last.stat().st_size

    for first, second in ((200_000, 2_000_000), (1_000_000, 1_500_000)):
        disk = int(first * 1.6 + 20_000)  # room for the first checkpoint, not for the second beside it
        result = namespaced(SAVE_CHILD, str(workdir / "r5" / "tmpfs"), str(disk), "0", str(first), str(second))
        outcome.trial(f"full tmpfs ({disk} bytes), library save of {second} bytes after {first}",
                      failed_save(result, "last.pt", "disk full while writing"))
        result = subprocess.run([sys.executable, "-c", SAVE_CHILD, str(runs / f"limit-{first}"), "0",
                                 str((first + second) // 2), str(first), str(second)], capture_output=True, text=True)
        parsed = json.loads(result.stdout.splitlines()[-1]) if result.returncode == 0 else result.stderr[-300:]
        outcome.trial(f"RLIMIT_FSIZE {(first + second) // 2} bytes, library save of {second} bytes after {first}",
                      failed_save(parsed, "last.pt", "File too large"))
        if isinstance(parsed, dict):
            outcome.notes.append(f"RLIMIT_FSIZE (EFBIG) makes fgvc.files.write_atomically say: {parsed['error']}")

    # A training run whose output folder is a tmpfs with room for one last.pt (and best.pt) but not a second.
    disk = str(int(size * 1.5))
    overrides = ["--config", SCRATCH_PRESET, *tiny_overrides(data, workdir / "r5" / "tmpfs-run", "full"),
                 "train.checkpoint_every=1"]
    result = namespaced(TRAIN_CHILD, str(workdir / "r5" / "tmpfs-run"), disk, *overrides)
    problems = []
    if isinstance(result, str):
        problems.append(result)
    else:
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        if result["status"] != 2 or len(lines) != 1 or "disk full while writing" not in lines[0] \
                or "last.pt" not in lines[0]:
            problems.append(f"status {result['status']}, stderr {result['stderr'].strip()[-300:]!r}")
        if result["step"] != 1:
            problems.append(f"last.pt holds step {result['step']}, not the previous checkpoint's 1")
        if any(name.endswith(".tmp") for name in result["files"]):
            problems.append(f"temp files left: {result['files']}")
    outcome.trial(f"training run on a full tmpfs ({disk} bytes, train.checkpoint_every=1)", problems)

    # The run stopped at step 2, resumed under a file-size limit below one last.pt.
    limited_run = runs / "limited"
    shutil.copytree(stopped, limited_run)
    process = finished("train", ["--resume", str(limited_run)], runs / "limited-resume", preexec_fn=limited(size // 2))
    problems = one_error_line(process)
    if not problems and "last.pt" not in error_line(process):
        problems.append(f"the error does not name last.pt: {error_line(process)!r}")
    if checkpoint_step(limited_run / "last.pt") != 2:
        problems.append(f"last.pt holds step {checkpoint_step(limited_run / 'last.pt')}, not the previous 2")
    if leftovers(limited_run):
        problems.append(f"temp files left: {leftovers(limited_run)}")
    outcome.trial(f"--resume under RLIMIT_FSIZE {size // 2} bytes (last.pt is {size})", problems)
    if not problems:
        outcome.notes.append(f"A training run under RLIMIT_FSIZE prints: {error_line(process)}")

    original, payload = load_checkpoint(last), last.read_bytes()
    damaged = runs / "damaged.pt"
    identical = 0
    for _ in range(args.trials):
        length = int(rng.integers(0, size))
        problem = damaged_load(damaged, payload[:length], original)
        identical += problem == "identical"
        outcome.trial(f"truncated at {length} of {size} bytes", [] if problem is None else [problem])
    for _ in range(args.trials):
        position, bit = int(rng.integers(0, size)), int(rng.integers(0, 8))
        flipped = bytearray(payload)
        flipped[position] ^= 1 << bit
        problem = damaged_load(damaged, bytes(flipped), original)
        identical += problem == "identical"
        outcome.trial(f"bit {bit} flipped at byte {position} of {size}", [] if problem in (None, "identical")
                      else [problem])

    # Every byte of a small checkpoint, one random bit each: the wrapper's pickle (keys, format, SHA-256), the zip
    # headers and directory, the payload.
    small = runs / "small.pt"
    save_checkpoint(small, {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "state": {"step": 3}, "classes": ["a"]})
    content, inner = small.read_bytes(), load_checkpoint(small)
    swept = {"refused": 0, "identical": 0}
    for position in range(len(content)):
        bit = int(rng.integers(0, 8))
        flipped = bytearray(content)
        flipped[position] ^= 1 << bit
        problem = damaged_load(damaged, bytes(flipped), inner)
        if problem is None:
            swept["refused"] += 1
        elif problem == "identical":
            swept["identical"] += 1
        else:
            outcome.trial(f"sweep: bit {bit} flipped at byte {position} of {len(content)} "
                          f"({content[max(0, position - 6) : position + 6]!r})", [problem])
            continue
        outcome.trials += 1
    outcome.notes.append(
        f"Truncations and random flips in a real last.pt ({size} bytes, the tiny run stopped at step 2): flips that "
        f"loaded the identical state {identical} (bytes of the zip container that torch does not read). Sweep over "
        f"every byte of a {len(content)}-byte checkpoint: {swept['refused']} refused with "
        f"CheckpointError, {swept['identical']} loaded the identical state (zip header fields, padding and the "
        "central directory's copies, which torch's reader does not use: the SHA-256 covers the payload, and a flip "
        "there cannot change what is loaded); the rest are failures below.")
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# R6: malicious pickles through every load path
# ---------------------------------------------------------------------------------------------------------------


def evil_files(marker: Path) -> dict[str, bytes]:
    """Each way a checkpoint file can carry code: the wrapper itself, a payload whose SHA-256 is right (the
    attacker computes it), a bare pickle."""
    inner = torch_zip({"model": Plant(marker), "config": {}, "classes": ["a"]})
    return {
        "wrapper": torch_zip({"format": FORMAT, "sha256": "0", "payload": Plant(marker)}),
        "payload with a valid SHA-256": torch_zip({"format": FORMAT, "sha256": hashlib.sha256(inner).hexdigest(),
                                                   "payload": torch.frombuffer(bytearray(inner), dtype=torch.uint8)}),
        "bare pickle": pickle.dumps({"model": Plant(marker)}),
    }


def fires(data: bytes, marker: Path, inner: bool) -> bool:
    """The control: loaded with weights_only=False, does the file run its code (so that the trials mean something)?"""
    value = torch.load(io.BytesIO(data), weights_only=False) if not data.startswith(b"\x80") else pickle.loads(data)
    if inner:
        torch.load(io.BytesIO(value["payload"].numpy().tobytes()), weights_only=False)
    return marker.exists()


def r6_malicious_pickles(args: argparse.Namespace, workdir: Path) -> Outcome:
    """A pickle whose unpickling would create a marker file, through every load path -- load_checkpoint,
    `train --resume` (as last.pt), model.pretrained_file (.pth and .pt), `evaluate`, `predict` and `visualize
    --checkpoint`, the linear probe's feature cache file on resume -- with and without
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: the marker is never created, and each path fails with a clear error (exit
    status 2 and one `error:` line; CheckpointError in the library). Trials: one per path, file kind and setting."""
    outcome = Outcome()
    data, runs = birds(workdir), workdir / "r6"
    folder = runs / "files"
    folder.mkdir(parents=True, exist_ok=True)
    control = folder / "control-marker"
    for kind, content in evil_files(control).items():
        control.unlink(missing_ok=True)
        if not fires(content, control, kind.startswith("payload")):
            outcome.trial(f"control: {kind} runs its code under weights_only=False", ["it did not: the trials below "
                                                                                      "prove nothing"])
    control.unlink(missing_ok=True)
    stopped = quietly(scratch_preset(tiny_overrides(data, runs, "stopped")), stop_after_steps=2).run_dir
    probe = quietly(scratch_preset([*tiny_overrides(data, runs, "probe"), "transfer.mode=linear_probe",
                                          "transfer.cache_location=file"]), stop_after_steps=2).run_dir
    image = next((data / "images").rglob("*.jpg"))
    plant = Planter(folder)
    cases: list[tuple[str, str, str, list[str], Path]] = []  # (label, env value, tool, argv, marker)
    for env in ("", "1"):
        setting = " with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" if env else ""
        for kind in ("wrapper", "payload with a valid SHA-256", "bare pickle"):
            path, marker = plant(lambda marker, kind=kind: evil_files(marker)[kind])
            with patched_env("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", env):
                try:
                    load_checkpoint(path)
                    problems = ["loaded without an error"]
                except CheckpointError:
                    problems = []
                except Exception as error:
                    problems = [f"{type(error).__name__} instead of CheckpointError: {str(error)[:150]}"]
            if marker.exists():
                problems.insert(0, "THE CODE RAN (marker created)")
            outcome.trial(f"load_checkpoint, {kind}{setting}", problems)
        for kind in ("wrapper", "payload with a valid SHA-256"):
            for tool in ("evaluate", "predict", "visualize"):
                path, marker = plant(lambda marker, kind=kind: evil_files(marker)[kind])
                argv = ["--checkpoint", str(path), *([str(image)] if tool == "predict" else [])]
                cases.append((f"fgvc.{tool} --checkpoint, {kind}{setting}", env, tool, argv, marker))
            path, marker = plant(lambda marker, kind=kind: evil_files(marker)[kind])
            run_dir = runs / f"resume-{path.stem}"
            shutil.copytree(stopped, run_dir)
            shutil.copy(path, run_dir / "last.pt")
            cases.append((f"fgvc.train --resume, last.pt = {kind}{setting}", env, "train", ["--resume", str(run_dir)],
                          marker))
        for suffix, kind, dump in ((".pth", "torch.save", torch_zip), (".pt", "bare pickle", pickle.dumps)):
            path, marker = plant(lambda marker, dump=dump: dump({"conv1.weight": Plant(marker)}), suffix)
            cases.append((f"fgvc.train model.pretrained_file=*{suffix} ({kind}){setting}", env, "train",
                          run_args(data, runs, f"pretrained-{path.stem}", f"model.pretrained_file={path}"), marker))
        path, marker = plant(lambda marker: torch_zip({"features": Plant(marker)}), ".safetensors")
        run_dir = runs / f"probe-{path.stem}"
        shutil.copytree(probe, run_dir)
        shutil.copy(path, run_dir / "features" / "train.safetensors")
        cases.append((f"fgvc.train --resume, features/train.safetensors planted{setting}", env, "train",
                      ["--resume", str(run_dir)], marker))
    refusals = []
    for (label, _, _, _, marker), process in zip(cases, processes_two_at_a_time(cases, folder), strict=True):
        problems = one_error_line(process)
        if marker.exists():
            problems.insert(0, "THE CODE RAN (marker created)")
        if outcome.trial(label, problems):
            refusals.append(f"{label}: `{error_line(process)[:160]}`")
    ran = sum(marker.exists() for marker in folder.glob("marker-*"))
    outcome.notes.append(f"Markers created: {ran} of {plant.count} malicious files (controls: each kind of file does "
                         "run its code under weights_only=False). How the paths that passed refused: "
                         + "; ".join(refusals[:2]) + (f"; ... ({len(refusals) - 2} more)" if len(refusals) > 2 else ""))
    return outcome


class Planter:
    """Numbered malicious files, each with a marker of its own, so that a created marker names the path that ran."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.count = folder, 0

    def __call__(self, content: Callable[[Path], bytes], suffix: str = ".pt") -> tuple[Path, Path]:
        self.count += 1
        marker, path = self.folder / f"marker-{self.count}", self.folder / f"evil-{self.count}{suffix}"
        path.write_bytes(content(marker))
        return path, marker


@contextlib.contextmanager
def patched_env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    if value:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def processes_two_at_a_time(cases: list, folder: Path) -> list[Cli]:
    """Run each case's CLI, two at a time (each spends most of its seconds importing torch)."""
    done: list[Cli | None] = [None] * len(cases)
    running: list[tuple[int, Cli]] = []
    for n, (_, env, tool, argv, _) in enumerate(cases):
        while len(running) >= 2:
            running[0][1].wait()
            running.pop(0)
        process = cli(tool, argv, folder / f"case-{n}", env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": env} if env else None)
        done[n] = process
        running.append((n, process))
    for _, process in running:
        process.wait()
    return done  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# R7: a non-finite loss
# ---------------------------------------------------------------------------------------------------------------


def r7_non_finite(args: argparse.Namespace, workdir: Path) -> Outcome:
    """A NaN loss at a random step (the head's training loss poisoned in this process, train.checkpoint_every=1)
    stops the run with a RunError naming that step and the last good checkpoint, which loads, holds the step
    before and is bitwise the checkpoint an unpoisoned run writes there; a learning rate that diverges
    (optim.lr=1e6 and 1e30, SGD, through the CLI) stops with one `error:` line naming the step, any last.pt left
    finite. --trials: poisoned steps."""
    from fgvc.models.heads import Head

    outcome, rng = Outcome(), np.random.default_rng([args.seed, 7])
    data, runs = birds(workdir), workdir / "r7"
    every = ["train.checkpoint_every=1"]
    original = Head.training_losses
    for n in range(args.trials):
        step = int(rng.integers(2, 7))  # 3 steps an epoch, 2 epochs
        calls = []

        def poisoned(self, forward, batch, outputs, criterion, _step=step, _calls=calls):
            _calls.append(1)
            losses = original(self, forward, batch, outputs, criterion)
            return {**losses, "loss": losses["loss"] * float("nan")} if len(_calls) == _step else losses

        problems = []
        Head.training_losses = poisoned
        try:
            quietly(scratch_preset([*tiny_overrides(data, runs, f"nan-{n}"), *every]))
            problems.append("the run completed")
        except trainer.RunError as error:
            message = str(error)
            if f"not finite at step {step} " not in message or f"(step {step - 1}), is kept" not in message:
                problems.append(f"the error does not name step {step} and the kept step {step - 1}: {message}")
        finally:
            Head.training_losses = original
        run_dir = runs / f"nan-{n}"
        if not problems:
            kept = load_checkpoint(run_dir / "last.pt")
            good = quietly(scratch_preset([*tiny_overrides(data, runs, f"good-{n}"), *every]),
                                 stop_after_steps=step - 1)
            if kept["state"]["step"] != step - 1:
                problems.append(f"last.pt holds step {kept['state']['step']}")
            if not all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point()):
                problems.append("last.pt holds non-finite weights")
            problems += bitwise(kept["model"], weights(good.run_dir), f"last.pt against an unpoisoned run's step "
                                                                       f"{step - 1}")
        outcome.trial(f"NaN loss at step {step}", problems)
    for lr in ("1e6", "1e30"):
        name = f"lr-{lr}"
        process = finished("train", run_args(data, runs, name, f"optim.lr={lr}", "optim.name=sgd",
                                             "schedule.warmup_epochs=0", *every), runs / name)
        problems = one_error_line(process)
        line = error_line(process)
        if not problems and ("not finite" not in line or "step" not in line):
            problems.append(f"the error does not say what is not finite at which step: {line!r}")
        last = runs / name / "last.pt"
        if last.is_file():
            kept = load_checkpoint(last)["model"]
            if not all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point()):
                problems.append("last.pt holds non-finite weights")
        outcome.trial(f"optim.lr={lr} (SGD, no warmup): {line.removeprefix('error: ')[:90]}", problems)
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# R9: determinism
# ---------------------------------------------------------------------------------------------------------------


def r9_determinism(args: argparse.Namespace, workdir: Path) -> Outcome:
    """Two identical runs (separate processes) give bitwise-equal final weights, and so do runs with data.workers 0
    and 2. Per train.seed four runs (workers 0, 0, 2, 2) and three comparisons; odd seeds add Mixup and CutMix, so
    that the mixing draws are covered too. --trials: comparisons."""
    outcome = Outcome()
    data, runs = birds(workdir), workdir / "r9"
    seeds, controls = math.ceil(args.trials / 3), []
    for seed in range(args.seed, args.seed + seeds):
        mixing = ("regularization.mixup_alpha=0.8", "regularization.cutmix_alpha=1.0") if seed % 2 else ()
        final = {}
        for workers, copy in ((0, "a"), (0, "b"), (2, "a"), (2, "b")):
            name = f"s{seed}-w{workers}{copy}"
            process = finished("train", run_args(data, runs, name, f"train.seed={seed}", f"data.workers={workers}",
                                                 *mixing), runs / name)
            if process.popen.returncode != 0:
                raise RuntimeError(f"run {name} failed: {process.stderr()[-2000:]}")
            final[(workers, copy)] = weights(runs / name)
        what = f"train.seed={seed}{', Mixup + CutMix' if mixing else ''}"
        comparisons = (((0, "a"), (0, "b"), "two identical runs, data.workers=0"),
                       ((2, "a"), (2, "b"), "two identical runs, data.workers=2"),
                       ((0, "a"), (2, "a"), "data.workers=0 against 2"))
        for first, second, label in comparisons:
            if outcome.trials < args.trials:
                outcome.trial(f"{label}, {what}", bitwise(final[first], final[second], "final weights"))
        controls.append(final[(0, "a")])
    if len(controls) > 1:  # the comparison can tell runs apart: another seed gives other weights
        differ = len(differences(controls[0], controls[1]))
        outcome.notes.append(f"Control: train.seed={args.seed} and {args.seed + 1} differ in {differ} of "
                             f"{len(controls[0])} tensors.")
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# R8: DDP on the CPU against one process; the cost of DDP with one rank
# ---------------------------------------------------------------------------------------------------------------

# 36 training images in 3 global batches of 12 (6 a rank), no dropout; 24 test images in global batches of 10.
R8_RUN = ("data.val_fraction=0", "data.batch_size=12", "data.eval_batch_size=10", "model.drop_rate=0")
R8_GROUP_NORM = ("model.backbone_args.norm_layer=groupnorm1", "optim.name=sgd", "optim.lr=0.05")
R8_TOLERANCE = 1e-5


def ranks(tool: str, args: list[str], logs: Path, *, nproc: int = 2, env: dict[str, str] | None = None) -> Cli:
    """`torchrun --standalone --nproc-per-node N -m fgvc.<tool> ...` to its end."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        popen = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={nproc}", "-m", f"fgvc.{tool}", *args], stdout=stdout,
                                 stderr=stderr, env={**os.environ, **(env or {})})
    process = Cli(popen, out, err)
    if process.wait() != 0:
        raise RuntimeError(f"torchrun fgvc.{tool} failed: {process.stderr()[-2000:]}")
    return process


def parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights without BatchNorm's running statistics, which DDP takes from rank 0's batches."""
    return {key: value for key, value in state.items() if "running_" not in key and "num_batches" not in key}


def largest_difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(float((got[k].double() - expected[k].double()).abs().max()) for k in expected
               if expected[k].is_floating_point())


def r8_ddp_parity(args: argparse.Namespace, workdir: Path) -> Outcome:
    """2 gloo ranks (torchrun) against one process, per train.seed: a BatchNorm model against one process
    accumulating the same two half-batches, bitwise (odd seeds with Mixup and CutMix, whose draws are keyed by the
    half-batch's position); a GroupNorm model against one process on the whole batch, within 1e-5; the 2-rank
    evaluation (the run's final test, and `fgvc.evaluate` under torchrun) against one process evaluating the same
    checkpoint, exactly, each of the 24 test images counted once. --trials: comparisons (3 a seed)."""
    outcome = Outcome()
    data, runs = birds(workdir), workdir / "r8"
    worst = 0.0
    for seed in range(args.seed, args.seed + math.ceil(args.trials / 3)):
        mixing = ("regularization.mixup_alpha=0.8", "regularization.cutmix_alpha=1.0") if seed % 2 else ()
        run = (*R8_RUN, f"train.seed={seed}", *mixing)
        two = runs / f"bn-2ranks-s{seed}"
        ranks("train", run_args(data, runs, two.name, *run), runs / two.name)
        one = quietly(scratch_preset([*tiny_overrides(data, runs, f"bn-accumulated-s{seed}"), *run,
                                      "data.batch_size=6", "train.grad_accum=2"]))
        what = f"train.seed={seed}{', Mixup + CutMix' if mixing else ''}"
        outcome.trial(f"BatchNorm, 2 ranks against 1 process accumulating the half-batches, {what}",
                      bitwise(parameters(weights(two)), parameters(weights(one.run_dir)), "weights"))
        group_norm = (*R8_RUN, f"train.seed={seed}", *R8_GROUP_NORM)
        ranks("train", run_args(data, runs, f"gn-2ranks-s{seed}", *group_norm), runs / f"gn-2ranks-s{seed}")
        whole = quietly(scratch_preset([*tiny_overrides(data, runs, f"gn-1process-s{seed}"), *group_norm]))
        difference = largest_difference(weights(runs / f"gn-2ranks-s{seed}"), weights(whole.run_dir))
        worst = max(worst, difference)
        outcome.trial(f"GroupNorm, 2 ranks against 1 process on the whole batch, train.seed={seed}: largest "
                      f"difference {difference:.1e}",
                      [f"{difference:.2e} > {R8_TOLERANCE:g}"] if not difference <= R8_TOLERANCE else [])
        outcome.trial(f"evaluation, 2 ranks against 1 process, train.seed={seed}", sharded_evaluation(two, runs))
    outcome.notes.append(f"GroupNorm: the largest weight difference over all seeds was {worst:.1e} (tolerance "
                         f"{R8_TOLERANCE:g}). The BatchNorm comparison leaves out the running statistics: DDP takes "
                         "them from rank 0's half, one process from both.")
    return outcome


def sharded_evaluation(run_dir: Path, runs: Path) -> list[str]:
    """The run's 2-rank final test and a 2-rank `fgvc.evaluate` against one process evaluating best.pt."""
    problems = []
    single = evaluate_checkpoint(run_dir / "best.pt", split="test", batch_size=10).rows["single crop"]
    if json.loads((run_dir / "results.json").read_text())["test"] != single:
        problems.append("the 2-rank final test differs from 1 process")
    output = runs / f"{run_dir.name}-evaluated.json"
    ranks("evaluate", ["--checkpoint", str(run_dir / "best.pt"), "--batch-size", "10", "--output", str(output),
                       "--save-probabilities"], runs / f"{run_dir.name}-evaluate")
    report = json.loads(output.read_text())
    if {key: report[key] for key in single} != single:
        problems.append("2-rank fgvc.evaluate differs from 1 process")
    lines = output.with_name(f"{output.stem}-probabilities.jsonl").read_text().splitlines()
    indices = sorted(json.loads(line)["index"] for line in lines)
    if indices != list(range(report["images"])):
        problems.append(f"{len(indices)} predictions for {report['images']} images, {len(set(indices))} distinct")
    return problems


# The scratch preset on 40% of its data (864 training images, 54 steps an epoch), 3 epochs, 2 threads.
OVERHEAD_RUN = ("data.synthbirds.images_per_class=120", "schedule.epochs=3", "train.threads=2",
                "train.log_every=1000")
OVERHEAD_LIMIT = 5.0  # % of training images/s


def ddp_overhead(args: argparse.Namespace, workdir: Path) -> Outcome:
    """The scratch preset's training throughput (images/s of epochs 2 and 3, from metrics.jsonl) under torchrun
    with 1 rank (process group, DDP, the per-step agreement on stopping and on a finite loss) against the same run
    without torchrun, alternated round by round so that machine noise hits both alike. One trial a round; the
    promise is on the median: at most 5% slower."""
    outcome = Outcome()
    runs = workdir / "overhead"
    env = {"FGVC_DATA_ROOT": str(workdir / "cache")}
    ratios = []
    for n in range(args.trials):
        speeds = {}
        for launcher in ("plain", "ddp"):
            name = f"{launcher}-{n}"
            argv = ["--config", SCRATCH_PRESET, *OVERHEAD_RUN, f"output_dir={runs}", f"run_name={name}"]
            if launcher == "ddp":
                ranks("train", argv, runs / name, nproc=1, env=env)
            else:
                process = finished("train", argv, runs / name, env=env)
                if process.popen.returncode != 0:
                    raise RuntimeError(f"the plain run failed: {process.stderr()[-2000:]}")
            epochs = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["kind"] == "epoch"]
            speeds[launcher] = statistics.mean(epoch["train"]["images_per_s"] for epoch in epochs[1:])
        ratios.append(speeds["plain"] / speeds["ddp"])
        overhead = 100 * (ratios[-1] - 1)
        outcome.trials += 1
        print(f"  round {n + 1}: {speeds['plain']:.1f} img/s plain, {speeds['ddp']:.1f} under torchrun (1 rank): "
              f"{overhead:+.1f}%", flush=True)
    median = 100 * (statistics.median(ratios) - 1)
    if median > OVERHEAD_LIMIT:
        outcome.failed.append(("the median of the rounds", f"{median:.1f}% slower (limit {OVERHEAD_LIMIT:g}%)"))
    outcome.notes.append(f"DDP with 1 rank against no DDP: median {median:+.1f}% of training time over "
                         f"{len(ratios)} rounds (from {100 * (min(ratios) - 1):+.1f}% to "
                         f"{100 * (max(ratios) - 1):+.1f}%). This machine's 2 cores say nothing about scaling: 2 ranks "
                         "share them.")
    return outcome


PROMISES = {
    "R1": Promise(r1_interrupt_resume, "Interrupted at a random step (SIGTERM, or kill -9 after a checkpoint) with "
                  "data.workers 0, 1 or 2, `--resume` ends with final weights bitwise equal to an uninterrupted "
                  "run's", 12),
    "R2": Promise(r2_kill_in_save, "kill -9 at a random moment inside a checkpoint write leaves no torn "
                  "checkpoint (each last.pt / best.pt loads, SHA-256 verified), and every run resumes to its end", 20),
    "R3": Promise(r3_bad_images, "Corrupt image files are each named with their reason (`fgvc.data.check` and the "
                  "loader), never substituted; odd modes (16-bit, alpha, palette, CMYK, EXIF, ...) decode as "
                  "documented"),
    "R4": Promise(r4_bad_annotations, "Malformed annotations (CUB, Aircraft, Cars, ImageFolder) give one `error:` "
                  "line naming the file and line (record, folder) and what is wrong"),
    "R5": Promise(r5_disk_full_and_damage, "A save that runs out of disk (ENOSPC) or file size (EFBIG) keeps the "
                  "previous checkpoint and names the file; a truncated or bit-flipped checkpoint is refused with "
                  "CheckpointError", 40),
    "R6": Promise(r6_malicious_pickles, "A malicious pickle never runs through any load path (library, resume, "
                  "pretrained_file, evaluate, predict, visualize, feature cache), even with "
                  "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, and each fails with one `error:` line"),
    "R7": Promise(r7_non_finite, "A non-finite loss stops the run with an error naming the step, keeping the last "
                  "good checkpoint (it loads, its weights finite)", 5),
    "R8": Promise(r8_ddp_parity, "DDP on the CPU (2 gloo ranks under torchrun): bitwise the weights of 1 process "
                  "accumulating the same half-batches (BatchNorm), within 1e-5 of 1 process on the whole batch "
                  "(GroupNorm); 2-rank evaluation exactly 1 process's, each image counted once", 9),
    "R9": Promise(r9_determinism, "Identical runs, and runs with data.workers 0 and 2, give bitwise-equal final "
                  "weights", 6),
    "R10": Promise(ddp_overhead, "DDP with 1 rank (torchrun) trains at most 5% slower than without torchrun "
                   "(median over rounds that alternate the two)", 7),
}


def code_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "fgvc"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {commit}" + (f", with uncommitted changes in {', '.join(changed)}" if changed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PROMISES), metavar="ID", help="run these promises only")
    parser.add_argument("--trials", type=int, help="random trials of each promise that draws them (default: its own)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every random step, delay and position")
    parser.add_argument("--workdir", type=Path, help="keep the runs and files here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write the markdown table here (also printed)")
    args = parser.parse_args()
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be at least 1")
    torch.set_num_threads(1)  # the trainers' own setting (train.threads=1); the other core polls and kills
    start = time.perf_counter()
    results: dict[str, tuple[Outcome, float, str]] = {}
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()) as workdir:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.only or list(PROMISES):
            promise = PROMISES[name]
            trials = args.trials or promise.trials
            print(f"{name}: {promise.what}", flush=True)
            began = time.perf_counter()
            outcome = promise.run(argparse.Namespace(trials=trials, seed=args.seed), workdir)
            command = f"python experiments/reliability.py --only {name}"
            command += f" --trials {trials}" if promise.trials is not None else ""
            command += f" --seed {args.seed}" if args.seed else ""
            results[name] = (outcome, time.perf_counter() - began, command)
    seconds = time.perf_counter() - start

    lines = header("Reliability: fgvc's promises about failures, tried")
    lines += [f"Code: {code_state()}. Data: the tests' 60-image synthbirds tree; runs: the tests' tiny test_resnet "
              f"runs, one torch thread. Seed {args.seed}; {seconds / 60:.1f} minutes in all.", "",
              "| promise | what is promised | trials | failures | reproduce |", "|---|---|---:|---:|---|"]
    for name, (outcome, _, command) in results.items():
        lines.append(f"| {name} | {PROMISES[name].what} | {outcome.trials} | {outcome.failures} | `{command}` |")
    lines += ["", "## What each row tried", "", f"Files of the runs are under `$WORK` (`{workdir}` in this run).", ""]
    for name, (outcome, took, _) in results.items():
        doc = " ".join(PROMISES[name].run.__doc__.split())
        lines += [f"**{name}** ({took:.0f} s). {doc}", ""]
        lines += [f"- {portable(note, workdir)}" for note in outcome.notes]
        lines += [f"- FAILED {count} trial{'s' * (count > 1)}: {what} (in: {where})"
                  for what, count, where in failure_kinds(outcome, workdir)]
        lines.append("")
    emit(lines, args.out)


def portable(text: str, workdir: Path) -> str:
    return text.replace(str(workdir), "$WORK")


def failure_kinds(outcome: Outcome, workdir: Path) -> list[tuple[str, int, str]]:
    """The failed trials grouped by what went wrong (file names' numbers aside): (what, how many, which trials)."""
    kinds: dict[str, list[str]] = {}
    for label, what in outcome.failed:
        what = re.sub(r"\$WORK/[^\s'\"]*", lambda path: re.sub(r"-\d+", "-N", path.group()), portable(what, workdir))
        kinds.setdefault(what if len(what) < 320 else what[:320] + " ...", []).append(label)
    return [(what, len(labels), "; ".join(labels[:4]) + (f"; ... {len(labels) - 4} more" if len(labels) > 4 else ""))
            for what, labels in kinds.items()]


if __name__ == "__main__":
    main()
