"""Quick versions of the reliability suite's trials (experiments/reliability.py) that the other tests do not make:
a real SIGTERM, kill -9 inside a checkpoint write, a save on a full disk and past the file-size limit, malicious
pickles through every load path, every bit of a checkpoint flipped, every EXIF orientation."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgvc import evaluate as evaluate_cli
from fgvc import predict as predict_cli
from fgvc import train as train_cli
from fgvc import visualize as visualize_cli
from fgvc.config import load_config
from fgvc.data.aircraft import load_aircraft
from fgvc.data.annotations import AnnotationError
from fgvc.data.images import read_rgb
from fgvc.engine import trainer
from fgvc.engine.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from fgvc.errors import OptionError
from fgvc.models import create_backbone
from tests.test_datasets import make_aircraft
from tests.test_training import SCRATCH_PRESET, assert_bitwise_equal, final_weights, scratch_preset, tiny_overrides

FORCE_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def test_sigterm_stops_at_a_step_and_the_run_resumes_exactly(small_birds: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(small_birds, tmp_path, "stopped") + ["data.batch_size=4", "schedule.epochs=1"]
    run_dir = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "fgvc.train", "--config", SCRATCH_PRESET, *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 2):  # 7 steps in all
        assert process.poll() is None, process.communicate()
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped at step" in out, err
    step = load_checkpoint(run_dir / "last.pt")["state"]["step"]
    assert 2 <= step < 7 and not (run_dir / "results.json").exists()
    resumed = trainer.train(load_config(run_dir / trainer.CONFIG_FILE), resume_dir=run_dir)
    whole = trainer.train(scratch_preset(tiny_overrides(small_birds, tmp_path, "whole")
                                         + ["data.batch_size=4", "schedule.epochs=1"]))
    assert resumed.completed
    assert_bitwise_equal(final_weights(run_dir), final_weights(whole.run_dir))


# A child that writes 16 MB checkpoints in a loop, each holding its generation in every element.
WRITER = """
import sys, torch
from fgvc.engine.checkpoint import save_checkpoint
for generation in range(1, 1000):
    save_checkpoint(sys.argv[1], {"generation": generation, "w": torch.full((4_000_000,), float(generation))})
"""


@pytest.mark.parametrize("delay", [0.0, 0.004])
def test_kill_9_inside_a_checkpoint_write_leaves_a_whole_checkpoint(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "last.pt"
    for _ in range(5):  # a kill may land just after a rename; then it was not inside a write, and is tried again
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        temp = None
        while temp is None:
            assert process.poll() is None
            temps = [name for name in os.listdir(tmp_path) if name.startswith(".last.pt.") and path.is_file()]
            temp = temps[0] if temps else None
            time.sleep(0.0002)
        time.sleep(delay)
        process.kill()
        process.wait()
        if (tmp_path / temp).exists():
            break
        (tmp_path / temp).unlink(missing_ok=True)
    assert (tmp_path / temp).exists(), "no kill landed inside a write"
    kept = load_checkpoint(path)  # verified: whole, the SHA-256 matches
    assert kept["generation"] >= 1 and bool((kept["w"] == kept["generation"]).all())


# A child that saves generation 1, then generation 2 past a file-size limit (write() fails with EFBIG).
LIMITED = """
import resource, signal, sys, torch
from fgvc.engine.checkpoint import load_checkpoint, save_checkpoint
save_checkpoint(sys.argv[1], {"generation": 1, "w": torch.ones(50_000)})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(sys.argv[1], {"generation": 2, "w": torch.ones(500_000)})
except Exception as error:
    print(type(error).__name__, error)
print("kept generation", load_checkpoint(sys.argv[1])["generation"])
"""


def test_a_save_past_the_file_size_limit_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    done = subprocess.run([sys.executable, "-c", LIMITED, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"WriteError could not write {path}: File too large" in done.stdout
    assert "kept generation 1" in done.stdout
    assert os.listdir(tmp_path) == ["last.pt"]  # the temp file was removed


FULL_DISK = """
import os, subprocess, sys, torch
from fgvc.engine.checkpoint import load_checkpoint, save_checkpoint
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", sys.argv[1]], check=True)
path = os.path.join(sys.argv[1], "last.pt")
save_checkpoint(path, {"generation": 1, "w": torch.ones(100_000)})
try:
    save_checkpoint(path, {"generation": 2, "w": torch.ones(200_000)})
except Exception as error:
    print(type(error).__name__, error)
