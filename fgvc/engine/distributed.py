"""torch.distributed as torchrun sets it up: which rank this process is, and the few collectives a run needs.

torchrun is the only launcher (one process per device; multi-node is its rendezvous). A process started without
torchrun is a world of one with no process group, and every method here is then free: training in one process is
exactly what it was. Under torchrun every rank calls the same methods in the same order; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fgvc.errors import FGVCError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(FGVCError, RuntimeError):
    """Another rank failed (rank 0 says why) or could no longer be reached (it died)."""


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or not under torchrun at all): the one that prints results."""
    return not launched_by_torchrun() or int(os.environ["RANK"]) == 0


@dataclass
class Distributed:
    """This process's place among the ranks. `active`: a process group exists (torchrun, even with one rank)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live
    owns_group: bool = False  # made here, so destroyed here (a caller's own group is left alone)

    @classmethod
    def from_environment(cls, device_type: str) -> Distributed:
        """Join torchrun's process group (gloo on CPU, NCCL on CUDA); a world of one outside torchrun. A process
        group the caller has made already is used as it is."""
        if not dist.is_initialized() and not launched_by_torchrun():
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
        owns = not dist.is_initialized()
        if owns:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, True, device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank: every rank gets the same answer, so all stop at the same step."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new tensor on `tensor`'s device)."""
        if not self.active:
            return tensor
        total = tensor.to(self.device, copy=True)
        dist.all_reduce(total)
        return total.to(tensor.device)

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(every rank's `rows` stacked in rank order, where this rank's begin), on every rank. Ranks may hold
        different numbers of rows. The gradient flows back to each rank's own rows, summed over the ranks whose
        losses used them: contrastive negatives gathered this way give every rank's loss the global batch, and with
        equal parts per rank DDP's averaged gradients are those of the global loss (as in one process)."""
        if not self.active:
            return rows, 0
        counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
        sizes = [int(count) for count in counts]
        offset = sum(sizes[: self.rank])
        return _GatherRows.apply(rows, sizes, offset), offset

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 alone and give every rank its result; when it fails with an FGVCError (or an OSError
        naming a file), rank 0 raises it and the others raise RankFailed with its message, so no rank waits for a
        rank that has given up, and none claims what rank 0 failed to do."""
        result, error = _attempt(work) if self.is_main else (None, None)
        failed, shared = self.from_main((_message(error), result))
        _raise_first_failure(error, [(0, failed)])
        return shared

    def main_first(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0, then on the first rank of each other node, then on the rest: what it prepares once
        -- a generated dataset, a download, converted weights -- the later ones find ready, whether the nodes share
        a filesystem or not. A failure in a round stops every rank, as in on_main."""
        rounds = (self.rank == 0, self.rank != 0 and self.local_rank == 0, self.local_rank != 0)
        result = None
        for mine in rounds:
            outcome, error = _attempt(work) if mine else (None, None)
            result = outcome if mine else result
            _raise_first_failure(error, enumerate(self.gather(_message(error))))
        return result

    @contextlib.contextmanager
    def explaining_lost_ranks(self, consequence: Callable[[], str] = lambda: "") -> Iterator[None]:
        """A collective that fails because another rank is gone becomes RankFailed, which says so (and what
        `consequence()` adds: the checkpoint kept); and torchrun's SIGTERM to the survivors, which follows, may no
        longer cut that message short."""
        try:
            yield
        except Exception as error:
            if not (self.active and lost_a_rank(error)):
                raise
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the job is ending; let the message out
            raise RankFailed(f"rank {self.rank} lost contact with another rank, which stopped or died "
                             f"({collective_failure(error)}){consequence()}") from None

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics, class centres) on every rank, as DDP's next forward would make
        them: what is evaluated and saved is then the same model on every rank."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)


class _GatherRows(torch.autograd.Function):
    """all_gather of row blocks of the given sizes (padded to the largest, then cut), with the gradient all-reduced
    and each rank's own rows taken back."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, sizes: list[int], offset: int) -> torch.Tensor:
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: len(rows)] = rows
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded)
        ctx.own = (offset, len(rows))
        return torch.cat([block[:size] for block, size in zip(blocks, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        total = gradient.contiguous().clone()
        dist.all_reduce(total)
        offset, count = ctx.own
        return total[offset : offset + count], None, None


def _attempt(work: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """(work(), None), or (None, the user's error): an FGVCError, or an OSError naming a file (as fgvc.errors.command
    reports them)."""
    try:
        return work(), None
    except FGVCError as error:
        return None, error
    except OSError as error:
        if error.filename is None:
            raise
        return None, error


def _message(error: Exception | None) -> str | None:
    if error is None:
        return None
    return str(error) if isinstance(error, FGVCError) else f"{error.filename}: {error.strerror or error}"


def _raise_first_failure(own: Exception | None, messages: Iterable[tuple[int, str | None]]) -> None:
    """Raise this rank's own error, or RankFailed for the first rank whose message says it failed."""
    if own is not None:
        raise own
    for rank, message in messages:
        if message is not None:
            raise RankFailed(f"rank {rank} stopped: {message}")


