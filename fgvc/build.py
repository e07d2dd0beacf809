"""Config -> objects: the one place outside the CLIs that reads a Config.

Everything else takes explicit arguments: datasets their root, split and options; backbones, heads, the Mixer and
the losses their keyword arguments, named after the config keys they come from. This module maps a Config onto
them, and turns an option a library object refuses (an OptionError) into a ConfigError naming the full key.

    setup = build_training(cfg)        # datasets, loaders, model, criterion, mixer, optimizer and schedule
    loaded = load_model("runs/<run>/best.pt")   # a checkpoint's model, classes and evaluation transform
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import timm
import torch

from fgvc.config import FLAGS, Config, ConfigError, DataConfig, ModelConfig, OptimConfig, WSDANConfig, from_dict
from fgvc.data import DATASETS, Dataset, data_root
from fgvc.data.loader import Shard, SplitLoader, UnreadableImages, build_loader, derived_seed
from fgvc.data.splits import check_split
from fgvc.data.transforms import INTERPOLATIONS, PartAwareTransform, Preprocessing, eval_transform, train_transform
from fgvc.engine.checkpoint import load_checkpoint
from fgvc.engine.distributed import Distributed, DistributedStep
from fgvc.engine.localization import attention_localization, meter_for
from fgvc.engine.logging import echo
from fgvc.engine.loop import Optimization, Runtime
from fgvc.engine.optim import build_optimizer, build_scheduler, layer_decay_scales, parameter_groups
from fgvc.errors import OptionError
from fgvc.losses import LabelSmoothingCrossEntropy
from fgvc.mixing import Mixer
from fgvc.models import HEADS, FGVCModel, create_backbone
from fgvc.models.backbone import Backbone, check_backbone_name
from fgvc.registry import Registry, UnknownName
from fgvc.ssl import METHODS, SSLMethod
from fgvc.ssl.views import LOCAL_VIEW, LocalCrops, MultiViewTransform, adjusted, method_views
from fgvc.transfer.advise import Measurement
from fgvc.transfer.features import (
    CACHE_DTYPES,
    CachedFeatures,
    FeatureCacheError,
    FeatureLoader,
    check_budget,
    extract_features,
    image_feature_shape,
)
from fgvc.transfer.knn import DEFAULT_K, DEFAULT_TEMPERATURE, embed, knn_accuracy
from fgvc.weights import package_weights

WSDAN_KEYS = {f.name for f in dataclasses.fields(WSDANConfig)}
ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def model_key(option: str) -> str:
    return f"model.wsdan.{option}" if option in WSDAN_KEYS else f"model.{option}"


@contextlib.contextmanager
def config_keys(section: str | Callable[[str], str]) -> Iterator[None]:
    """Name the config key (`section`.option, or what a function of the option gives, and its flag) when a library
    object refuses an option."""
    key = section if callable(section) else (lambda option: f"{section}.{option}")
    try:
        yield
    except OptionError as error:
        raise ConfigError(error.qualified(key, FLAGS)) from None


# ------------------------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device ({FLAGS['train.device']}): {name!r} is not a device (auto, cpu, cuda, "
                          "cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device ({FLAGS['train.device']}): {name} asked for, but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_runtime(cfg: Config, device: str | None = None, distributed: Distributed | None = None) -> Runtime:
    """Where and how the model computes; under torchrun on CUDA, each rank on the GPU of its local rank."""
    with config_keys("train"):
        chosen = resolve_device(device or cfg.train.device)
        if distributed is not None and distributed.active and chosen.type == "cuda":
            chosen = distributed.device
        return Runtime.create(chosen, cfg.train.amp, cfg.train.channels_last)


def build_distributed(device: str) -> Distributed:
    """torchrun's process group (gloo on CPU, NCCL on CUDA, as `device` -- train.device -- says), or a world of one
    without torchrun."""
    chosen = resolve_device(device)
    distributed = Distributed.from_environment(chosen.type)
    if distributed.world_size > 1 and chosen.index is not None:
        distributed.close()
        raise ConfigError(f"train.device ({FLAGS['train.device']}): {device} names one GPU, but under torchrun each "
                          f"of the {distributed.world_size} ranks takes the GPU of its local rank; set it to cuda")
    return distributed


def rank_batch_size(batch_size: int, distributed: Distributed, key: str, *, exact: bool) -> int:
    """A rank's part of a global batch of `batch_size` (config key `key`): an exact share in training (every rank
    the same, so gradients average as in one process), rounded up in evaluation (no image is counted twice)."""
    world = distributed.world_size
    if exact and batch_size % world:
        raise ConfigError(f"{key}: {batch_size} images per step (the global batch, over all ranks) do not split "
                          f"evenly over {world} ranks; choose a multiple of {world}")
    return -(-batch_size // world)


def shard_of(distributed: Distributed | None) -> Shard:
    """Which part of each global batch this rank loads (fgvc.data.loader.Shard; its batch size set by the
    loader)."""
    return Shard() if distributed is None else Shard(distributed.rank, distributed.world_size)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


# data.* keys that only some datasets read. Set away from its default for a dataset that does not read it, a key
# is an error, not silently ignored; val_fraction (0 also means "no validation split" to the trainer) and the
# synthbirds spec (the quick start's, under a data.dataset override) are exempt.
DATASET_OPTIONS = ("val_fraction", "split_seed", "download", "annotation_level", "remove_banner")


def dataset_options(data: DataConfig) -> dict[str, Any]:
    """The data.* values the dataset's builder takes: each builder names its options after the keys."""
    builder = registered(DATASETS, data.dataset, "data.dataset")
    accepted = inspect.signature(builder).parameters
    default = DataConfig()
    for name in DATASET_OPTIONS:
        if name != "val_fraction" and name not in accepted and getattr(data, name) != getattr(default, name):
            flag = f" ({FLAGS[f'data.{name}']})" if f"data.{name}" in FLAGS else ""
            raise ConfigError(f"data.{name}{flag}: {data.dataset} has no such option (it is set to "
                              f"{getattr(data, name)!r})")
    values = {name: getattr(data, name) for name in DATASET_OPTIONS} | {"spec": data.synthbirds}
    return {name: value for name, value in values.items() if name in accepted}


