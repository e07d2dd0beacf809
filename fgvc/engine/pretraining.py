"""A self-supervised pretraining run on the supervised engine (fgvc.engine.trainer): the same loop, checkpoints,
exact resume, AMP, compilation, logs, progress and torchrun. What differs is an epoch's end -- the k-NN monitor and
the collapse guard instead of validation and model selection -- and the end of the run: the backbone's weights
handed on as a safetensors file, and the evaluations asked for."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save

from fgvc.build import PRETRAINING_COMMAND, build_pretraining, knn_probe, probe_config
from fgvc.config import Config
from fgvc.engine.trainer import Run, RunError, RunResult, run_task, train
from fgvc.files import write_atomically

BACKBONE_FILE = "backbone.safetensors"


def pretrain(cfg: Config, *, resume_dir: str | Path | None = None, stop_after_steps: int | None = None) -> RunResult:
    """Pretrain as cfg.ssl says (see fgvc.engine.trainer.train for resume, stop_after_steps and torchrun). The
    result's `results` name the backbone file and hold the last monitor and the evaluations of ssl.eval."""
    return run_task(cfg, build_pretraining, PretrainingRun, resume_dir=resume_dir, stop_after_steps=stop_after_steps)


class Collapsed(RunError):
    """The embeddings collapsed (every image mapped to nearly one point): more training will not undo it."""


@dataclass
class CollapseGuard:
    """Stops a run whose embedding std (fgvc.ssl.base.embedding_std of D-dimensional embeddings) has stayed below
    `floor` / sqrt(D) for `epochs` epochs in a row. The count lives in the process: a resumed run counts anew."""

    floor: float
    epochs: int
    low: list[float] = field(default_factory=list)  # the std of the latest epochs in a row below the floor

    def check(self, std: float, dim: int, epoch: int) -> None:
        threshold = self.floor / math.sqrt(dim)
        self.low = [*self.low, std] if std < threshold else []
        if len(self.low) >= self.epochs:
            raise Collapsed(f"the embeddings collapsed: their std was {', '.join(f'{v:.2g}' for v in self.low)} in "
                            f"the last {len(self.low)} epochs (up to epoch {epoch}), below the floor "
                            f"ssl.collapse_std / sqrt({dim}) = {threshold:.2g} (spread embeddings give about "
                            f"{1 / math.sqrt(dim):.2g}); lower optim.lr, raise optim.weight_decay or change the "
                            "method's heads")


class PretrainingRun(Run):
    """Run's loop with pretraining's ends: after each epoch the k-NN monitor and the collapse guard (no model
    selection: the last epoch's backbone is the result); after the last, the weights file and the evaluations."""

    command = PRETRAINING_COMMAND

    def __post_init__(self) -> None:
        super().__post_init__()
        ssl = self.setup.config.ssl
        self.guard = CollapseGuard(ssl.collapse_std, ssl.collapse_epochs)

    def end_epoch(self, stats: dict[str, float]) -> None:
        setup, state = self.setup, self.state
        self.distributed.sync_buffers(setup.model)
        record = {"epoch": state.epoch, "train": stats}
        guarded = "embedding_std" in stats  # MAE logs none: it has no collapse to guard against
        if setup.monitor:
            record["knn"] = self.knn("val")
            std = f", embedding std {stats['embedding_std']:.4f}" if guarded else ""
            self.say(f"epoch {state.epoch + 1}/{setup.epochs} val k-NN top-1 {record['knn']['top1']:.2f}%{std}")
        state.epoch, state.batch = state.epoch + 1, 0
        self.log.write("epoch", state.step, **record)
        self.checkpoint_last()
        if not guarded:
            return
        try:
            self.guard.check(stats["embedding_std"], setup.model.embedding_dim, state.epoch)
        except Collapsed as error:
            raise Collapsed(f"{error}; {self.kept_checkpoint()}") from None

    def knn(self, split: str) -> dict[str, float]:
        ssl = self.setup.config.ssl
        return knn_probe(self.setup.config, self.setup.model.evaluated_backbone, self.setup.runtime, split=split,
                         k=ssl.knn_k, temperature=ssl.knn_temperature, distributed=self.distributed)

    def finish(self) -> dict:
        """Write the backbone's weights, then run the evaluations of ssl.eval: what results.json holds."""
        setup = self.setup
        weights = save(setup.model.backbone_weights(), metadata={"backbone": setup.config.model.backbone})
        file = self.run_dir / BACKBONE_FILE
        self.distributed.on_main(lambda: write_atomically(file, weights))
        results: dict = {"backbone_file": BACKBONE_FILE, "method": setup.config.ssl.method,
                         "steps": self.state.step, "evaluations": {}}
        if "knn" in setup.config.ssl.eval:
            results["evaluations"]["knn"] = self.knn("test")
            self.log.write("test", self.state.step, knn=results["evaluations"]["knn"])
        if "linear" in setup.config.ssl.eval:
            probe = self.linear_probe(file)
            results["evaluations"]["linear"] = {"val": probe.val, "test": probe.test, "run_dir": str(probe.run_dir)}
        return results

    def linear_probe(self, backbone_file: Path) -> RunResult:
        """fgvc.train's linear probe of the backbone file in the run folder (resumed when an earlier attempt of it
        was interrupted)."""
        probe = probe_config(self.setup.config, backbone_file, self.run_dir)
        probe_dir = Path(probe.output_dir) / probe.run_name
        started = self.distributed.from_main((probe_dir / "config.yaml").is_file())
        return train(probe, resume_dir=probe_dir if started else None)
