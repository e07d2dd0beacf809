"""fgvc: fine-grained visual classification baselines, part-aware data and tools."""

__version__ = "0.1.0"