def build_dataset(data: DataConfig, split: str) -> Dataset:
    """One split of data.dataset, read from data.root."""
    check_split(split)  # a split is not a config key: named as it is
    options = dataset_options(data)
    with config_keys("data"):
        return DATASETS.get(data.dataset)(data.root, split, **options)


def build_datasets(data: DataConfig) -> dict[str, Dataset]:
    """train and test, and val when data.val_fraction carves one."""
    splits = ("train", "val", "test") if data.val_fraction > 0 else ("train", "test")
    return {split: build_dataset(data, split) for split in splits}


def build_preprocessing(cfg: Config) -> Preprocessing:
    """data.mean / std / interpolation where set; otherwise what the pretrained weights expect (timm's
    pretrained_cfg), or ImageNet's statistics and bilinear resampling for a network trained from scratch."""
    default = Preprocessing()
    expected: dict[str, Any] = {}
    if has_weights(cfg.model):
        with config_keys(model_key):
            check_backbone_name(cfg.model.backbone)  # and its pretrained tag
        weights = timm.get_pretrained_cfg(cfg.model.backbone)
        if weights is not None:
            expected = {"mean": weights.mean, "std": weights.std, "interpolation": weights.interpolation or None}
    if cfg.data.interpolation is None and expected.get("interpolation") not in (None, *INTERPOLATIONS):
        raise ConfigError(f"data.interpolation: the weights of {cfg.model.backbone} ask for "
                          f"{expected['interpolation']!r}, which fgvc does not resample with; set one of "
                          f"{', '.join(INTERPOLATIONS)}")
    chosen = {name: getattr(cfg.data, name) if getattr(cfg.data, name) is not None else expected.get(name)
              for name in ("mean", "std", "interpolation")}
    with config_keys("data"):
        return Preprocessing(mean=tuple(chosen["mean"] or default.mean), std=tuple(chosen["std"] or default.std),
                             interpolation=chosen["interpolation"] or default.interpolation)


def with_preprocessing(cfg: Config, preprocessing: Preprocessing) -> Config:
    """`cfg` with the preprocessing it resolved to written in, as a run saves it (so a checkpoint evaluates with
    exactly what it was trained with, whatever timm's defaults become)."""
    data = dataclasses.replace(cfg.data, mean=list(preprocessing.mean), std=list(preprocessing.std),
                               interpolation=preprocessing.interpolation)
    return dataclasses.replace(cfg, data=data)


def unreadable_budget(cfg: Config, split: str, dataset: Dataset, *, silent: bool = False,
                      distributed: Distributed | None = None) -> UnreadableImages:
    """The split's budget of unreadable images (data.max_bad_fraction). Under torchrun each rank reports the images
    it meets (prefixed with its rank) and holds its own count against the whole split's budget; evaluation then
    holds the sum over ranks against it too (fgvc.engine.loop.evaluate)."""
    rank = distributed.rank if distributed is not None else 0
    say = (lambda _: None) if silent else echo if rank == 0 else (lambda message: echo(f"[rank {rank}] {message}"))
    with config_keys("data"):
        return UnreadableImages(split, len(dataset), 1.0 if silent else cfg.data.max_bad_fraction, say)


def build_train_loader(cfg: Config, dataset: Dataset, preprocessing: Preprocessing, device: torch.device,
                       distributed: Distributed | None = None) -> SplitLoader:
    """The training loader; under torchrun this rank's part (data.batch_size / world size) of each global batch."""
    data = cfg.data
    with config_keys("data"):
        compose = train_transform(data.image_size, resize_size=data.resize_size, crop=data.crop,
                                  crop_scale=tuple(data.crop_scale), hflip=data.hflip, color_jitter=data.color_jitter,
                                  preprocessing=preprocessing)
    return shuffled_loader(cfg, dataset, PartAwareTransform(compose, dataset.part_names), device, distributed)


def shuffled_loader(cfg: Config, dataset: Dataset, transform: Callable[[dict, int], dict], device: torch.device,
                    distributed: Distributed | None = None, split: str = "train") -> SplitLoader:
    """A training loader of `dataset` (the `split` split) through `transform`: shuffled by (seed, epoch), the last
    incomplete global batch dropped, this rank's part of each global batch under torchrun."""
    data = cfg.data
    if len(dataset) < data.batch_size:
        raise ConfigError(f"data.batch_size: {data.batch_size} is more than the {len(dataset)} images of the {split} "
                          "split (the last incomplete batch is dropped, so an epoch would be empty)")
    batch_size = rank_batch_size(data.batch_size, distributed or Distributed(), "data.batch_size", exact=True)
    return build_loader(dataset, transform, batch_size=batch_size, seed=cfg.train.seed, train=True,
                        unreadable=unreadable_budget(cfg, split, dataset, distributed=distributed),
                        workers=data.workers, pin_memory=device.type == "cuda", shard=shard_of(distributed))


def build_eval_transform(data: DataConfig, preprocessing: Preprocessing, part_names: list[str] | None = None, *,
                         wide: bool = False) -> PartAwareTransform:
    """The evaluation preprocessing of data.*: resize, centre crop, normalize (wide: the resized centre square)."""
    compose = eval_transform(data.image_size, resize_size=data.resize_size, wide=wide, preprocessing=preprocessing)
    return PartAwareTransform(compose, part_names)


def eval_batch_size(data: DataConfig) -> int:
    return data.eval_batch_size or 2 * data.batch_size