print("kept generation", load_checkpoint(path)["generation"], os.listdir(sys.argv[1]))
"""


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A real ENOSPC: a 600 kB tmpfs in a user and mount namespace of its own (unshare -rm). Where user namespaces
    are not allowed it is skipped; tests/test_checkpoint.py's simulated ENOSPC runs everywhere."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("unshare -rm is not permitted here")
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert f"WriteError disk full while writing {tmp_path / 'last.pt'}" in done.stdout
    assert "kept generation 1 ['last.pt']" in done.stdout


# ---------------------------------------------------------------------------------------------------------------
# Malicious pickles
# ---------------------------------------------------------------------------------------------------------------


class Plant:
    """Unpickled by a loader that executes code, it creates its marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def torch_zip(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer, pickle_module=pickle)
    return buffer.getvalue()


def code_in_the_wrapper(marker: Path) -> bytes:
    return torch_zip({"format": FORMAT, "sha256": "0", "payload": Plant(marker)})


def code_in_the_payload(marker: Path) -> bytes:
    """A wrapper whose SHA-256 is right: whoever makes the file computes it."""
    inner = torch_zip({"model": Plant(marker), "config": {}, "classes": ["a"]})
    return torch_zip({"format": FORMAT, "sha256": hashlib.sha256(inner).hexdigest(),
                      "payload": torch.frombuffer(bytearray(inner), dtype=torch.uint8)})


def test_the_planted_files_do_run_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: the files of the tests below execute their code under weights_only=False."""
    marker = tmp_path / "marker"
    torch.load(io.BytesIO(code_in_the_wrapper(marker)), weights_only=False)
    assert marker.exists()
    marker.unlink()
    wrapper = torch.load(io.BytesIO(code_in_the_payload(marker)), weights_only=True)
    torch.load(io.BytesIO(wrapper["payload"].numpy().tobytes()), weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def stopped_runs(small_birds: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run and a linear probe with its feature cache in a file, both stopped at step 2 (resumable)."""
    output = tmp_path_factory.mktemp("stopped")
    probe = ["transfer.mode=linear_probe", "transfer.cache_location=file"]
    return {"run": trainer.train(scratch_preset(tiny_overrides(small_birds, output, "run")),
                                 stop_after_steps=2).run_dir,
            "probe": trainer.train(scratch_preset(tiny_overrides(small_birds, output, "probe") + probe),
                                   stop_after_steps=2).run_dir}


LOAD_PATHS = ["evaluate", "predict", "visualize", "resume", "pretrained_file", "feature cache"]


def load_through(path: str, content: bytes, places: dict, small_birds: Path, tmp_path: Path) -> int:
    """Feed a planted file to one load path as a user would (the CLI's main, in this process); its exit status."""
    evil = tmp_path / "evil.pt"
    evil.write_bytes(content)
    if path in ("evaluate", "predict", "visualize"):
        image = next((small_birds / "images").rglob("*.jpg"))
        tool = {"evaluate": evaluate_cli, "predict": predict_cli, "visualize": visualize_cli}[path]
        return tool.main(["--checkpoint", str(evil), *([str(image)] if path == "predict" else [])])
    if path == "pretrained_file":
        return train_cli.main(["--config", SCRATCH_PRESET, *tiny_overrides(small_birds, tmp_path, "weights"),
                               f"model.pretrained_file={evil}"])
    run_dir = tmp_path / "run"
    shutil.copytree(places["probe" if path == "feature cache" else "run"], run_dir)
    shutil.copy(evil, run_dir / ("features/train.safetensors" if path == "feature cache" else "last.pt"))
    return train_cli.main(["--resume", str(run_dir)])


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", FORCE_UNSAFE])
@pytest.mark.parametrize("plant", [code_in_the_wrapper, code_in_the_payload], ids=["wrapper", "payload"])
@pytest.mark.parametrize("path", LOAD_PATHS)
def test_a_malicious_pickle_never_runs(path: str, plant, force_unsafe: bool, stopped_runs: dict,
                                       small_birds: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    if force_unsafe:
        monkeypatch.setenv(FORCE_UNSAFE, "1")
    marker = tmp_path / "marker"
    try:
        status = load_through(path, plant(marker), stopped_runs, small_birds, tmp_path)
    except Exception:  # a traceback, which test_..._one_error_line below pins; the code must not have run
        status = None
    assert not marker.exists(), "the pickle's code ran"
    if not (path == "pretrained_file" and plant is code_in_the_payload):  # a weights-only file: see the next test
        assert status != 0


@pytest.mark.parametrize(("path", "plant"), [
    pytest.param("feature cache", code_in_the_wrapper, id="feature cache"),
    pytest.param("evaluate", code_in_the_wrapper, id="evaluate-wrapper"),
    pytest.param("resume", code_in_the_payload, id="resume-payload"),
    pytest.param("pretrained_file", torch_zip, id="pretrained_file"),
    pytest.param("pretrained_file", pickle.dumps, id="pretrained_file-bare-pickle"),
])
def test_a_malicious_pickle_is_refused_with_one_error_line(path: str, plant, stopped_runs: dict, small_birds: Path,
                                                            tmp_path: Path, capsys) -> None:
    """One `error:` line and nothing else on stderr: no traceback, and no warning (which a CLI prints there)."""
    marker = tmp_path / "marker"
    content = (plant({"conv1.weight": Plant(marker)}) if plant in (torch_zip, pickle.dumps) else plant(marker))
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = load_through(path, content, stopped_runs, small_birds, tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not [str(warning.message) for warning in caught if "pickle" in str(warning.message)]


def test_a_pretrained_file_with_none_of_the_backbones_weights_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "best.pt", {"model": {"backbone.conv1.weight": torch.ones(1)}})
    with pytest.raises(OptionError, match="pretrained_file"):
        create_backbone("test_resnet", pretrained_file=str(tmp_path / "best.pt"))


def test_load_checkpoint_refuses_code_in_a_payload_with_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "evil.pt").write_bytes(code_in_the_payload(tmp_path / "marker"))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


