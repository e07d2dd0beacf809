"""Backbones (timm), heads (registry) and the assembled model."""

from fgvc.models import wsdan  # noqa: F401  (registers the "wsdan" head)
from fgvc.models.heads import HEADS
from fgvc.models.model import FGVCModel, build_model

__all__ = ["HEADS", "FGVCModel", "build_model"]