def build_eval_loader(cfg: Config, dataset: Dataset, preprocessing: Preprocessing, *, split: str,
                      wide: bool = False, silent: bool = False, batch_size: int | None = None,
                      distributed: Distributed | None = None) -> SplitLoader:
    """The evaluation loader of `split` (wide: the resized centre square instead of the crop, for ten-crop TTA;
    silent: unreadable images were reported by an earlier pass over the same split); under torchrun this rank's
    shard of it, every image in exactly one rank's shard."""
    data = cfg.data
    global_batch = batch_size or eval_batch_size(data)
    return build_loader(dataset, build_eval_transform(data, preprocessing, dataset.part_names, wide=wide),
                        batch_size=rank_batch_size(global_batch, distributed or Distributed(), "batch size",
                                                   exact=False),
                        seed=cfg.train.seed, train=False,
                        unreadable=unreadable_budget(cfg, split, dataset, silent=silent, distributed=distributed),
                        workers=data.workers, shard=shard_of(distributed))


# ------------------------------------------------------------------------------------------------------------------
# Model and training objects
# ------------------------------------------------------------------------------------------------------------------


def registered(registry: Registry, name: str, key: str) -> Callable[..., Any]:
    """registry.get(name), its refusal naming the config key."""
    try:
        return registry.get(name)
    except UnknownName as error:
        raise ConfigError(f"{key}{f' ({FLAGS[key]})' if key in FLAGS else ''}: {error}") from None


def head_options(model: ModelConfig, head: str) -> dict[str, Any]:
    """The model.* (and model.wsdan.*) values the head's constructor takes, by name."""
    available = {**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)},
                 **dataclasses.asdict(model.wsdan)}
    accepted = inspect.signature(registered(HEADS, head, "model.head")).parameters
    return {name: available[name] for name in accepted if name in available}


def has_weights(model: ModelConfig) -> bool:
    """Whether model.* asks for pretrained weights (hub, file or package)."""
    return model.pretrained or model.pretrained_file is not None or model.pretrained_package is not None


def without_weights(model: ModelConfig) -> ModelConfig:
    """The same architecture at random init."""
    return dataclasses.replace(model, pretrained=False, pretrained_file=None, pretrained_package=None)


def check_weights(model: ModelConfig) -> None:
    if model.pretrained_package is not None and (model.pretrained or model.pretrained_file is not None):
        raise ConfigError("model.pretrained_package: give one source of weights, not also model.pretrained or "
                          "model.pretrained_file")


def weights_file(model: ModelConfig) -> str | None:
    """model.pretrained_file, or the file model.pretrained_package converts to (imported on first use)."""
    check_weights(model)
    if model.pretrained_package is None:
        return model.pretrained_file
    with config_keys(model_key):
        return str(package_weights(model.pretrained_package, model.backbone, data_root() / "weights", echo=echo))


def build_backbone(model: ModelConfig, *, image_size: int | None = None) -> Backbone:
    """The backbone model.* describes, with its weights, for inputs of `image_size` (backbones made for one input
    size, such as ViTs, are built for it)."""
    pretrained_file = weights_file(model)
    with config_keys(model_key):
        return create_backbone(model.backbone, pretrained=model.pretrained, pretrained_file=pretrained_file,
                               output_stride=model.output_stride, feature_stage=model.feature_stage,
                               drop_path_rate=model.drop_path_rate, image_size=image_size,
                               backbone_args=model.backbone_args)


def build_model(model: ModelConfig, num_classes: int, *, image_size: int | None = None) -> FGVCModel:
    """The backbone and head model.* describes, for inputs of `image_size`."""
    head_class = registered(HEADS, model.head, "model.head")
    backbone = build_backbone(model, image_size=image_size)
    with config_keys(model_key):
        head = head_class(backbone.num_features, num_classes, **head_options(model, model.head))
    return FGVCModel(backbone, head)


def build_criterion(cfg: Config) -> LabelSmoothingCrossEntropy:
    with config_keys("regularization"):
        return LabelSmoothingCrossEntropy(cfg.regularization.label_smoothing)


def build_mixer(cfg: Config, num_classes: int) -> Mixer | None:
    """The configured Mixer, or None when every mixing method is off."""
    reg = cfg.regularization
    with config_keys("regularization"):
        mixer = Mixer(num_classes, cfg.train.seed, mixup_alpha=reg.mixup_alpha, cutmix_alpha=reg.cutmix_alpha,
                      mix_prob=reg.mix_prob, switch_prob=reg.switch_prob, snapmix_prob=reg.snapmix_prob,
                      snapmix_alpha=reg.snapmix_alpha)
    return mixer if mixer.enabled else None


def optimizer_roles(optim: OptimConfig, model: FGVCModel) -> tuple[dict[str, list], dict[str, float]]:
    """(parameters by role, lr scale of each role): backbone and head, or under optim.layer_decay one role per
    backbone layer (timm's fine groups, frozen ones empty) at decay^(L - l)."""
    roles = model.parameter_groups()
    if optim.layer_decay is None:
        return roles, {}
    layers = model.backbone_layers()
    names = [f"backbone.{depth}" for depth in range(len(layers))]
    scales = dict(zip(names, layer_decay_scales(len(layers), optim.layer_decay), strict=True))
    return {**dict(zip(names, layers, strict=True)), "head": roles["head"]}, scales


def build_optimization(cfg: Config, model: FGVCModel, steps_per_epoch: int) -> Optimization:
    optim, schedule = cfg.optim, cfg.schedule
    roles, scales = optimizer_roles(optim, model)
    groups = parameter_groups(roles, lr=optim.lr, weight_decay=optim.weight_decay, head_lr_mult=optim.head_lr_mult,
                              lr_scales=scales)
    with config_keys("optim"):
        optimizer = build_optimizer(groups, name=optim.name, lr=optim.lr, momentum=optim.momentum)
    scheduler = build_scheduler(optimizer, epochs=schedule.epochs, steps_per_epoch=steps_per_epoch,
                                warmup_epochs=schedule.warmup_epochs, base_lr=optim.lr, min_lr=schedule.min_lr)
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" else None
    with config_keys("optim"):
        return Optimization(optimizer, scheduler, cfg.train.grad_accum, scaler, optim.clip_grad, optim.clip_mode)