# ---------------------------------------------------------------------------------------------------------------
# Flipped bits
# ---------------------------------------------------------------------------------------------------------------


def flipped_loads(path: Path, positions: range, bit: int) -> dict[int, object]:
    """What loading gives with `bit` flipped at each position: the state, or the exception raised."""
    original, results = path.read_bytes(), {}
    damaged = path.with_name("damaged.pt")
    for position in positions:
        data = bytearray(original)
        data[position] ^= 1 << bit
        damaged.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[position] = load_checkpoint(damaged)
        except Exception as error:
            results[position] = error
    return results


def test_no_flipped_bit_loads_another_state(tmp_path: Path) -> None:
    """Every byte of a small checkpoint, flipped: it is refused, or (in zip fields torch never reads) the very same
    state loads. Never a different one."""
    state = {"model": {"w": torch.arange(12.0)}, "state": {"step": 3}, "classes": ["a"]}
    save_checkpoint(tmp_path / "last.pt", state)
    size = (tmp_path / "last.pt").stat().st_size
    results = flipped_loads(tmp_path / "last.pt", range(size), bit=3)
    loaded = [value for value in results.values() if isinstance(value, dict)]
    assert all(torch.equal(value["model"]["w"], state["model"]["w"]) and value["state"] == state["state"]
               for value in loaded)
    assert sum(isinstance(value, CheckpointError) for value in results.values()) > size / 2


def test_a_flipped_bit_in_the_wrappers_keys_is_a_checkpoint_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "last.pt", {"w": torch.ones(3)})
    data = (tmp_path / "last.pt").read_bytes()
    keys = range(data.index(b"sha256"), data.index(b"sha256") + 6)
    results = flipped_loads(tmp_path / "last.pt", keys, bit=1)
    assert not [value for value in results.values() if isinstance(value, KeyError)], results
    assert all(isinstance(value, CheckpointError) for value in results.values()), results


# ---------------------------------------------------------------------------------------------------------------
# Images and annotations
# ---------------------------------------------------------------------------------------------------------------

# EXIF orientation -> what displays the stored pixels upright (the EXIF 2.3 table).
UPRIGHT = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
           5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_every_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    y, x = np.mgrid[:6, :10]
    pixels = np.stack([x * 25, y * 40, (x + 2 * y) * 9], axis=-1).astype(np.uint8)  # no symmetry to hide a mistake
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "a.png", exif=exif)
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.png"), UPRIGHT[orientation](pixels))


def test_32_bit_integer_images_in_the_16_bit_range_are_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "a.tiff")
    assert Image.open(tmp_path / "a.tiff").mode == "I"
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.tiff")[0, :, 1], [0, 1, 128, 255])


def test_an_aircraft_class_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    data = make_aircraft(tmp_path) / "fgvc-aircraft-2013b" / "data"
    names = (data / "variants.txt").read_bytes().split(b"\n")
    names[1] = names[1] + b"\xe9"  # Latin-1, not UTF-8
    (data / "variants.txt").write_bytes(b"\n".join(names))
    with pytest.raises(AnnotationError, match=f"{data / 'variants.txt'}:2: not UTF-8"):
        load_aircraft(tmp_path, "train")

