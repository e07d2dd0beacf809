"""Training and evaluation under torchrun: the shards of each global batch, parity with one process, resume at
the same and at another world size, the two-node rendezvous, and a job that loses a rank or is told to stop.

The launches are real `torchrun` runs of 2 gloo ranks on the CPU (tiny model, a few steps each)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fgvc import evaluate as evaluate_cli
from fgvc.build import build_training, rank_batch_size
from fgvc.config import ConfigError, load_config
from fgvc.data.loader import EpochSampler, Shard
from fgvc.engine import trainer
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.distributed import Distributed
from fgvc.engine.inference import evaluate_checkpoint
from tests.test_robust_input import break_images
from tests.test_training import assert_bitwise_equal, final_weights, scratch_preset, tiny_overrides

WORKER = Path(__file__).with_name("torchrun_train.py")
LAUNCH_TIMEOUT = 180


def overrides(root: Path, output: Path, name: str, *extra: str) -> list[str]:
    """36 training images in 3 global batches of 12 (6 a rank), no randomness in the model, 24 test images
    evaluated in global batches of 10 (5 a rank), so the last one splits unevenly."""
    return [*tiny_overrides(root, output, name), "data.val_fraction=0", "data.batch_size=12",
            "data.eval_batch_size=10", "model.drop_rate=0", *extra]


GROUP_NORM = ("model.backbone_args.norm_layer=groupnorm1", "optim.name=sgd", "optim.lr=0.05")


def torchrun(*args: str, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT, succeed: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert (done.returncode == 0) == succeed, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_with_ranks(args: list[str], digests: Path, *, stop_after: int = 0, **launch) -> subprocess.CompletedProcess:
    """torchrun of 2 ranks training the scratch preset with `args` through tests/torchrun_train.py, which writes
    each rank's model digests into `digests`."""
    return torchrun(str(WORKER), str(digests), str(stop_after), *args, **launch)


def parameters(state: dict) -> dict[str, torch.Tensor]:
    """The weights, without BatchNorm's running statistics (which DDP takes from rank 0's batches)."""
    return {name: value for name, value in state.items() if "running_" not in name and "num_batches" not in name}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def batchnorm_two_ranks(small_birds: Path, runs: Path) -> Path:
    torchrun("-m", "fgvc.train", *load_overrides(small_birds, runs, "bn-2ranks"))
    return runs / "bn-2ranks"


@pytest.fixture(scope="module")
def group_norm_one_process(small_birds: Path, runs: Path) -> dict:
    result = trainer.train(scratch_preset(overrides(small_birds, runs, "gn-1process", *GROUP_NORM)))
    return final_weights(result.run_dir)


def load_overrides(root: Path, output: Path, name: str, *extra: str) -> list[str]:
    return ["--config", "synthbirds/scratch_isqrt.yaml", *overrides(root, output, name, *extra)]


# ------------------------------------------------------------------------------------------------------------------
# Shards, in one process
# ------------------------------------------------------------------------------------------------------------------


