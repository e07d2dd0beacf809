"""A whole run: train with validation-based model selection, resume exactly, and evaluate the selected model once on
the test split. What to train comes from the build layer (fgvc.build); this module only orchestrates."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import fgvc
from fgvc.build import Training, build_distributed, build_training, run_folder, seed_everything, use_cached_features
from fgvc.config import Config, to_dict, to_yaml
from fgvc.data.loader import derived_seed
from fgvc.engine.checkpoint import load_checkpoint, save_checkpoint
from fgvc.engine.distributed import Distributed, launched_by_torchrun
from fgvc.engine.localization import meter_for
from fgvc.engine.logging import MetricsLog, TrainingProgress, dumps, echo
from fgvc.engine.loop import NonFiniteLoss, TrainState, evaluate, train_one_epoch
from fgvc.errors import FGVCError, OutputExists
from fgvc.files import write_atomically

CONFIG_FILE, META_FILE, RESULTS_FILE = "config.yaml", "meta.json", "results.json"
LAST, BEST = "last.pt", "best.pt"


class RunError(FGVCError, RuntimeError):
    """A run that cannot start or continue: its folder, or training that diverged."""


@dataclass
class RunResult:
    run_dir: Path
    completed: bool  # False when stopped early (signal or stop_after_steps); resume to continue
    val: dict[str, float] | None = None  # metrics of the selected checkpoint on the validation split
    test: dict[str, float] | None = None
    best_epoch: int = -1
    seconds: float = 0.0
    results: dict | None = None  # what results.json holds (pretraining: the backbone file and its evaluations)


def train(cfg: Config, *, resume_dir: str | Path | None = None, stop_after_steps: int | None = None) -> RunResult:
    """Train as `cfg` says. With `resume_dir`, continue that run from its `last` checkpoint (cfg must be the run's
    saved config); a run that died before its first checkpoint starts over in its folder. `stop_after_steps` stops
    (and checkpoints) after that many optimizer steps in total, as an interruption would.

    Under torchrun every rank calls this: each trains its part of every global batch (data.batch_size is the
    global batch, the same at any world size, so a checkpoint resumes at another world size), rank 0 alone writes
    the run folder, and a rank that dies stops the others with RankFailed, the last checkpoint kept."""
    return run_task(cfg, build_training, Run, resume_dir=resume_dir, stop_after_steps=stop_after_steps)


def run_task(cfg: Config, build: Callable[[Config, Distributed], Training], run_type: type[Run], *,
             resume_dir: str | Path | None = None, stop_after_steps: int | None = None) -> RunResult:
    """A run of `run_type` (supervised training, Run, or pretraining) on what `build` makes of `cfg`: the run
    folder, resume, compilation, and what a lost rank leaves said; see train()."""
    start = time.perf_counter()
    distributed = build_distributed(cfg.train.device)
    runs: list[Run] = []  # the run, once made: what a lost rank leaves behind is its to say

    def kept() -> str:
        return (f"; {runs[0].kept_checkpoint()}; continue with: {resume_command(runs[0].run_dir, run_type.command)}"
                if runs else "")

    try:
        with distributed.explaining_lost_ranks(kept):
            run_dir = (Path(resume_dir) if resume_dir is not None
                       else distributed.on_main(lambda: unused_run_folder(cfg, run_type.command)))
            setup = build(cfg, distributed)
            state = TrainState()
            if resume_dir is None:
                distributed.on_main(lambda: create_run_dir(run_dir, setup.config))
            else:
                _resume(run_dir, setup, state, run_type.command)
            setup = use_cached_features(setup, run_dir)  # the linear probe's, when it caches them
            if setup.compile:
                setup.model.compile()
            runs.append(run_type(setup, run_dir, MetricsLog(run_dir, enabled=distributed.is_main), state,
                                 _StopRequest(stop_after_steps, distributed.is_main)))
            return runs[0].run(start)
    finally:
        distributed.close()


@dataclass
class Run:
    """The epoch loop of one supervised run: validation, model selection, checkpoints, logs and progress; a task
    with another end of epoch and of run subclasses it (fgvc.engine.pretraining). Every rank runs it in step; rank
    0 alone writes and prints."""

    setup: Training
    run_dir: Path
    log: MetricsLog
    state: TrainState
    stop: _StopRequest
    command: ClassVar[str] = "fgvc.train"  # the module that trains (and resumes) this kind of run

    def __post_init__(self) -> None:
        batches, grad_accum = self.setup.train_loader.batches_per_epoch, self.setup.optimization.grad_accum
        self.distributed = self.setup.distributed
        self.progress = TrainingProgress(self.setup.epochs, batches, -(-batches // grad_accum), self.setup.log_every,
                                         enabled=self.distributed.is_main)
        # The step of the `last` checkpoint on disk (a resumed run's restored one), for what a failure leaves; rank
        # 0's view, as the other ranks may be on nodes that do not see the run folder.
        self.saved_step = self.distributed.from_main(self.state.step if (self.run_dir / LAST).is_file() else None)

    def say(self, message: str) -> None:
        if self.distributed.is_main:
            echo(message)

    def run(self, start: float) -> RunResult:
        """Train what is left and, once complete, test the selected checkpoint and write the results."""
        try:
            with self.stop.on_signals():
                completed = self.epochs()
            if not completed:
                self.say(f"stopped at step {self.state.step}; continue with: "
                         f"{resume_command(self.run_dir, self.command)}")
                return RunResult(self.run_dir, completed=False, seconds=time.perf_counter() - start)
            results = self.finish()
        except NonFiniteLoss as error:
            raise RunError(f"{error}; {self.kept_checkpoint()}, and no checkpoint of non-finite weights was written. "
                           "Lower optim.lr, or look for broken inputs") from None
        finally:
            self.log.close()
        seconds = time.perf_counter() - start
        results["seconds"] = round(seconds, 1)
        self.distributed.on_main(lambda: write_atomically(self.run_dir / RESULTS_FILE, dumps(results, indent=2) + "\n"))
        return RunResult(self.run_dir, completed=True, val=results.get("val"), test=results.get("test"),
                         best_epoch=results.get("best_epoch", -1), seconds=seconds, results=results)

    def epochs(self) -> bool:
        """Train the remaining epochs; False when stopped early (after checkpointing)."""
        setup, state = self.setup, self.state
        while state.epoch < setup.epochs:
            setup.train_loader.set_epoch(state.epoch, start_batch=state.batch)
            self.progress.start_epoch(state.epoch, -(-state.batch // setup.optimization.grad_accum))
            try:
                stats = train_one_epoch(setup.model, setup.criterion, setup.optimization, setup.train_loader,
                                        setup.runtime, state, mixer=setup.mixer, after_step=self.after_step,
                                        ranks=setup.ranks)
            finally:
                self.progress.end_epoch()
            if stats is None:
                if self.saved_step != state.step:  # not written at this step already (train.checkpoint_every)
                    self.checkpoint_last()
                return False
            self.end_epoch(stats)
        return True

    def after_step(self, state: TrainState, running) -> bool:
        logging = state.step % self.setup.log_every == 0
        stats = running() if logging else None  # on every rank: the statistics are summed over ranks
        if logging:
            self.log.write("train", state.step, epoch=state.epoch, **stats)
        self.progress.step(state.epoch, state.batch, stats)
        if self.setup.checkpoint_every and state.step % self.setup.checkpoint_every == 0:
            self.checkpoint_last()
        return self.distributed.any(self.stop.requested(state.step))  # every rank stops at the same step

    def end_epoch(self, stats: dict[str, float]) -> None:
        setup, state = self.setup, self.state
        self.distributed.sync_buffers(setup.model)  # one model on every rank: rank 0's statistics
        record = {"epoch": state.epoch, "train": stats}
        if setup.val_loader is not None:
            record["val"] = evaluate(setup.model, setup.val_loader, setup.runtime, num_classes=len(setup.classes),
                                     distributed=self.distributed)
            self.say(f"epoch {state.epoch + 1}/{setup.epochs} val top-1 {record['val']['top1']:.2f}%")
        state.epoch, state.batch = state.epoch + 1, 0
        # Select on validation (never on test); without a validation split the last epoch is the result.
        score = record["val"]["top1"] if "val" in record else float(state.epoch)
        if score > state.best_top1:
            state.best_top1, state.best_epoch = score, state.epoch
            self.save(BEST, {"model": setup.model.state_dict(), "config": to_dict(setup.config),
                             "classes": setup.classes, "epoch": state.epoch, "val": record.get("val")})
        self.log.write("epoch", state.step, **record)
        self.checkpoint_last()

    def finish(self) -> dict:
        """The selected checkpoint on the test split, once: what results.json holds (its validation metrics, test
        metrics, its epoch)."""
        setup = self.setup
        best = self.distributed.on_main(lambda: load_checkpoint(self.run_dir / BEST))
        setup.model.load_state_dict(best["model"])
        test = evaluate(setup.model, setup.test_loader, setup.runtime, num_classes=len(setup.classes),
                        localization=meter_for(setup.test_loader.dataset), distributed=self.distributed)
        self.log.write("test", self.state.step, checkpoint=BEST, best_epoch=best["epoch"], **test)
        return {"checkpoint": BEST, "best_epoch": best["epoch"], "val": best["val"], "test": test}

    def checkpoint_last(self) -> None:
        setup = self.setup
        optimization = setup.optimization
        self.distributed.sync_buffers(setup.model)  # rank 0's statistics, as DDP's next forward makes them
        rng = self.distributed.gather(_rng_state())  # each rank's stream, so each resumes its own
        self.save(LAST, {"model": setup.model.state_dict(), "optimizer": optimization.optimizer.state_dict(),
                         "scheduler": optimization.scheduler.state_dict(),
                         "scaler": optimization.scaler.state_dict() if optimization.scaler is not None else None,
                         "state": asdict(self.state), "rng": rng[0], "rank_rng": rng[1:], "command": self.command,
                         "config": to_dict(setup.config), "classes": setup.classes})
        self.saved_step = self.state.step

    def save(self, name: str, payload: dict) -> None:
        """Write a checkpoint (rank 0), refusing weights that are no longer finite (the loss may still have been):
        every rank checks, so every rank stops."""
        bad = [key for key, value in payload["model"].items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise RunError(f"the weights are not finite after step {self.state.step} ({', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''}) although the loss was; {self.kept_checkpoint()}, "
                           f"and {name} was not written. Lower optim.lr")
        self.distributed.on_main(lambda: save_checkpoint(self.run_dir / name, payload))

    def kept_checkpoint(self) -> str:
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint, {self.run_dir / LAST} (step {self.saved_step}), is kept"


def resume_command(run_dir: Path, command: str = Run.command) -> str:
    """How to continue the run, with the launcher it was started by and its module (fgvc.train, fgvc.pretrain)."""
    return f"{'torchrun ... ' if launched_by_torchrun() else 'python '}-m {command} --resume {run_dir}"


def _resume(run_dir: Path, setup: Training, state: TrainState, command: str = Run.command) -> None:
    """Restore `last` (rank 0 reads it, every rank gets it); a run folder without one (the run died before its
    first checkpoint) starts over. Rank r resumes the r-th random stream the checkpoint holds (saved by as many
    ranks as it was trained with); a rank it holds none for starts a new one."""
    distributed = setup.distributed
    checkpoint = distributed.on_main(lambda: _read_last(run_dir))
    if checkpoint is None:
        return
    made_by = checkpoint.get("command", Run.command)  # checkpoints from before pretraining came from fgvc.train
    if made_by != command:
        raise RunError(f"{run_dir} is a run of {made_by}; continue it with: python -m {made_by} --resume {run_dir}")
    optimization = setup.optimization
    setup.model.load_state_dict(checkpoint["model"])
    optimization.optimizer.load_state_dict(checkpoint["optimizer"])
    optimization.scheduler.load_state_dict(checkpoint["scheduler"])
    if optimization.scaler is not None:
        optimization.scaler.load_state_dict(checkpoint["scaler"])
    for key, value in checkpoint["state"].items():
        setattr(state, key, value)
    rng = [checkpoint["rng"], *checkpoint.get("rank_rng", [])]
    if distributed.rank < len(rng):
        _set_rng_state(rng[distributed.rank])
    else:
        seed_everything(derived_seed(setup.config.train.seed, distributed.rank, state.step))
    if distributed.is_main:
        echo(f"resuming {run_dir} at epoch {state.epoch + 1}, batch {state.batch}, step {state.step}")


def _read_last(run_dir: Path) -> dict | None:
    """The `last` checkpoint of a run folder, or None (after clearing what the run left) when it has none."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE}")
    if not (run_dir / LAST).is_file():
        echo(f"{run_dir} has no {LAST}: the run stopped before its first checkpoint; starting it over from its "
             f"saved {CONFIG_FILE}")
        for partial in ("metrics.jsonl", BEST, RESULTS_FILE, "tensorboard"):
            path = run_dir / partial
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    stale = sorted(run_dir.rglob(".*.tmp"))  # a save killed mid-write (fgvc.files.write_atomically) leaves its temp
    for path in stale:
        path.unlink()
    if stale:
        echo(f"removed {len(stale)} partial file(s) that interrupted saves left in {run_dir}")
    return load_checkpoint(run_dir / LAST)


