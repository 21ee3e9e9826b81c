"""groupseg: open-vocabulary, zero-shot semantic segmentation with GroupViT.

Importing ``groupseg`` (and so the ``groupseg`` command) loads no torch: each name below is
imported from its module on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "convert",
    "GroupViT": "models.groupvit",
    "ModelConfig": "config",
    "Segmenter": "segment",
    "SegmentationResult": "segment",
    "StageConfig": "config",
    "TextConfig": "config",
    "VisionConfig": "config",
    "create_model": "factory",
    "get_model_config": "factory",
    "list_models": "factory",
    "load_model": "factory",
    "read_weights": "factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'groupseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