def test_each_rank_takes_its_slice_of_every_global_batch() -> None:
    world, per_rank, count = 3, 2, 20
    samplers = [EpochSampler(count, seed=5, shuffle=True, shard=Shard(rank, world, per_rank), drop_last=True)
                for rank in range(world)]
    order = samplers[0].order(4)
    for sampler in samplers:
        sampler.set_epoch(4)
    taken = [[index for _, index in sampler] for sampler in samplers]
    for batch in range(count // (world * per_rank)):  # 3 whole global batches of 6; the last 2 samples dropped
        for rank in range(world):
            start = batch * world * per_rank + rank * per_rank
            assert taken[rank][batch * per_rank : (batch + 1) * per_rank] == order[start : start + per_rank]
    assert sorted(sum(taken, [])) == sorted(order[:18]) and all(len(part) == 6 for part in taken)
    for sampler in samplers:  # resumed at global batch 2, at any world size
        sampler.set_epoch(4, start=2 * world * per_rank)
    assert [index for _, index in samplers[1]] == order[14:16]
    evaluation = [list(EpochSampler(count, seed=5, shuffle=False, shard=Shard(rank, world, 4))) for rank in range(3)]
    assert sorted(index for part in evaluation for _, index in part) == list(range(count))  # each once, no padding
    assert [len(part) for part in evaluation] == [8, 8, 4]


def test_a_global_batch_splits_evenly_over_ranks_in_training_only() -> None:
    with pytest.raises(ConfigError, match="data.batch_size: 9 images per step .* 2 ranks"):
        rank_batch_size(9, Distributed(world_size=2), "data.batch_size", exact=True)
    assert rank_batch_size(9, Distributed(world_size=2), "batch size", exact=False) == 5


def test_sync_batchnorm_is_refused_on_the_cpu(small_birds: Path, tmp_path: Path) -> None:
    cfg = scratch_preset([*tiny_overrides(small_birds, tmp_path, "sync"), "train.sync_batchnorm=true"])
    with pytest.raises(ConfigError, match="train.sync_batchnorm: SyncBatchNorm needs CUDA"):
        build_training(cfg)


# ------------------------------------------------------------------------------------------------------------------
# Parity with one process (R8)
# ------------------------------------------------------------------------------------------------------------------


def test_two_ranks_equal_one_process_accumulating_their_half_batches(small_birds: Path, runs: Path,
                                                                      batchnorm_two_ranks: Path) -> None:
    """BatchNorm normalizes each rank's half on its own, as one process does each accumulated half-batch: the
    weights are bitwise equal (the running statistics are rank 0's, by DDP's convention)."""
    one = trainer.train(scratch_preset(overrides(small_birds, runs, "bn-accumulated", "data.batch_size=6",
                                                 "train.grad_accum=2")))
    assert_bitwise_equal(parameters(final_weights(batchnorm_two_ranks)), parameters(final_weights(one.run_dir)))
    whole_batch = trainer.train(scratch_preset(overrides(small_birds, runs, "bn-whole-batch")))
    assert max_difference(parameters(final_weights(batchnorm_two_ranks)),
                          parameters(final_weights(whole_batch.run_dir))) > 1e-4  # the halves were normalized apart


def test_group_norm_two_ranks_match_one_process_on_the_whole_batch(small_birds: Path, runs: Path,
                                                                    group_norm_one_process: dict) -> None:
    torchrun("-m", "fgvc.train", *load_overrides(small_birds, runs, "gn-2ranks", *GROUP_NORM))
    assert max_difference(final_weights(runs / "gn-2ranks"), group_norm_one_process) < 1e-5


def test_sharded_evaluation_counts_each_image_once(small_birds: Path, runs: Path, batchnorm_two_ranks: Path) -> None:
    """The 2-rank final test (shards of 24 images: 10 + 4 and 10 + 0 over 3 global batches) equals one process
    evaluating the same checkpoint, exactly; and evaluate under torchrun lists each image's prediction once."""
    results = json.loads((batchnorm_two_ranks / "results.json").read_text())
    single = evaluate_checkpoint(batchnorm_two_ranks / "best.pt", split="test", batch_size=10).rows["single crop"]
    assert results["test"] == single
    output = runs / "evaluated.json"  # a global batch of 60: rank 1's shard is empty
    torchrun("-m", "fgvc.evaluate", "--checkpoint", str(batchnorm_two_ranks / "best.pt"), "--batch-size", "60",
             "--output", str(output), "--save-probabilities")
    report = json.loads(output.read_text())
    assert {k: report[k] for k in single} == single and report["images"] == 24
    lines = [json.loads(line) for line in (runs / "evaluated-probabilities.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(24))


def test_sharded_knn_equals_one_process(batchnorm_two_ranks: Path, runs: Path) -> None:
    knn = ["--knn", "--checkpoint", str(batchnorm_two_ranks / "best.pt"), "--k", "5"]
    torchrun("-m", "fgvc.evaluate", *knn, "--output", str(runs / "knn-2ranks.json"))
    assert evaluate_cli.main([*knn, "--output", str(runs / "knn-1process.json")]) == 0
    two, one = (json.loads((runs / f"knn-{n}.json").read_text()) for n in ("2ranks", "1process"))
    assert two == one and 0 < one["top5"] <= 100


def test_an_unreadable_batch_on_one_rank_still_joins_the_step(birds_copy: Path, tmp_path: Path) -> None:
    """With one image a rank, the rank whose image is unreadable runs a zero step so the other is not left waiting:
    its zero gradient averages in as an empty batch counts in one process. (An empty batch that does not reduce is
    skipped: test_accumulated_batches_reduce_gradients_once_a_step.)"""
    break_images(birds_copy, "train", 2)
    extra = ("data.batch_size=2", "data.image_size=64", "data.max_bad_fraction=0.1", "schedule.epochs=1")
    torchrun("-m", "fgvc.train", *load_overrides(birds_copy, tmp_path, "ranks", *extra))
    one = trainer.train(scratch_preset(overrides(birds_copy, tmp_path, "one", *extra, "data.batch_size=1",
                                                 "train.grad_accum=2")))
    assert_bitwise_equal(parameters(final_weights(tmp_path / "ranks")), parameters(final_weights(one.run_dir)))


# ------------------------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------------------------


def checkpoints(digests: Path, rank: int) -> list[tuple[int, int, str]]:
    """(step, epoch, model digest) of each checkpoint rank `rank` wrote, in order (tests/torchrun_train.py)."""
    lines = (digests / f"rank{rank}.txt").read_text().splitlines()
    return [(int(step), int(epoch), digest) for step, epoch, digest in map(str.split, lines)]


def test_two_ranks_resume_exactly_with_every_rank_holding_one_model(small_birds: Path, tmp_path: Path) -> None:
    """WS-DAN (extra passes, class centres updated by every rank) with dropout (each rank its own random stream):
    interrupted at step 4 and resumed, the run ends bitwise where the uninterrupted one does; at every checkpoint,
    mid-epoch too, both ranks hold the same weights, statistics and centres."""
    extra = ("model.head=wsdan", "model.drop_rate=0.3")
    train_with_ranks(overrides(small_birds, tmp_path, "whole", *extra), tmp_path / "whole-digests")
    train_with_ranks(overrides(small_birds, tmp_path, "split", *extra), tmp_path / "split-digests", stop_after=4)
    torchrun("-m", "fgvc.train", "--resume", str(tmp_path / "split"))
    assert_bitwise_equal(final_weights(tmp_path / "whole"), final_weights(tmp_path / "split"))
    for digests, steps in ((tmp_path / "whole-digests", [3, 6]), (tmp_path / "split-digests", [3, 4])):
        assert [step for step, _, _ in checkpoints(digests, 0)] == steps
        assert checkpoints(digests, 0) == checkpoints(digests, 1)
    assert final_weights(tmp_path / "whole")["head.centers"].abs().sum() > 0  # the centres did move


def test_a_checkpoint_resumes_at_another_world_size(small_birds: Path, runs: Path,
                                                    group_norm_one_process: dict) -> None:
    """1 process -> 2 ranks and 2 ranks -> 1 process, each interrupted at step 2 of 6: the step, the schedule and
    the sampler's position carry over (a GroupNorm model, so the result matches one uninterrupted process)."""
    first = trainer.train(scratch_preset(overrides(small_birds, runs, "one-then-two", *GROUP_NORM)),
                          stop_after_steps=2)
    torchrun("-m", "fgvc.train", "--resume", str(first.run_dir))
    train_with_ranks(overrides(small_birds, runs, "two-then-one", *GROUP_NORM), runs / "digests", stop_after=2)
    resumed = trainer.train(load_config(runs / "two-then-one" / trainer.CONFIG_FILE), resume_dir=runs / "two-then-one")
    for run_dir in (first.run_dir, resumed.run_dir):
        assert max_difference(final_weights(run_dir), group_norm_one_process) < 1e-5
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once, across the two launches


def test_the_cached_linear_probe_on_two_ranks_equals_one_process_accumulating(small_birds: Path, runs: Path) -> None:
    """The feature cache is extracted in shards and joined: the probe's head trains as one process's."""
    probe = ("transfer.mode=linear_probe", "model.head=linear")
    torchrun("-m", "fgvc.train", *load_overrides(small_birds, runs, "probe-2ranks", *probe))
    one = trainer.train(scratch_preset(overrides(small_birds, runs, "probe-accumulated", *probe, "data.batch_size=6",
                                                 "train.grad_accum=2")))
    assert_bitwise_equal(final_weights(runs / "probe-2ranks"), final_weights(one.run_dir))


def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_the_step(small_birds: Path, tmp_path: Path) -> None:
    done = train_with_ranks(overrides(small_birds, tmp_path, "nan", "train.checkpoint_every=1"), tmp_path / "digests",
                            succeed=False, env={"NAN_LOSS": "1:4"})
    assert "error: the training loss is not finite at step 4 (epoch 2, batch 1): loss nan" in done.stderr
    assert "error: the training loss is not finite at step 4 (epoch 2, batch 1): on another rank" in done.stderr
    assert f"the last good checkpoint, {tmp_path / 'nan' / 'last.pt'} (step 3), is kept" in done.stderr
    kept = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert kept["state"]["step"] == 3 and all(torch.isfinite(v).all() for v in kept["model"].values()
                                              if v.is_floating_point())


# ------------------------------------------------------------------------------------------------------------------
# Multi-node and faults
# ------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_train_as_two_ranks_of_one(small_birds: Path, runs: Path, batchnorm_two_ranks: Path) -> None:
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m",
                               "fgvc.train", *load_overrides(small_birds, runs, "two-nodes")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "test " in outputs[0] and "test " not in outputs[1]  # rank 0 reports
    assert_bitwise_equal(final_weights(runs / "two-nodes"), final_weights(batchnorm_two_ranks))


def long_run(root: Path, output: Path, name: str) -> subprocess.Popen:
    """2 ranks on a run of many epochs that checkpoints every step."""
    args = load_overrides(root, output, name, "schedule.epochs=300", "train.checkpoint_every=1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                             "fgvc.train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(path: Path, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not path.is_file():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.1)
    time.sleep(1.0)  # a few more steps


def rank_pid(job: subprocess.Popen, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except OSError:
                continue
            parent = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
            if parent == job.pid and f"RANK={rank}".encode() in environ:
                return int(entry.name)
    raise AssertionError(f"no rank {rank} under torchrun {job.pid}")


def assert_resumable(run_dir: Path) -> int:
    """The kept checkpoint loads and the run continues from it; returns its step."""
    step = load_checkpoint(run_dir / "last.pt")["state"]["step"]
    result = trainer.train(load_config(run_dir / trainer.CONFIG_FILE), resume_dir=run_dir, stop_after_steps=step + 1)
    assert not result.completed and load_checkpoint(run_dir / "last.pt")["state"]["step"] == step + 1
    return step


def test_a_dead_rank_stops_the_job_and_keeps_the_last_checkpoint(small_birds: Path, tmp_path: Path) -> None:
    job = long_run(small_birds, tmp_path, "killed")
    wait_for(tmp_path / "killed" / "last.pt", job)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    killed = time.monotonic()
    output = job.communicate(timeout=60)[0]
    assert job.returncode != 0 and time.monotonic() - killed < 60
    assert "error: rank 0 lost contact with another rank, which stopped or died (Connection" in output, output
    step = assert_resumable(tmp_path / "killed")
    assert f"the last good checkpoint, {tmp_path / 'killed' / 'last.pt'} (step " in output and step > 0


def test_sigterm_to_the_job_checkpoints_once_and_ends_cleanly(small_birds: Path, tmp_path: Path) -> None:
    """SIGTERM to torchrun reaches every rank; they stop at one step, rank 0 writes last.pt once (after the epoch
    ends' checkpoints, with train.checkpoint_every=2 writing at even steps), and no rank fails."""
    args = overrides(small_birds, tmp_path, "stopped", "schedule.epochs=300", "train.checkpoint_every=2")
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(WORKER), str(tmp_path / "digests"), "0", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(tmp_path / "stopped" / "last.pt", job)
    job.send_signal(signal.SIGTERM)  # to torchrun, which passes it to each rank
    output = job.communicate(timeout=60)[0]
    assert output.count("stopped at step") == 1 and output.count("received signal 15") == 1, output
    assert "[rank0]" not in output and "[rank1]" not in output and "lost contact" not in output  # no rank failed
    step = int(output.split("stopped at step ")[1].split(";")[0])
    written = [entry[0] for entry in checkpoints(tmp_path / "digests", 0)]
    assert written.count(step) == 1 and written[-1] == step
    assert checkpoints(tmp_path / "digests", 0)[-1] == checkpoints(tmp_path / "digests", 1)[-1]
    assert assert_resumable(tmp_path / "stopped") == step


def test_accumulated_batches_reduce_gradients_once_a_step(tmp_path: Path) -> None:
    """Under DDP (a process group of one, in this process), the batches accumulated before a step skip the
    reduction (no_sync): one gradient reduction per optimizer step, not per batch. A batch with no readable image
    is skipped, or, when its backward is the one that reduces, runs a zero step; either way the weights are those
    of the same batches in one process without DDP."""
    import torch.distributed as dist

    from fgvc.engine.distributed import DistributedStep
    from fgvc.engine.loop import Optimization, Runtime, TrainState, train_one_epoch
    from fgvc.losses import LabelSmoothingCrossEntropy
    from fgvc.models import FGVCModel, create_backbone
    from fgvc.models.heads import LinearHead

    def model_and_optimization() -> tuple[FGVCModel, Optimization]:
        torch.manual_seed(0)
        backbone = create_backbone("test_resnet")
        model = FGVCModel(backbone, LinearHead(backbone.num_features, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), 3)

    torch.manual_seed(1)
    batches = [{"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1]), "index": torch.arange(2)}
               for _ in range(7)]
    batches[1] = batches[5] = {}  # unreadable: batch 1 accumulates, batch 5 ends its step
    plain, plain_optimization = model_and_optimization()
    train_one_epoch(plain, LabelSmoothingCrossEntropy(0.0), plain_optimization, _Sized(batches, 7),
                    Runtime(torch.device("cpu")), TrainState())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed = Distributed.from_environment("cpu")
        assert distributed.active and not distributed.owns_group
        model, optimization = model_and_optimization()
        ranks = DistributedStep.create(model, distributed)
        current, reduced_at = [], set()

        def recording(state, bucket):  # DDP's reduction, noting the batch whose backward runs it
            reduced_at.add(len(current) - 1)
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        ranks.ddp.register_comm_hook(None, recording)

        def loader():
            for item in batches:
                current.append(item)
                yield item

        state = TrainState()
        train_one_epoch(model, LabelSmoothingCrossEntropy(0.0), optimization, _Sized(loader(), 7),
                        Runtime(torch.device("cpu")), state, ranks=ranks)
        assert state.step == 3 and reduced_at == {2, 5, 6}  # 3 + 3 + 1 batches a step: reduced at each step's last
        assert_bitwise_equal(model.state_dict(), plain.state_dict())
    finally:
        dist.destroy_process_group()


class _Sized:
    """An iterable with a length, as train_one_epoch wants its loader."""

    def __init__(self, items, length: int) -> None:
        self.items, self.length = items, length

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return self.length