def unused_run_folder(cfg: Config, command: str = "fgvc.train") -> Path:
    """The run folder a new run of `cfg` makes, refused when it holds anything."""
    run_dir = run_folder(cfg)
    refuse_used(run_dir, command)
    return run_dir


def refuse_used(run_dir: Path, command: str = "fgvc.train") -> None:
    """A new run never writes into a folder that holds anything."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise OutputExists(f"run folder {run_dir} already exists and is not empty; choose another run_name, or "
                           f"continue it with: python -m {command} --resume {run_dir}")


def create_run_dir(run_dir: Path, cfg: Config) -> Path:
    """A new run folder with the resolved config and where it came from."""
    refuse_used(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / CONFIG_FILE, to_yaml(cfg))  # whole or absent: --resume reads it back
    meta = {"git_commit": _git_commit(), "fgvc": fgvc.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0], "command": sys.argv, "started": datetime.now().isoformat()}
    write_atomically(run_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return run_dir


def _git_commit() -> str | None:
    """The commit of the fgvc source tree, with "-dirty" when it has uncommitted changes; None outside git."""
    source = Path(fgvc.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                       "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (a rank computes on one)
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # a list of every device's in checkpoints written before one device's was kept
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list) else cuda)


class _StopRequest:
    """Stop at the next optimizer step after SIGINT/SIGTERM, or once `after_steps` steps are done. `say`: whether
    this process tells (rank 0's does)."""

    def __init__(self, after_steps: int | None, say: bool = True) -> None:
        self.after_steps, self.say = after_steps, say
        self.signalled = False

    def requested(self, step: int) -> bool:
        return self.signalled or (self.after_steps is not None and step >= self.after_steps)

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signalled:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signalled = True
        if self.say:
            echo(f"received signal {signum}: stopping after this step and saving {LAST} ...")
