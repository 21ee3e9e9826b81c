"""Losses: image-text contrastive pretraining (``contrastive``), segmentation fine-tuning
(``segmentation``) and STEGO's correspondence distillation (``correspondence``). Each takes ``rank``/``world_size`` where it gathers, defaulting to one process.
"""
from .correspondence import correspondence_loss
from .contrastive import MultiLabelContrastiveLoss, gather_features, group_usage_loss, soft_cross_entropy
from .segmentation import (
    IGNORE,
    complementary_loss,
    patch_groups,
    patch_labels,
    pixel_log_probs,
    pixel_pair_similarity_losses,
    random_pairs,
    sample_patches,
    tag_scores,
    triplet_loss,
)

__all__ = [
    "IGNORE", "MultiLabelContrastiveLoss", "complementary_loss", "correspondence_loss", "gather_features", "group_usage_loss",
    "patch_groups", "patch_labels", "pixel_log_probs", "pixel_pair_similarity_losses", "random_pairs",
    "sample_patches", "soft_cross_entropy", "tag_scores", "triplet_loss",
]
