"""A whole run: build everything from the config, train with validation-based model selection, resume exactly,
and evaluate the selected model once on the test split."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import fgvc
from fgvc.config import Config, to_dict, to_yaml
from fgvc.data import build_dataset
from fgvc.data.loader import UnreadableImages, build_loader
from fgvc.data.transforms import PartAwareTransform, eval_transform, train_transform
from fgvc.engine.checkpoint import load_checkpoint, save_checkpoint
from fgvc.engine.localization import meter_for
from fgvc.engine.logging import MetricsLog, echo, progress_line
from fgvc.engine.loop import Precision, TrainState, evaluate, train_one_epoch
from fgvc.engine.optim import build_optimizer, build_scheduler
from fgvc.losses import LabelSmoothingCrossEntropy
from fgvc.mixing import Mixer
from fgvc.models import build_model

CONFIG_FILE, META_FILE, RESULTS_FILE = "config.yaml", "meta.json", "results.json"
LAST, BEST = "last.pt", "best.pt"


@dataclass
class RunResult:
    run_dir: Path
    completed: bool  # False when stopped early (signal or stop_after_steps); resume to continue
    val: dict[str, float] | None = None  # metrics of the selected checkpoint on the validation split
    test: dict[str, float] | None = None
    best_epoch: int = -1
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available")
    return device


def build_eval_loader(cfg: Config, dataset, *, wide: bool = False):
    """The evaluation loader (wide: the resized centre square instead of the crop, for ten-crop TTA)."""
    transform = PartAwareTransform(eval_transform(cfg.data.image_size, resize_size=cfg.data.resize_size, wide=wide),
                                   dataset.part_names)
    return build_loader(dataset, transform, batch_size=cfg.data.eval_batch_size or 2 * cfg.data.batch_size,
                        seed=cfg.train.seed, train=False, workers=cfg.data.workers)


def train(cfg: Config, *, resume_dir: str | Path | None = None, stop_after_steps: int | None = None) -> RunResult:
    """Train as `cfg` says. With `resume_dir`, continue that run from its `last` checkpoint (cfg must be the run's
    saved config). `stop_after_steps` stops (and checkpoints) after that many optimizer steps in total, as an
    interruption would."""
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.use_deterministic_algorithms(cfg.train.deterministic)
    _seed_everything(cfg.train.seed)
    run_dir = Path(resume_dir) if resume_dir is not None else create_run_dir(cfg)

    datasets = {"train": build_dataset(cfg.data, "train"), "test": build_dataset(cfg.data, "test")}
    if cfg.data.val_fraction > 0:
        datasets["val"] = build_dataset(cfg.data, "val")
    train_set = datasets["train"]
    num_classes = len(train_set.classes)
    train_loader = build_loader(
        train_set,
        PartAwareTransform(train_transform(cfg.data.image_size, resize_size=cfg.data.resize_size, crop=cfg.data.crop,
                                           crop_scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
                                           color_jitter=cfg.data.color_jitter), train_set.part_names),
        batch_size=cfg.data.batch_size, seed=cfg.train.seed, train=True, workers=cfg.data.workers,
        pin_memory=device.type == "cuda")
    batches_in_epoch = len(train_set) // cfg.data.batch_size  # the loader drops the last incomplete batch
    if batches_in_epoch == 0:
        raise ValueError(f"the train split has {len(train_set)} images, fewer than data.batch_size="
                         f"{cfg.data.batch_size}")
    steps_per_epoch = -(-batches_in_epoch // cfg.train.grad_accum)

    model = build_model(cfg.model, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, steps_per_epoch)
    precision = Precision.from_name(cfg.train.amp, device)
    criterion = LabelSmoothingCrossEntropy(cfg.regularization.label_smoothing)
    mixer = Mixer(cfg.regularization, num_classes, cfg.train.seed)
    state = TrainState()
    if resume_dir is not None:
        _restore(load_checkpoint(run_dir / LAST), model, optimizer, scheduler, precision, state)
        echo(f"resuming {run_dir} at epoch {state.epoch + 1}, batch {state.batch}, step {state.step}")
    if cfg.train.compile:  # in place, so that every pass a method makes (training_step, refine) is compiled
        model.backbone.compile()
        model.head.compile()

    unreadable = {split: UnreadableImages(split, len(dataset), cfg.data.max_bad_fraction, echo)
                  for split, dataset in datasets.items()}
    # Built once, so its persistent workers serve every epoch's validation.
    val_loader = build_eval_loader(cfg, datasets["val"]) if "val" in datasets else None
    log = MetricsLog(run_dir)
    stop = _StopRequest(stop_after_steps)

    def checkpoint_last() -> None:
        save_checkpoint(run_dir / LAST, _training_state(cfg, model, optimizer, scheduler, precision, state,
                                                        train_set.classes))

    def after_step(state: TrainState, running) -> bool:
        if state.step % cfg.train.log_every == 0:
            stats = running()
            log.write("train", state.step, epoch=state.epoch, **stats)
            echo(progress_line(state.epoch, cfg.schedule.epochs, state.batch, batches_in_epoch, stats))
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
            checkpoint_last()
        return stop.requested(state.step)

    with stop.on_signals():
        while state.epoch < cfg.schedule.epochs:
            train_loader.sampler.set_epoch(state.epoch, start=state.batch * cfg.data.batch_size)
            stats = train_one_epoch(model, criterion, optimizer, scheduler, train_loader, state,
                                    batches_in_epoch=batches_in_epoch, device=device, precision=precision,
                                    grad_accum=cfg.train.grad_accum, channels_last=cfg.train.channels_last,
                                    after_step=after_step, unreadable=unreadable["train"],
                                    mixer=mixer if mixer.enabled else None)
            if stats is None:
                checkpoint_last()
                log.close()
                echo(f"stopped at step {state.step}; continue with: python -m fgvc.train --resume {run_dir}")
                return RunResult(run_dir, completed=False, seconds=time.perf_counter() - start)
            record = {"epoch": state.epoch, "train": stats}
            if val_loader is not None:
                val = evaluate(model, val_loader, num_classes=num_classes, device=device,
                               precision=precision, channels_last=cfg.train.channels_last,
                               unreadable=unreadable["val"])
                record["val"] = val
                echo(f"epoch {state.epoch + 1}/{cfg.schedule.epochs} val top-1 {val['top1']:.2f}%")
            state.epoch, state.batch = state.epoch + 1, 0
            # Select on validation (never on test); without a validation split the last epoch is the result.
            score = record["val"]["top1"] if "val" in record else float(state.epoch)
            if score > state.best_top1:
                state.best_top1, state.best_epoch = score, state.epoch
                save_checkpoint(run_dir / BEST, {"model": model.state_dict(), "config": to_dict(cfg),
                                                 "classes": train_set.classes, "epoch": state.epoch,
                                                 "val": record.get("val")})
            log.write("epoch", state.step, **record)
            checkpoint_last()

    best = load_checkpoint(run_dir / BEST, map_location=device)
    model.load_state_dict(best["model"])
    test = evaluate(model, build_eval_loader(cfg, datasets["test"]), num_classes=num_classes, device=device,
                    precision=precision, channels_last=cfg.train.channels_last,
                    localization=meter_for(datasets["test"]), unreadable=unreadable["test"])
    result = RunResult(run_dir, completed=True, val=best["val"], test=test, best_epoch=best["epoch"],
                       seconds=time.perf_counter() - start)
    log.write("test", state.step, checkpoint=BEST, best_epoch=best["epoch"], **test)
    log.close()
    (run_dir / RESULTS_FILE).write_text(json.dumps(
        {"checkpoint": BEST, "best_epoch": best["epoch"], "val": best["val"], "test": test,
         "seconds": round(result.seconds, 1)}, indent=2) + "\n")
    return result


def create_run_dir(cfg: Config) -> Path:
    name = cfg.run_name or (f"{cfg.data.dataset}-{cfg.model.backbone}-{cfg.model.head}-"
                            f"{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(cfg.output_dir).expanduser() / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder {run_dir} already exists and is not empty; choose another run_name, "
                              "or continue it with --resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    meta = {"git_commit": _git_commit(), "fgvc": fgvc.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0], "command": sys.argv, "started": datetime.now().isoformat()}
    (run_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                       "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _training_state(cfg, model, optimizer, scheduler, precision, state, classes) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
            "state": asdict(state), "rng": _rng_state(), "config": to_dict(cfg), "classes": classes}


def _restore(checkpoint: dict, model, optimizer, scheduler, precision, state: TrainState) -> None:
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if precision.scaler is not None:
        precision.scaler.load_state_dict(checkpoint["scaler"])
    for key, value in checkpoint["state"].items():
        setattr(state, key, value)
    _set_rng_state(checkpoint["rng"])


class _StopRequest:
    """Stop at the next optimizer step after SIGINT/SIGTERM, or once `after_steps` steps are done."""

    def __init__(self, after_steps: int | None) -> None:
        self.after_steps = after_steps
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
        echo(f"received signal {signum}: stopping after this step and saving {LAST} ...")