def run_folder(cfg: Config) -> Path:
    """output_dir / run_name (default: <dataset>-<backbone>-<head>-<time>)."""
    name = cfg.run_name or (f"{cfg.data.dataset}-{cfg.model.backbone}-{cfg.model.head}-"
                            f"{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    return Path(cfg.output_dir).expanduser() / name


@dataclass
class Training:
    """Everything a run needs, built from its config: what the trainer orchestrates."""

    config: Config  # as resolved, with the preprocessing it resolved to: what the run saves
    runtime: Runtime
    model: FGVCModel | SSLMethod
    criterion: LabelSmoothingCrossEntropy | None  # None: the model's loss is its own (pretraining)
    mixer: Mixer | None
    optimization: Optimization
    train_loader: SplitLoader
    val_loader: SplitLoader | None
    test_loader: SplitLoader | None  # None: pretraining, which has no test
    classes: list[str]
    epochs: int
    log_every: int
    checkpoint_every: int
    compile: bool
    distributed: Distributed = dataclasses.field(default_factory=Distributed)
    ranks: DistributedStep | None = None  # the training step on every rank (None: the model's own, one process)
    monitor: bool = False  # pretraining: run the k-NN monitor on the val split after every epoch


def prepare_run(cfg: Config, distributed: Distributed) -> Runtime:
    """The device, CPU threads, determinism and seed of a run (train.*); its Runtime."""
    train = cfg.train
    runtime = build_runtime(cfg, distributed=distributed)
    if train.sync_batchnorm and runtime.device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: SyncBatchNorm needs CUDA devices (it refuses CPU modules); on the "
                          "CPU each rank normalizes its own part of the batch")
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    torch.use_deterministic_algorithms(train.deterministic)
    seed_everything(train.seed)
    return runtime


def placed(model: ModelT, cfg: Config, runtime: Runtime) -> ModelT:
    """`model` on the run's device, channels-last where asked, with SyncBatchNorm under train.sync_batchnorm."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def reseed_rank(cfg: Config, distributed: Distributed) -> None:
    """Once the model is built (identically on every rank), each rank > 0 draws from a stream of its own; rank 0
    goes on with a single process's."""
    if distributed.rank > 0:
        seed_everything(derived_seed(cfg.train.seed, distributed.rank))


def build_training(cfg: Config, distributed: Distributed | None = None) -> Training:
    """Seed, then build every object of a run. Cheap checks come first, so a wrong name fails before any data is
    generated or read. Under torchrun (`distributed`, fgvc.build.build_distributed) the data and weights are
    prepared in turn (Distributed.main_first: generation, downloads, conversions), each rank loads its part of every
    global batch, and the model is wrapped in DDP; each rank > 0 then draws its own random numbers (dropout, ...)
    from a stream of its own, rank 0 those of a single process."""
    distributed = distributed if distributed is not None else Distributed()
    train = cfg.train
    with config_keys("model"):
        check_backbone_name(cfg.model.backbone)
    registered(HEADS, cfg.model.head, "model.head")
    registered(DATASETS, cfg.data.dataset, "data.dataset")
    check_weights(cfg.model)
    check_transfer(cfg)
    runtime = prepare_run(cfg, distributed)
    preprocessing = build_preprocessing(cfg)
    datasets = distributed.main_first(lambda: build_datasets(cfg.data))
    classes = list(datasets["train"].classes)
    train_loader = build_train_loader(cfg, datasets["train"], preprocessing, runtime.device, distributed)
    steps_per_epoch = -(-train_loader.batches_per_epoch // max(train.grad_accum, 1))
    model = distributed.main_first(lambda: build_model(cfg.model, len(classes), image_size=cfg.data.image_size))
    model = placed(model, cfg, runtime)
    apply_transfer(cfg, model)  # before DDP, which reduces the gradients of what trains
    reseed_rank(cfg, distributed)
    optimization = build_optimization(cfg, model, steps_per_epoch)
    val = datasets.get("val")
    eval_loader = functools.partial(build_eval_loader, cfg, preprocessing=preprocessing, distributed=distributed)
    return Training(
        config=with_preprocessing(cfg, preprocessing), runtime=runtime, model=model,
        criterion=build_criterion(cfg), mixer=build_mixer(cfg, len(classes)), optimization=optimization,
        train_loader=train_loader, val_loader=eval_loader(val, split="val") if val is not None else None,
        test_loader=eval_loader(datasets["test"], split="test"), classes=classes,
        epochs=cfg.schedule.epochs, log_every=train.log_every, checkpoint_every=train.checkpoint_every,
        compile=train.compile, distributed=distributed, ranks=DistributedStep.create(model, distributed))


# ------------------------------------------------------------------------------------------------------------------
# Transfer: what of the backbone trains, and the linear probe's feature cache
# ------------------------------------------------------------------------------------------------------------------

TRANSFER_MODES = ("full", "linear_probe", "top")
CACHE_LOCATIONS = ("memory", "file")
FEATURE_CACHE_DIR = "features"


def caches_features(cfg: Config) -> bool:
    """transfer.cache_features, whose null means: on for the linear probe."""
    cache = cfg.transfer.cache_features
    return cfg.transfer.mode == "linear_probe" if cache is None else cache


def check_transfer(cfg: Config) -> None:
    """The transfer.* and optim.layer_decay combinations that mean something, checked before anything is built."""
    transfer = cfg.transfer
    if transfer.mode not in TRANSFER_MODES:
        raise ConfigError(f"transfer.mode: {transfer.mode!r} is unknown; choose one of {', '.join(TRANSFER_MODES)}")
    if (transfer.mode == "top") != (transfer.trainable_stages is not None):
        raise ConfigError("transfer.trainable_stages: set it (the number of last backbone stages that train) with "
                          f"transfer.mode=top, and only then (the mode is {transfer.mode}, trainable_stages "
                          f"{transfer.trainable_stages})")
    if transfer.mode == "linear_probe" and cfg.optim.layer_decay is not None:
        raise ConfigError("optim.layer_decay: transfer.mode=linear_probe trains no backbone layer to scale")
    if transfer.mode == "linear_probe" and not has_weights(cfg.model):
        echo("warning: transfer.mode=linear_probe with no pretrained weights (model.pretrained, pretrained_file or "
             "pretrained_package): the probe measures random features")
    if not caches_features(cfg):
        return
    if transfer.mode != "linear_probe":
        raise ConfigError(f"transfer.cache_features: features can be cached only when the whole backbone is frozen "
                          f"(transfer.mode=linear_probe), not with transfer.mode={transfer.mode}")
    if transfer.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"transfer.cache_dtype: {transfer.cache_dtype!r} is unknown; choose one of "
                          f"{', '.join(CACHE_DTYPES)}")
    if transfer.cache_location not in CACHE_LOCATIONS:
        raise ConfigError(f"transfer.cache_location: {transfer.cache_location!r} is unknown; choose one of "
                          f"{', '.join(CACHE_LOCATIONS)}")
    if not registered(HEADS, cfg.model.head, "model.head").trains_from_features:
        raise ConfigError(f"transfer.cache_features: the {cfg.model.head} head's training passes run the backbone "
                          "on new images (crops), which a feature cache cannot serve; set transfer.cache_features="
                          "false")
    reg = cfg.regularization
    if reg.mixup_alpha > 0 or reg.cutmix_alpha > 0 or reg.snapmix_prob > 0:
        raise ConfigError("transfer.cache_features: mixup, cutmix and snapmix mix images, and a feature cache has "
                          "none; turn them off (regularization.*) or set transfer.cache_features=false")


