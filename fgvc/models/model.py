"""The assembled model: backbone features -> head -> outputs dict ({"logits": ...} and whatever the head adds)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fgvc.models.backbone import Backbone
from fgvc.models.heads import Head, grad_cam

FEATURES_KEY = "features"  # the batch key of cached backbone features (fgvc.transfer.features), read for "image"


class FGVCModel(nn.Module):
    """forward(images) is inference in eval mode (with the head's test-time passes) and one pass in training;
    training_step(batch, criterion) is what the engine calls to train, whatever the method.

    Everything else the engine and the tools need is asked of the model, never read off its parts: which parameters
    are pretrained backbone and which are new layers (parameter_groups), its maps of where the evidence lies, the
    boxes a head crops at test time, and compilation."""

    def __init__(self, backbone: Backbone | nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x C x h x w backbone features."""
        return self.backbone(images)

    def forward_head(self, features: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs for `features` of `images`: one pass in training, with the head's test-time passes (which may
        look at the images again, as WS-DAN's crop does) in eval mode."""
        outputs = self.head(features)
        return outputs if self.training else self.head.refine(self.single_pass, images, outputs)

    def single_pass(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(images), images)

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Inference outputs for a batch dict: of its images, or of the backbone features a feature cache put in
        batch["features"] (fgvc.transfer.features: the backbone is frozen, so its output is fixed)."""
        if FEATURES_KEY in batch:
            return self.forward_head(batch[FEATURES_KEY], None)
        return self(batch["image"])

    def training_step(self, batch: dict, criterion: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """(outputs of the pass on batch["image"], or on cached batch["features"], and the loss dict) -- extra
        passes are the head's business."""
        outputs = self.head(batch[FEATURES_KEY]) if FEATURES_KEY in batch else self.single_pass(batch["image"])
        return outputs, self.head.training_losses(self.single_pass, batch, outputs, criterion)

    # The per-image means training reports beside the loss (batch_statistics' keys): logged and shown in progress.
    running_statistics = ("top1",)

    @staticmethod
    def batch_statistics(outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """Top-1 (%) of the training pass's logits on the batch's (unmixed) labels."""
        return {"top1": 100.0 * (outputs["logits"].argmax(dim=1) == batch["label"]).float().mean()}

    def before_optimizer_step(self, step: int) -> None:
        """Called before optimizer step `step` (0-based), with the step's gradients; a classifier leaves them."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (0-based); a classifier has nothing to update then."""

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by role: "backbone" (what pretrained weights initialize) and "head" (layers that
        are new for this task), so optimizers can treat them apart without knowing the model's structure."""
        return {"backbone": [p for p in self.backbone.parameters() if p.requires_grad],
                "head": [p for p in self.head.parameters() if p.requires_grad]}

    def backbone_layers(self) -> list[list[nn.Parameter]]:
        """The trainable backbone parameters by depth, first to last (timm's fine groups), for layer-wise lr decay;
        layers with nothing left to train are kept, so a layer's depth does not depend on what is frozen."""
        return [[p for p in layer if p.requires_grad] for layer in self.backbone.layers()]

    def freeze_backbone(self, trainable_stages: int = 0) -> None:
        """Train only the last `trainable_stages` backbone stages (0: none, a linear probe); the frozen part keeps
        its weights and stays in eval mode (fgvc.models.backbone.Backbone.freeze)."""
        self.backbone.freeze(trainable_stages)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile in place, part by part, so that every pass a method makes (training_step, the head's
        refine, SnapMix's maps) runs compiled, not only forward()."""
        self.backbone.compile(*args, **kwargs)
        self.head.compile(*args, **kwargs)

    @torch.no_grad()
    def class_activation_maps(self, images: torch.Tensor, labels: torch.Tensor,
                              features: torch.Tensor | None = None) -> torch.Tensor:
        """B x h x w maps of the evidence for `labels`, the head's own kind (Head.class_activation_maps); pass
        `features` when the backbone has already run on `images`."""
        features = self.forward_features(images) if features is None else features
        return self.head.class_activation_maps(features, labels)

    def refuses_size(self, height: int, width: int) -> str | None:
        """Why the model cannot take a height x width input (a ViT built for one size), or None."""
        refuse = getattr(self.backbone, "refuses_size", None)
        return refuse(height, width) if refuse is not None else None

    def grad_cam(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Grad-CAM of `labels` on backbone features, whatever the head."""
        return grad_cam(self.head, features, labels)

    def test_crop_boxes(self, outputs: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor | None:
        """The boxes (fgvc.boxes) the head crops at test time, for heads that crop; None otherwise."""
        return self.head.test_crop_boxes(outputs, size)
