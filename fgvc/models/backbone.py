"""Backbones: any timm model, returning a B x C x H x W feature map whatever the architecture's own layout."""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from torch import nn

from fgvc.config import ModelConfig


class Backbone(nn.Module):
    """A timm model without its classifier. forward() gives B x C x H x W features: CNNs as they are, NHWC models
    (Swin) permuted, and ViT-style token sequences with the class/register tokens dropped and the patch tokens laid
    back on their grid, so every head sees positions the same way."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # A features_only model (model.feature_stage) returns a list of stage outputs: the last one is pooled.
        self.stage_output = hasattr(model, "feature_info") and not hasattr(model, "forward_features")
        self.num_features = model.feature_info.channels()[-1] if self.stage_output else model.num_features
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images)[-1] if self.stage_output else self.model.forward_features(images)
        if features.ndim == 3:
            tokens = features[:, self.num_prefix_tokens :]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise ValueError(f"cannot lay {tokens.shape[1]} patch tokens on a square grid; use a square input")
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        if self.channels_last_output:
            return features.permute(0, 3, 1, 2)
        return features


# timm.create_model arguments that fgvc sets from its own config keys; model.backbone_args may not override them.
MANAGED_ARGS = {"num_classes": "the head", "features_only": "model.feature_stage", "out_indices": "model.feature_stage",
                "pretrained": "model.pretrained", "pretrained_cfg_overlay": "model.pretrained_file",
                "drop_path_rate": "model.drop_path_rate", "output_stride": "model.output_stride"}


def create_backbone(cfg: ModelConfig) -> Backbone:
    """timm.create_model without a classifier; weights from the hub (`pretrained`) or a local file, offline."""
    for name in cfg.backbone_args:
        if name in MANAGED_ARGS:
            raise ValueError(f"model.backbone_args.{name} is set by {MANAGED_ARGS[name]}; use that instead")
    kwargs: dict = {**cfg.backbone_args, "num_classes": 0}
    if cfg.feature_stage is not None:  # timm builds the network only up to that stage
        kwargs.update(features_only=True, out_indices=(cfg.feature_stage,))
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.output_stride is not None:
        kwargs["output_stride"] = cfg.output_stride
    if cfg.pretrained_file is not None:
        path = Path(cfg.pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_file: {path} does not exist")
        # timm's own pretrained loader reads the file (safetensors or a torch state dict, weights only) and drops the
        # classifier weights that do not fit num_classes=0.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif cfg.pretrained:
        kwargs["pretrained"] = True
    try:
        model = timm.create_model(cfg.backbone, **kwargs)
    except (TypeError, AssertionError) as error:  # an argument the architecture does not take (VGG asserts)
        if cfg.output_stride is None and not cfg.backbone_args:
            raise
        reason = str(error) or "refused by an assertion"
        raise ValueError(f"{cfg.backbone} does not take model.output_stride={cfg.output_stride} or model.backbone_args="
                         f"{cfg.backbone_args} ({reason}); ViT-style backbones, VGG and Inception need "
                         "model.output_stride=null") from None
    except RuntimeError as error:
        if "Unknown model" in str(error):
            close = timm.list_models(f"*{cfg.backbone.split('_')[0]}*")[:8]
            raise ValueError(f"model.backbone: {error}; similar timm names: {', '.join(close)}") from None
        raise
    return Backbone(model)
