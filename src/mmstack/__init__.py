"""mmstack: an open multimodal LLM stack (two-tower, bridge, native models and the system around them)."""

from __future__ import annotations

from mmstack.errors import ConfigError, DataError, ImageError, MmstackError, ModelError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ImageError", "MmstackError", "ModelError", "__version__", "load"]


def load(path: str, **kwargs):
    """Load any mmstack checkpoint folder; its ``config.json`` names the model family."""
    from mmstack.models.registry import load_checkpoint

    return load_checkpoint(path, **kwargs)
