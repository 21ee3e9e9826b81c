"""groupseg: open-vocabulary, zero-shot semantic segmentation with GroupViT."""
from .config import ModelConfig, StageConfig, TextConfig, VisionConfig
from .convert import CheckpointError
from .factory import create_model, get_model_config, list_models, load_model, read_weights
from .models.groupvit import GroupViT

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GroupViT",
    "ModelConfig",
    "Segmenter",
    "SegmentationResult",
    "StageConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_model_config",
    "list_models",
    "load_model",
    "read_weights",
]


def __getattr__(name: str):
    # the segmentation API pulls in PIL and the tokenizer: import it on first use
    if name in ("Segmenter", "SegmentationResult"):
        from . import segment

        return getattr(segment, name)
    raise AttributeError(f"module 'groupseg' has no attribute {name!r}")