def apply_transfer(cfg: Config, model: FGVCModel) -> None:
    """Freeze what transfer.mode keeps fixed: the whole backbone (linear_probe) or all but its last
    transfer.trainable_stages stages (top)."""
    if cfg.transfer.mode == "linear_probe":
        model.freeze_backbone(0)
    elif cfg.transfer.mode == "top":
        with config_keys("transfer"):
            model.freeze_backbone(cfg.transfer.trainable_stages)


def use_cached_features(setup: Training, run_dir: Path | None = None) -> Training:
    """`setup` with its train and val loaders serving cached backbone features, when the config caches them
    (transfer.cache_features); unchanged otherwise. The cache is made with the evaluation transform (no
    augmentation), once; with transfer.cache_location=file it is kept in run_dir/features/ and read back on resume.
    The test split is still evaluated on images, through the whole model."""
    cfg = setup.config
    if not caches_features(cfg):
        return setup
    loaders = {split: loader for split, loader in (("train", setup.train_loader), ("val", setup.val_loader))
               if loader is not None}
    dtype = CACHE_DTYPES[cfg.transfer.cache_dtype]
    shape = image_feature_shape(setup.model, cfg.data.image_size, setup.runtime)
    for split, loader in loaders.items():  # every split's size is checked before any image is read
        check_budget(len(loader.dataset), shape, dtype, cfg.transfer.cache_max_gib, split)
    preprocessing = build_preprocessing(cfg)
    distributed = setup.distributed
    cached = {}
    for split, loader in loaders.items():
        image_loader = build_eval_loader(cfg, loader.dataset, preprocessing, split=split, distributed=distributed)
        file = (run_dir / FEATURE_CACHE_DIR / f"{split}.safetensors"
                if run_dir is not None and cfg.transfer.cache_location == "file" else None)
        if file is not None and distributed.from_main(file.is_file()):
            cache = CachedFeatures.load(file, dtype=dtype, shape=shape)
        else:
            if distributed.is_main:
                echo(f"caching the frozen backbone's features of the {len(loader.dataset)} {split} images ...")
            shard = extract_features(setup.model, image_loader, setup.runtime, shape=shape, dtype=dtype)
            cache = CachedFeatures.joined(distributed.gather(shard))  # every rank's shard, by dataset index
            if len(cache) == 0:
                raise FeatureCacheError(f"no readable {split} image to cache the features of")
            if file is not None and distributed.is_main:
                cache.save(file)
        train = split == "train"
        batch_size = cfg.data.batch_size if train else eval_batch_size(cfg.data)
        cached[split] = FeatureLoader(cache, dataset=loader.dataset, unreadable=image_loader.unreadable,
                                      batch_size=rank_batch_size(batch_size, distributed, "data.batch_size",
                                                                 exact=train),
                                      seed=cfg.train.seed, train=train, shard=shard_of(distributed))
    return dataclasses.replace(setup, train_loader=cached["train"], val_loader=cached.get("val"))


def knn_probe(cfg: Config, backbone: torch.nn.Module, runtime: Runtime, *, split: str = "val", k: int = DEFAULT_K,
              temperature: float = DEFAULT_TEMPERATURE, distributed: Distributed | None = None) -> dict[str, float]:
    """The weighted k-NN accuracy (fgvc.transfer.knn) of `backbone`'s frozen, average-pooled features on the data
    of cfg.data: the train split's images are the neighbours, `split`'s the queries; both through the evaluation
    transform. Under torchrun each rank embeds its shard and every rank scores the whole split."""
    distributed = distributed if distributed is not None else Distributed()
    preprocessing = build_preprocessing(cfg)
    splits = distributed.main_first(lambda: [(name, build_dataset(cfg.data, name)) for name in ("train", split)])
    embedded = []
    for name, dataset in splits:
        if len(dataset) == 0:
            raise ConfigError(f"the {name} split of {cfg.data.root or cfg.data.dataset} is empty"
                              f"{' (data.val_fraction=0 carves none)' if name == 'val' else ''}")
        loader = build_eval_loader(cfg, dataset, preprocessing, split=name, distributed=distributed)
        shards = [shard for shard in distributed.gather(embed(backbone, loader, runtime)) if len(shard[1])]
        if not shards:
            raise ConfigError(f"the {name} split of {cfg.data.root or cfg.data.dataset} has no readable image")
        features, labels, indices = (torch.cat(parts) for parts in zip(*shards, strict=True))
        order = indices.argsort()  # dataset order, whatever the ranks: ties are broken by position
        embedded.append((features[order], labels[order]))
    (train_features, train_labels), (query_features, query_labels) = embedded
    with config_keys(lambda option: f"--{option}"):
        return knn_accuracy(train_features, train_labels, query_features, query_labels, k=k, temperature=temperature,
                            num_classes=len(splits[0][1].classes))


