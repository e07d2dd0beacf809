"""Backbones (timm), heads (registry) and the assembled model."""

from fgvc.models import wsdan  # noqa: F401  (registers the "wsdan" head)
from fgvc.models.backbone import Backbone, create_backbone
from fgvc.models.heads import HEADS, Head
from fgvc.models.model import FGVCModel

__all__ = ["HEADS", "Backbone", "FGVCModel", "Head", "create_backbone"]
