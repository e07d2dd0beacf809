"""Self-supervised pretraining: one file per method (its heads, momentum encoder and queue), the losses, the views.

Methods are registered by name (`METHODS`); `python -m fgvc.pretrain --method NAME` trains one with the same
engine as supervised training and hands on the backbone's weights (a safetensors file that `model.pretrained_file`
loads). A method class says `needs_tokens` when it works on a ViT's patch tokens only, and `local_crops` when it
takes multi-crop's local crops (DINO).
"""

from fgvc.registry import Registry
from fgvc.ssl.base import SSLMethod
from fgvc.ssl.byol import BYOL
from fgvc.ssl.dino import DINO
from fgvc.ssl.mae import MAE
from fgvc.ssl.moco import MoCo
from fgvc.ssl.simclr import SimCLR
from fgvc.ssl.simsiam import SimSiam

METHODS = Registry("self-supervised method")
for _name, _method in (("simclr", SimCLR), ("moco", MoCo), ("byol", BYOL), ("simsiam", SimSiam),
                        ("dino", DINO), ("mae", MAE)):
    METHODS.register(_name)(_method)

__all__ = ["METHODS", "SSLMethod"]
