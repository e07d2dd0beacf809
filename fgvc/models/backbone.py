"""Backbones: any timm model, returning a B x C x H x W feature map whatever the architecture's own layout."""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fgvc.errors import FGVCError, OptionError, load_failure, quiet_weights_only_load


class BackboneError(FGVCError, ValueError):
    """A backbone that cannot be built as asked: an unknown name, arguments it does not take, weights that cannot
    be had."""


class Backbone(nn.Module):
    """A timm model without its classifier. forward() gives B x C x H x W features: CNNs as they are, NHWC models
    (Swin) permuted, and ViT-style token sequences with the class/register tokens dropped and the patch tokens laid
    back on their grid (non-square grids included), so every head sees positions the same way.

    Its parameters fall into timm's depth groups (the model's group_matcher): `stages()` are the coarse ones (stem,
    then each stage, as timm draws them: a ViT's blocks, an EfficientNet's blocks and then its head convolution),
    `layers()` the fine ones layer-wise lr decay scales. freeze()
    stops the gradient of the first stages and keeps their modules in eval mode, through every train() call.
    """

    def __init__(self, model: nn.Module, group_matcher: Callable[[bool], dict] | None = None) -> None:
        super().__init__()
        self.model = model
        # A features_only model has no group_matcher of its own: the whole architecture's is passed in.
        self._group_matcher = group_matcher or getattr(model, "group_matcher", None)
        self._frozen: list[nn.Module] = []
        # A features_only model (feature_stage) returns a list of stage outputs: the last one is pooled.
        self.stage_output = hasattr(model, "feature_info") and not hasattr(model, "forward_features")
        self.num_features = model.feature_info.channels()[-1] if self.stage_output else model.num_features
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images)[-1] if self.stage_output else self.model.forward_features(images)
        if features.ndim == 3:
            tokens = features[:, self.num_prefix_tokens :]
            height, width = self.token_grid(images.shape[-2:], tokens.shape[1])
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
        if self.channels_last_output:
            return features.permute(0, 3, 1, 2)
        return features

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def stages(self) -> list[list[nn.Parameter]]:
        """The parameters by stage, first to last (timm's coarse groups: the stem is the first)."""
        return self._groups(coarse=True)

    def layers(self) -> list[list[nn.Parameter]]:
        """The parameters by depth, first to last, as finely as timm groups them for layer-wise lr decay."""
        return self._groups(coarse=False)

    def _groups(self, *, coarse: bool) -> list[list[nn.Parameter]]:
        if self._group_matcher is None:
            raise BackboneError(f"{type(self.model).__name__} has no timm group_matcher, so its stages are unknown "
                                "(transfer.mode=top and optim.layer_decay need them)")
        parameters = dict(self.model.named_parameters())
        matcher = self._group_matcher(coarse)
        known = getattr(self._group_matcher, "parameter_names", None)
        if known is not None and not parameters.keys() <= known:
            # Many features_only wrappers rename their layers (stages_0, model.blocks...), which timm's patterns for
            # the whole model would then lump into one group.
            raise BackboneError(f"the stages of {type(self.model).__name__} built up to model.feature_stage cannot "
                                "be told apart (its layers are renamed); transfer.mode=top and optim.layer_decay need "
                                "model.feature_stage=null")
        groups = group_parameters(self.model, matcher)
        return [[parameters[name] for name in names] for names in groups.values()]

    def freeze(self, trainable_stages: int = 0) -> None:
        """Freeze all but the last `trainable_stages` stages (0: the whole backbone, as a linear probe does): no
        gradient, and every module whose parameters are all frozen stays in eval mode (BatchNorm statistics kept,
        dropout and stochastic depth off), even after train()."""
        if trainable_stages == 0:  # needs no stages
            frozen = [list(self.model.parameters())]
        else:
            stages = self.stages()
            if not 1 <= trainable_stages <= len(stages):
                raise OptionError("trainable_stages", f"{trainable_stages} is not between 1 and the {len(stages)} "
                                                      f"stages of {type(self.model).__name__} (stem included)")
            frozen = stages[:-trainable_stages]
        for parameter in (p for stage in frozen for p in stage):
            parameter.requires_grad_(False)
        self._frozen = [self.model] if trainable_stages == 0 else [
            module for module in self.model.modules() if _wholly_frozen(module)]
        self.train(self.training)

    @property
    def frozen_modules(self) -> list[nn.Module]:
        """The modules freeze() keeps in eval mode."""
        return list(self._frozen)

    def refuses_size(self, height: int, width: int) -> str | None:
        """Why the backbone cannot take a height x width input, or None: a patch-embedding model needs sizes its
        patches divide, and the size it was built for unless it resizes its position embeddings on the fly."""
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "patch_size"):
            return None
        patch_h, patch_w = patch_embed.patch_size
        built = tuple(getattr(patch_embed, "img_size", None) or ())
        if getattr(patch_embed, "strict_img_size", False) and built and (height, width) != built:
            return f"it takes {built[0]} x {built[1]} inputs only"
        if not getattr(patch_embed, "dynamic_img_pad", False) and (height % patch_h or width % patch_w):
            return f"its {patch_h} x {patch_w} patches must divide the input size"
        return None

    def cls_attention(self, images: torch.Tensor) -> torch.Tensor:
        """B x heads x rows x columns: how the class token attends to each patch token in the last block of a timm
        VisionTransformer (the softmax weights of its query's row, computed as the block's own attention computes
        them), laid on the patch grid. Where a self-supervised ViT looks (DINO's Figure 1)."""
        model = self.model
        if not isinstance(model, VisionTransformer) or model.cls_token is None:
            raise BackboneError(f"{type(model).__name__} is not a timm VisionTransformer with a class token, so it "
                                "has no class-token attention to show")
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block in model.blocks[:-1]:
            x = block(x)
        last = model.blocks[-1]
        if not hasattr(getattr(last, "attn", None), "qkv"):
            raise BackboneError(f"the last block of {type(model).__name__} has no timm Attention (qkv) whose weights "
                                "can be read")
        attention, y = last.attn, last.norm1(x)
        batch, count, _ = y.shape
        qkv = attention.qkv(y).reshape(batch, count, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
        query, key = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
        weights = ((query * attention.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
        to_patches = weights[:, :, 0, self.num_prefix_tokens :]
        rows, columns = self.token_grid(images.shape[-2:], to_patches.shape[-1])
        return to_patches.reshape(batch, attention.num_heads, rows, columns)

    def token_grid(self, image_size: tuple[int, int], count: int) -> tuple[int, int]:
        """The (rows, columns) of patch tokens for an input of `image_size`, from the model's patch embedding."""
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            grid = tuple(patch_embed.dynamic_feat_size(tuple(image_size)))
        else:
            grid = tuple(getattr(patch_embed, "grid_size", ()))
        if len(grid) != 2 or grid[0] * grid[1] != count:
            raise BackboneError(f"cannot lay {count} patch tokens of a {tuple(image_size)} input on a grid "
                                f"({grid or 'no patch grid known'})")
        return grid


# timm.create_model arguments that fgvc sets from options of its own; backbone_args may not override them.
MANAGED_ARGS = {"num_classes": "the head's num_classes", "features_only": "`feature_stage`",
                "out_indices": "`feature_stage`", "pretrained": "`pretrained`",
                "pretrained_cfg_overlay": "`pretrained_file`", "drop_path_rate": "`drop_path_rate`",
                "output_stride": "`output_stride`", "img_size": "the input size (data.image_size)"}


def create_backbone(name: str, *, pretrained: bool = False, pretrained_file: str | None = None,
                    output_stride: int | None = None, feature_stage: int | None = None, drop_path_rate: float = 0.0,
                    image_size: int | None = None, backbone_args: dict[str, Any] | None = None) -> Backbone:
    """timm.create_model(name) without a classifier.

    pretrained: weights from the timm / Hugging Face hub; pretrained_file: a local safetensors or state-dict file
    (offline). output_stride: the final feature map's stride, for CNNs that take timm's output_stride (later stages
    dilated instead of downsampled); a ViT accepts its own patch stride. feature_stage: pool this index of timm's
    feature_info instead of the final features (later stages are not built). image_size: the input size of
    backbones made for one (ViT, DeiT, Swin, EVA, ...): timm sizes the position embeddings for it and resamples
    pretrained ones. backbone_args: further timm.create_model keyword arguments (timm's --model-kwargs).
    """
    backbone_args = dict(backbone_args or {})
    for arg in backbone_args:
        if arg in MANAGED_ARGS:
            raise OptionError("backbone_args", f"may not set {arg}: use {MANAGED_ARGS[arg]}")
    check_backbone_name(name)
    kwargs: dict[str, Any] = {**backbone_args, "num_classes": 0}
    group_matcher = None
    if feature_stage is not None:  # timm builds the network only up to that stage
        kwargs.update(features_only=True, out_indices=(feature_stage,))
        group_matcher = _whole_model_group_matcher(name, backbone_args)
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    if image_size is not None and takes_image_size(name):
        kwargs["img_size"] = image_size
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise OptionError("pretrained_file", f"{path} does not exist")
        # timm's own pretrained loader reads the file (safetensors or a torch state dict, weights only) and drops the
        # classifier weights that do not fit num_classes=0.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif pretrained:
        kwargs["pretrained"] = True
    if output_stride is None:
        return Backbone(_create(name, kwargs, backbone_args), group_matcher)
    try:
        return Backbone(_create(name, {**kwargs, "output_stride": output_stride}, backbone_args), group_matcher)
    except (TypeError, AssertionError) as error:  # an architecture without output_stride (ViT), or VGG's assertion
        refusal = str(error) or "refused by an assertion"
    if "output_stride" in refusal:  # no such argument: the architecture's own stride may be the one asked for
        backbone = Backbone(_create(name, kwargs, backbone_args), group_matcher)
        if own_stride(backbone) == output_stride:
            return backbone
        refusal = f"its features have stride {own_stride(backbone)}"
    elif backbone_args:
        raise OptionError("backbone_args", f"{backbone_args} or `output_stride` {output_stride} not taken by {name} "
                                           f"({refusal})")
    raise OptionError("output_stride", f"{output_stride} is not possible for {name} ({refusal}); null keeps the "
                                       "architecture's own (ViT-style backbones, VGG and Inception need null)")


def _wholly_frozen(module: nn.Module) -> bool:
    """Whether a module has parameters and none of them trains (its parameterless children go with it)."""
    parameters = list(module.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


def _whole_model_group_matcher(name: str, backbone_args: dict[str, Any]) -> Callable[[bool], dict]:
    """The group_matcher of the whole architecture, for its features_only variant: the model is built on the meta
    device (no memory, no weights) when the groups are first asked for."""

    @functools.cache
    def whole_model() -> nn.Module:
        with torch.device("meta"):
            return timm.create_model(name, num_classes=0, **backbone_args)

    class WholeModelMatcher:
        """Calls as the whole model's group_matcher; `parameter_names` are the names its patterns were made for."""

        def __call__(self, coarse: bool) -> dict:
            if not hasattr(whole_model(), "group_matcher"):
                raise BackboneError(f"{name} has no timm group_matcher, so its stages are unknown (transfer.mode=top "
                                    "and optim.layer_decay need them)")
            return whole_model().group_matcher(coarse)

        @property
        def parameter_names(self) -> set[str]:
            return {parameter_name for parameter_name, _ in whole_model().named_parameters()}

    return WholeModelMatcher()


def _create(name: str, kwargs: dict[str, Any], backbone_args: dict[str, Any]) -> nn.Module:
    """timm.create_model, with the hub's failures, a pretrained_file that cannot be loaded and refused
    backbone_args as FGVCErrors."""
    file = kwargs.get("pretrained_cfg_overlay", {}).get("file")
    try:
        with _recorded_loads() as loads, quiet_weights_only_load():
            model = timm.create_model(name, **kwargs)
    except (TypeError, AssertionError) as error:
        if "output_stride" in kwargs or not backbone_args:
            raise
        raise OptionError("backbone_args", f"{backbone_args} not taken by {name} "
                                           f"({error or 'refused by an assertion'})") from None
    except Exception as error:  # torch, safetensors and timm raise many types for a file they cannot read
        if file is not None:
            raise OptionError("pretrained_file", f"{file} cannot be loaded into {name}: "
                                                 f"{load_failure(error)}") from None
        if not isinstance(error, OSError):
            raise
        # huggingface_hub or urllib could not reach the hub, or it has no such file
        detail = str(error).splitlines()[0] if str(error) else "no details"
        raise OptionError("pretrained", f"cannot fetch the weights of {name} from the hub ({type(error).__name__}: "
                                        f"{detail}); offline, point `pretrained_file` at a local copy") from None
    if file is not None and loads and loads[-1].missing_keys:
        missing = loads[-1].missing_keys
        raise OptionError("pretrained_file", f"{file} lacks {len(missing)} of the weights of {name} "
                                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it "
                                             "is not a file of this architecture's weights")
    return model


@contextlib.contextmanager
def _recorded_loads() -> Iterator[list]:
    """The results of every load_state_dict while timm creates a model. With num_classes=0 timm loads a pretrained
    file non-strictly (the classifier is gone), so a file that lacks the backbone's own weights would be taken
    silently; its missing keys tell."""
    results, original = [], nn.Module.load_state_dict

    def recording(module: nn.Module, *args: Any, **kwargs: Any):
        result = original(module, *args, **kwargs)
        results.append(result)
        return result

    nn.Module.load_state_dict = recording
    try:
        yield results
    finally:
        nn.Module.load_state_dict = original


def check_backbone_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting the closest ones (resnet5000 -> resnet50, ...)."""
    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        try:
            timm.get_pretrained_cfg(name)  # a pretrained tag (resnet50.a1_in1k) must be one of the architecture's
        except RuntimeError as error:
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{architecture}.*")]
            raise OptionError("backbone", f"{error} Its tags: {', '.join(tags) or 'none'}") from None
        return
    close = difflib.get_close_matches(architecture, timm.list_models(), n=6, cutoff=0.6)
    hint = f"; similar timm names: {', '.join(close)}" if close else ""
    raise OptionError("backbone", f"unknown timm model {name!r}{hint} (timm.list_models() lists them all)")


def takes_image_size(name: str) -> bool:
    """Whether timm builds this architecture for one input size (ViTs, Swin, ...): its weights say so."""
    cfg = timm.get_pretrained_cfg(name.split(".", 1)[0])
    return bool(cfg is not None and cfg.fixed_input_size)


def own_stride(backbone: Backbone) -> int | None:
    """The stride of the architecture's final features, from timm's feature_info."""
    info = getattr(backbone.model, "feature_info", None)
    if not info:
        return None
    last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
    return last.get("reduction")