def transfer_measurement(cfg: Config, *, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> Measurement:
    """What the advisor (fgvc.transfer.advise) needs of the target cfg.data: its training images per class, and the
    k-NN top-1 on the validation split of model.*'s pretrained backbone and of the same architecture at random init
    (each built after seeding with train.seed)."""
    runtime = build_runtime(cfg)
    knn = {}
    for name, model in (("pretrained", cfg.model), ("random", without_weights(cfg.model))):
        seed_everything(cfg.train.seed)
        backbone = build_backbone(model, image_size=cfg.data.image_size).to(runtime.device)
        knn[name] = knn_probe(cfg, backbone, runtime, split="val", k=k, temperature=temperature)["top1"]
    counts = Counter(int(label) for label in build_dataset(cfg.data, "train").targets)
    return Measurement(sum(counts.values()) / len(counts), pretrained_knn=knn["pretrained"], random_knn=knn["random"])


# ------------------------------------------------------------------------------------------------------------------
# Self-supervised pretraining (fgvc.ssl)
# ------------------------------------------------------------------------------------------------------------------

SSL_EVALUATIONS = ("linear", "knn")


def check_pretraining(cfg: Config) -> type[SSLMethod]:
    """The method ssl.method names, once the keys pretraining cannot honour are refused: it trains a backbone and
    projection heads, with every image's views and no classifier."""
    method = registered(METHODS, cfg.ssl.method, "ssl.method")
    default = Config()
    refusals = {
        "model.head": (cfg.model.head != default.model.head, "pretraining trains no classifier head"),
        "model.feature_stage": (cfg.model.feature_stage is not None,
                                "pretraining trains the whole backbone, whose weights it hands on"),
        "optim.layer_decay": (cfg.optim.layer_decay is not None, "pretraining trains every layer at one lr"),
        "transfer": (cfg.transfer != default.transfer, "pretraining trains the whole backbone (no frozen part, no "
                                                       "feature cache)"),
        "regularization": (any(getattr(cfg.regularization, key) > 0 for key in
                               ("mixup_alpha", "cutmix_alpha", "snapmix_prob")),
                           "mixup, cutmix and snapmix mix labels, which pretraining has none of"),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise ConfigError(f"{key}: {why}; leave it at its default for python -m fgvc.pretrain")
    unknown = [name for name in cfg.ssl.eval if name not in SSL_EVALUATIONS]
    if unknown or len(set(cfg.ssl.eval)) < len(cfg.ssl.eval):
        raise ConfigError(f"ssl.eval (--eval): {cfg.ssl.eval} must name each of {', '.join(SSL_EVALUATIONS)} at most "
                          "once")
    with config_keys("model"):
        check_backbone_name(cfg.model.backbone)
    if method.needs_tokens:
        check_patches(cfg, "data.image_size", cfg.data.image_size)
    if cfg.ssl.local_crops and not method.local_crops:
        raise ConfigError(f"ssl.local_crops: {cfg.ssl.method} takes no local crops; multi-crop is DINO's "
                          "(--method dino)")
    return method


def check_patches(cfg: Config, key: str, size: int) -> int:
    """The patch side of model.backbone, which must be a ViT's and divide `size` (the value of `key`)."""
    patches = patch_size(cfg.model)
    if patches is None:
        raise ConfigError(f"ssl.method: {cfg.ssl.method} needs a ViT backbone (patch tokens), and "
                          f"model.backbone {cfg.model.backbone} is not one; e.g. --model vit_small_patch16_224")
    if size % patches[0] or size % patches[1]:
        raise ConfigError(f"{key}: {size} px crops cannot be cut into the {patches[0]} px patches of "
                          f"{cfg.model.backbone}; use a multiple of {patches[0]}")
    return patches[0]


def patch_size(model: ModelConfig) -> tuple[int, int] | None:
    """The (height, width) of the patches model.* cuts images into (a ViT, DeiT, ...), or None for a backbone
    without patch tokens: built on the meta device."""
    try:
        with torch.device("meta"):
            built = timm.create_model(model.backbone.split(".", 1)[0], num_classes=0, **model.backbone_args)
    except (TypeError, AssertionError) as error:  # timm asserts on some arguments (a width its heads do not divide)
        raise ConfigError(f"model.backbone_args: {model.backbone_args} not taken by {model.backbone} "
                          f"({error or 'refused by an assertion'})") from None
    embedding = getattr(built, "patch_embed", None)
    return tuple(embedding.patch_size) if embedding is not None and hasattr(embedding, "patch_size") else None


# DINO's local crops are 96 px for 224 px global crops.
LOCAL_SHARE = 96 / 224


def local_crops(cfg: Config, method: type[SSLMethod], dataset: Dataset) -> LocalCrops | None:
    """The local crops of a multi-crop method (None for the others), at ssl.local_size or the patch multiple
    nearest to LOCAL_SHARE of the global size, checked against the patches."""
    ssl = cfg.ssl
    count = ssl.local_crops if ssl.local_crops is not None else method.local_crops
    if count == 0:
        if ssl.local_crops_on_parts:
            raise ConfigError("ssl.local_crops_on_parts: there are no local crops to centre (ssl.local_crops=0, or "
                              f"{ssl.method} takes none)")
        return None
    if ssl.local_crops_on_parts and dataset.part_names is None:
        raise ConfigError(f"ssl.local_crops_on_parts: {cfg.data.dataset} has no part keypoints to centre the local "
                          "crops on (CUB and synthbirds have them)")
    patch = patch_size(cfg.model)[0]
    size = ssl.local_size or max(patch, round(cfg.data.image_size * LOCAL_SHARE / patch) * patch)
    check_patches(cfg, "ssl.local_size", size)
    recipe = adjusted(LOCAL_VIEW, crop_scale=ssl.local_crop_scale, hue=ssl.hue, grayscale=ssl.grayscale)
    return LocalCrops(recipe, size, count, on_parts=ssl.local_crops_on_parts, part_jitter=ssl.part_jitter)


def monitors(cfg: Config, dataset: Dataset) -> bool:
    """Whether pretraining runs the k-NN monitor (ssl.monitor; null: when the data have labels and a val split)."""
    labeled = bool(dataset.classes)
    if cfg.ssl.monitor is None:
        return labeled and cfg.data.val_fraction > 0
    if cfg.ssl.monitor and not labeled:
        raise ConfigError(f"ssl.monitor: {cfg.data.dataset} has no labels, which the k-NN monitor needs; set "
                          "ssl.monitor=false")
    if cfg.ssl.monitor and cfg.data.val_fraction == 0:
        raise ConfigError("ssl.monitor: the k-NN monitor runs on the val split, and data.val_fraction=0 carves none")
    return cfg.ssl.monitor


def build_method(cfg: Config, method: type[SSLMethod], *, total_steps: int, steps_per_epoch: int,
                 distributed: Distributed | None = None) -> SSLMethod:
    """The ssl.method on model.*'s backbone, with its section's options (ssl.<method>.*) and, where it takes them,
    the run's length (its momentum and temperature schedules span the run)."""
    options = dataclasses.asdict(getattr(cfg.ssl, cfg.ssl.method))
    parameters = inspect.signature(method).parameters
    for name, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if name in parameters:
            options[name] = value
    model = cfg.model
    if method.local_crops:  # multi-crop: the position embeddings are resampled to each crop's grid of patches
        model = dataclasses.replace(model, backbone_args={**model.backbone_args, "dynamic_img_size": True})
    backbone = build_backbone(model, image_size=cfg.data.image_size)
    with config_keys(f"ssl.{cfg.ssl.method}"):
        return method(backbone, distributed=distributed, **options)


def build_pretraining(cfg: Config, distributed: Distributed | None = None) -> Training:
    """Seed, then build every object of a pretraining run (as build_training does for supervised training): the
    views of the train split's images (trainval with ssl.include_val; never test), the method on its backbone,
    the optimizer and schedule. Labels are never loaded into a batch; the k-NN monitor and --eval read them."""
    distributed = distributed if distributed is not None else Distributed()
    train, ssl = cfg.train, cfg.ssl
    method_class = check_pretraining(cfg)
    registered(DATASETS, cfg.data.dataset, "data.dataset")
    check_weights(cfg.model)
    runtime = prepare_run(cfg, distributed)
    preprocessing = build_preprocessing(cfg)
    split = "trainval" if ssl.include_val else "train"
    dataset = distributed.main_first(lambda: build_dataset(cfg.data, split))
    if ssl.eval and not dataset.classes:
        raise ConfigError(f"ssl.eval (--eval): {cfg.data.dataset} has no labels to evaluate the backbone with; "
                          "pretrain without --eval, then probe on labeled data (python -m fgvc.evaluate --knn)")
    if ssl.views_in_box and not getattr(dataset, "has_boxes", False):
        raise ConfigError(f"ssl.views_in_box: {cfg.data.dataset} has no object boxes to draw the views from")
    monitor = monitors(cfg, dataset)
    with config_keys("ssl"):
        views = method_views(ssl.method, crop_scale=ssl.crop_scale, hue=ssl.hue, grayscale=ssl.grayscale)
    transform = MultiViewTransform(views, cfg.data.image_size, local=local_crops(cfg, method_class, dataset),
                                   views_in_box=ssl.views_in_box, preprocessing=preprocessing)
    loader = shuffled_loader(cfg, dataset, transform, runtime.device, distributed, split)
    steps_per_epoch = -(-loader.batches_per_epoch // train.grad_accum)
    method = distributed.main_first(lambda: build_method(
        cfg, method_class, total_steps=steps_per_epoch * cfg.schedule.epochs, steps_per_epoch=steps_per_epoch,
        distributed=distributed))
    method = placed(method, cfg, runtime)
    reseed_rank(cfg, distributed)
    return Training(
        config=with_preprocessing(cfg, preprocessing), runtime=runtime, model=method, criterion=None, mixer=None,
        optimization=build_optimization(cfg, method, steps_per_epoch), train_loader=loader, val_loader=None,
        test_loader=None, classes=list(dataset.classes), epochs=cfg.schedule.epochs, log_every=train.log_every,
        checkpoint_every=train.checkpoint_every, compile=train.compile, distributed=distributed,
        ranks=DistributedStep.create(method, distributed), monitor=monitor)


def probe_config(cfg: Config, backbone_file: Path, output_dir: Path) -> Config:
    """The linear probe of a pretrained backbone file (--eval linear): fgvc.train on the same data, the backbone
    frozen and its features cached, a linear head trained for ssl.probe_epochs at ssl.probe_lr (no weight decay, no
    warmup), selected on val and tested once, in output_dir/linear_probe."""
    ssl = cfg.ssl
    return dataclasses.replace(
        cfg, model=dataclasses.replace(without_weights(cfg.model), pretrained_file=str(backbone_file), head="linear"),
        transfer=dataclasses.replace(cfg.transfer, mode="linear_probe", cache_features=True),
        optim=dataclasses.replace(cfg.optim, lr=ssl.probe_lr, weight_decay=0.0, head_lr_mult=1.0),
        schedule=dataclasses.replace(cfg.schedule, epochs=ssl.probe_epochs, warmup_epochs=0.0),
        regularization=dataclasses.replace(cfg.regularization, label_smoothing=0.0),
        output_dir=str(output_dir), run_name="linear_probe")


# ------------------------------------------------------------------------------------------------------------------
# Trained models
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A checkpoint's model in eval mode on its device, with its class names, the evaluation transform it was
    trained with and the run's config."""

    model: FGVCModel
    classes: list[str]
    config: Config
    runtime: Runtime
    preprocessing: Preprocessing

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    def transform(self, part_names: list[str] | None = None, *, wide: bool = False) -> PartAwareTransform:
        """The run's evaluation preprocessing for raw samples (fgvc.data); with `part_names`, parts move with the
        image. Call it as transform(sample, seed=0)."""
        return build_eval_transform(self.config.data, self.preprocessing, part_names, wide=wide)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """An RGB image (H x W x 3 uint8, as fgvc.data.images.read_rgb and the datasets give them) as the model's
        input tensor (3 x size x size)."""
        return self._image_transform({"image": image, "label": 0, "index": 0}, seed=0)["image"]

    @functools.cached_property
    def _image_transform(self) -> PartAwareTransform:
        return self.transform()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's inference logits (with the head's own test-time passes) for normalized image tensors."""
        with self.runtime.autocast():
            return self.model(self.runtime.images(images))["logits"].float()

    def predict(self, image: np.ndarray, topk: int = 5) -> list[tuple[str, float]]:
        """The `topk` most probable (class name, probability) for one RGB image, most probable first."""
        probabilities = torch.softmax(self.logits(self.prepare(image)[None])[0], dim=0).cpu()
        top = probabilities.topk(min(topk, len(self.classes)))
        return [(self.classes[i], float(p)) for p, i in zip(top.values, top.indices.tolist(), strict=True)]


def load_model(checkpoint: str | os.PathLike, *, device: str = "auto", data_root: str | None = None,
               distributed: Distributed | None = None, state: dict | None = None) -> LoadedModel:
    """A run's checkpoint (best.pt or last.pt) rebuilt as it was trained, in eval mode. `data_root` replaces the
    run's data.root (the data moved). Under torchrun (`distributed`), on the rank's own GPU. `state`: the
    checkpoint, when it was already read."""
    state, cfg, runtime = stored_run(checkpoint, state, device=device, data_root=data_root, distributed=distributed)
    if is_pretraining(state):
        raise ConfigError(f"{checkpoint} is a checkpoint of python -m fgvc.pretrain, which has no classifier: its run "
                          "folder's backbone.safetensors trains one (model.pretrained_file)")
    # The weights come from the checkpoint: no hub download, and no pretrained_file that may have moved since.
    architecture = without_weights(cfg.model)
    model = build_model(architecture, len(state["classes"]), image_size=cfg.data.image_size).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(state["model"])
    return LoadedModel(model.eval(), list(state["classes"]), cfg, runtime, build_preprocessing(cfg))


def stored_run(checkpoint: str | os.PathLike, state: dict | None, *, device: str = "auto",
               data_root: str | None = None, distributed: Distributed | None = None) -> tuple[dict, Config, Runtime]:
    """(The checkpoint, read unless given; its config, with data.root replaced by `data_root` if given; the
    runtime it runs on here)."""
    state = state if state is not None else load_checkpoint(checkpoint)
    cfg = from_dict(state["config"], f"the config stored in {checkpoint}")
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_root))
    return state, cfg, build_runtime(cfg, device, distributed)


PRETRAINING_COMMAND = "fgvc.pretrain"  # what a pretraining run's checkpoints say made them


def is_pretraining(state: dict) -> bool:
    """Whether a checkpoint (as load_checkpoint reads it) is a pretraining run's."""
    return state.get("command") == PRETRAINING_COMMAND


@dataclass
class LoadedMethod:
    """A pretraining run's method (backbone, heads, momentum copies) in eval mode on its device, with the run's
    config and the evaluation transform of its data."""

    method: SSLMethod
    config: Config
    runtime: Runtime
    preprocessing: Preprocessing

    def transform(self, part_names: list[str] | None = None) -> PartAwareTransform:
        """The run's evaluation preprocessing for raw samples (fgvc.data); with `part_names`, parts move too."""
        return build_eval_transform(self.config.data, self.preprocessing, part_names)


def load_pretraining(checkpoint: str | os.PathLike, *, device: str = "auto", data_root: str | None = None,
                     state: dict | None = None) -> LoadedMethod:
    """A pretraining run's checkpoint (its last.pt) rebuilt as it was trained, in eval mode (see load_model)."""
    state, cfg, runtime = stored_run(checkpoint, state, device=device, data_root=data_root)
    if not is_pretraining(state):
        raise ConfigError(f"{checkpoint} is not a checkpoint of python -m fgvc.pretrain")
    method_class = registered(METHODS, cfg.ssl.method, "ssl.method")
    # The schedules' lengths only matter while training.
    method = build_method(dataclasses.replace(cfg, model=without_weights(cfg.model)), method_class,
                          total_steps=1, steps_per_epoch=1)
    method.load_state_dict(state["model"])
    return LoadedMethod(method.to(runtime.device).eval(), cfg, runtime, build_preprocessing(cfg))


def attention_metrics(cfg: Config, backbone: Backbone, runtime: Runtime, split: str = "test") -> dict[str, float]:
    """peak_in_box and peak_on_part (fgvc.engine.localization) of a ViT backbone's class-token attention over
    cfg.data's `split`: where a self-supervised ViT looks, with no label used to make the maps."""
    dataset = build_dataset(cfg.data, split)
    meter = meter_for(dataset)
    if meter is None:
        raise ConfigError(f"{cfg.data.dataset} has no object boxes or part keypoints to measure attention against")
    loader = build_eval_loader(cfg, dataset, build_preprocessing(cfg), split=split)
    return attention_localization(backbone, loader, runtime.batch, meter)


def run_split(cfg: Config, split: str) -> Dataset:
    """A split of a run's data (cfg.data), checked not to be empty."""
    dataset = build_dataset(cfg.data, split)
    if len(dataset) == 0:
        raise ConfigError(f"the {split} split of {cfg.data.root or cfg.data.dataset} is empty"
                          f"{' (the run trained with data.val_fraction=0)' if split == 'val' else ''}")
    return dataset


def dataset_for(loaded: LoadedModel, split: str) -> Dataset:
    """A split of the data the model was trained on, checked to have the same classes."""
    dataset = run_split(loaded.config, split)
    if list(dataset.classes) != loaded.classes:
        raise ConfigError(f"the {split} split of {loaded.config.data.root or loaded.config.data.dataset} has "
                          "other classes than the ones the model was trained on")
    return dataset