def lost_a_rank(error: BaseException) -> bool:
    """Whether a collective failed because another rank is gone: NCCL raises DistErrors, gloo RuntimeErrors that
    say the connection to the peer was lost or timed out."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and not isinstance(error, FGVCError)
        and any(words in str(error) for words in LOST_PEER))


LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out")


def collective_failure(error: BaseException) -> str:
    """The gist of a failed collective ("Connection reset by peer"), without the backend's source location."""
    found = re.search("|".join(map(re.escape, LOST_PEER)), str(error))
    return found.group(0) if found else str(error).splitlines()[0][:200]


class _TrainingStep(nn.Module):
    """FGVCModel.training_step as a module's forward, so that DDP sees every pass a method makes (WS-DAN's crop and
    drop passes included) and reduces their gradients once per step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict, criterion: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        if not batch:  # no readable image: a zero loss of every parameter, whose backward joins the reduction
            zero = sum(parameter.sum() for parameter in self.model.parameters() if parameter.requires_grad) * 0.0
            return {}, {"loss": zero}
        return self.model.training_step(batch, criterion)


class UnreadableBatch(FGVCError, RuntimeError):
    """A rank's whole part of a batch was unreadable where every rank must run every forward (SyncBatchNorm)."""


@dataclass
class DistributedStep:
    """The training step of `model` on every rank: DDP's averaged gradients under torchrun, the plain step in one
    process. Micro-batches accumulated before a step skip DDP's reduction (no_sync) until the last one. Modules
    with state that training updates outside the gradients (WS-DAN's class centers: `defer_updates` and
    `apply_updates`) have every rank's updates summed at each optimizer step."""

    model: nn.Module
    distributed: Distributed = field(default_factory=Distributed)
    ddp: DistributedDataParallel | None = None
    stateful: list[nn.Module] = field(default_factory=list)  # modules whose updates are summed over ranks
    every_forward: bool = False  # each forward is a collective (SyncBatchNorm, gathers), so every rank must run it

    @classmethod
    def create(cls, model: nn.Module, distributed: Distributed) -> DistributedStep:
        if not distributed.active:
            return cls(model, distributed)
        stateful = [module for module in model.modules() if hasattr(module, "defer_updates")]
        for module in stateful:
            module.defer_updates()
        device_ids = [distributed.device.index] if distributed.device.type == "cuda" else None
        # Buffers are not broadcast at every forward (only at the start): rank 0's evolve as they would with it,
        # and sync_buffers makes them every rank's before each evaluation and checkpoint.
        ddp = DistributedDataParallel(_TrainingStep(model), device_ids=device_ids, forward_sync_buffers=False)
        # SyncBatchNorm, and methods that gather negatives or keys from every rank in their forward.
        every_forward = (getattr(model, "collective_forward", False)
                         or any(isinstance(module, nn.SyncBatchNorm) for module in model.modules()))
        return cls(model, distributed, ddp, stateful, every_forward)

    def training_step(self, batch: dict, criterion: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        if self.ddp is None:
            return self.model.training_step(batch, criterion)
        return self.ddp(batch, criterion)

    def check(self, batch: dict) -> None:
        """Under SyncBatchNorm, stop every rank when any rank's part of this batch is wholly unreadable: it could
        not join the other ranks' normalization."""
        if self.every_forward and self.distributed.any(not batch):
            raise UnreadableBatch("a rank's whole part of a batch was unreadable, and train.sync_batchnorm (or a "
                                  "self-supervised method that gathers every rank's embeddings) needs every rank's "
                                  "forward pass on every batch; remove the unreadable images (python -m "
                                  "fgvc.data.check lists them)")

    def joins_reduction(self, batch: dict, reduce: bool) -> bool:
        """Whether a batch with no readable image ({}) must still run a (zero) step: under DDP, on the micro-batch
        whose backward reduces the gradients, which the other ranks wait for. It then counts as zero gradients,
        as an empty batch counts in one process."""
        return not batch and reduce and self.ddp is not None

    @contextlib.contextmanager
    def accumulating(self, reduce: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: `reduce` False defers DDP's gradient reduction."""
        with contextlib.nullcontext() if reduce or self.ddp is None else self.ddp.no_sync():
            yield

    def before_optimizer_step(self) -> None:
        """Apply the stateful modules' updates of this step, summed over ranks (on every rank alike)."""
        for module in self.stateful:
            module.apply_updates(self.distributed.sum)

    def micro_batch(self, batch: int) -> int:
        """The position of this rank's part of global batch `batch` among all micro-batches, as one process that
        accumulates world_size batches per global batch would number them: what random draws per batch key on."""
        return batch * self.distributed.world_size + self.distributed.rank
