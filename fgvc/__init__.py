"""fgvc: fine-grained visual classification baselines, part-aware data and tools.

    import fgvc
    model = fgvc.create_model("isqrt", backbone="resnet50", num_classes=200, pretrained=True)

The API (fgvc.api) is imported on first use, so `import fgvc` stays cheap and the package's command-line modules
(python -m fgvc.data.synthbirds, ...) do not find themselves imported before they run. `fgvc.train` is the module
behind `python -m fgvc.train`; calling it, `fgvc.train(config)`, trains.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API = ("create_model", "list_heads", "list_datasets", "create_dataset", "load_model", "load_config", "train")
__all__ = [*API, "__version__"]


def __getattr__(name: str) -> Any:
    if name == "train":  # a submodule: importing it would replace a function of that name here anyway
        return importlib.import_module("fgvc.train")
    if name in API:
        return getattr(importlib.import_module("fgvc.api"), name)
    raise AttributeError(f"module 'fgvc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
