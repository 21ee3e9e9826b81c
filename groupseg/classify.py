"""Segment classification: the one place where embeddings meet class embeddings.

Every feature that turns segment (group) or image embeddings into class scores calls these
functions: ``Segmenter``, ``groupseg eval``, the fine-tuning head, cluster naming and
``GroupViT.segmentation_logits``. One synonym rule (a class scores as its best synonym), one
image-level top-k rule, one background rule and one label-map step.

>>> import torch
>>> text = torch.eye(3)                       # three synonym embeddings
>>> owner = torch.tensor([0, 1, 1])           # class 0 has one name, class 1 two
>>> class_logits(torch.tensor([[0.0, 0.0, 1.0]]), text, owner, 2, scale=1.0)
tensor([[0., 1.]])
"""
from __future__ import annotations

import numpy as np
import torch

BACKGROUND = 255  # label-map value of background pixels (-1 when a vocabulary has >= 255 classes)


def synonym_max(sim: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-synonym scores (..., S) -> per-class scores (..., C): each class takes its best synonym.

    Args:
        sim: scores of each synonym, last dimension S.
        owner: (S,) class index of each synonym, every class in ``range(num_classes)`` present.
        num_classes: C.
    """
    idx = owner.to(sim.device).expand_as(sim)
    out = sim.new_full((*sim.shape[:-1], num_classes), float("-inf"))
    return out.scatter_reduce(-1, idx, sim, reduce="amax")


def class_logits(embeds: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_classes: int,
                 scale: torch.Tensor | float) -> torch.Tensor:
    """L2-normalised embeddings (..., D) x synonym embeddings (S, D) -> scaled class logits (..., C).

    Args:
        embeds: segment or image embeddings, L2-normalised.
        text: (S, D) L2-normalised synonym (or tuned class) embeddings.
        owner: (S,) class index of each row of ``text``.
        num_classes: C.
        scale: the model's logit scale (exp'd).
    """
    sim = embeds @ text.to(embeds).T  # (..., S)
    return synonym_max(sim, owner, num_classes) * scale


def top_k_filter(group_logits: torch.Tensor, image_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """GroupViT's image-level filter: per-segment class probabilities (B, G, C).

    ``top_k`` 0 is no filter: the softmax over classes. Otherwise, as NVlabs'
    ``GroupViTSegInference`` does, only the image's ``min(top_k, C)`` classes (by the image
    embedding's logits) stay: the softmax over the kept classes' logits times the unfiltered
    softmax. (With ``top_k >= C`` every class stays and the result is the softmax squared.)

    Args:
        group_logits: (B, G, C) class logits of each segment.
        image_logits: (B, C) class logits of the image embedding.
        top_k: number of classes kept per image; 0 keeps all, unfiltered.

    >>> g = torch.tensor([[[2.0, 1.0, 0.0]]]); img = torch.tensor([[0.0, 3.0, 1.0]])
    >>> top_k_filter(g, img, 1)  # class 1 alone stays: 1 x its unfiltered probability
    tensor([[[0.0000, 0.2447, 0.0000]]])
    """
    probs = group_logits.softmax(-1)
    if not top_k:
        return probs
    k = min(top_k, group_logits.shape[-1])
    keep = torch.zeros_like(image_logits, dtype=torch.bool)
    keep.scatter_(-1, image_logits.topk(k, dim=-1).indices, True)
    return group_logits.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1) * probs


# ----------------------------------------------------------------------------- background, label maps
def background_floor(group_probs: torch.Tensor, threshold: float) -> float:
    """NVlabs' background rule: a pixel is background where its best class score is below
    ``min(threshold, best score of any segment in the crop)``, so a crop in which no segment
    reaches the threshold keeps its best segment instead of turning blank.

    Args:
        group_probs: (G, C) class scores of the crop's segments (all of them, as NVlabs).
        threshold: the benchmark's background threshold (VOC 0.95, Context 0.35, COCO-Object 0.95).

    >>> background_floor(torch.tensor([[0.6, 0.4], [0.3, 0.7]]), 0.95)
    0.699999988079071
    """
    return min(float(threshold), float(group_probs.max())) if group_probs.numel() else float(threshold)


def with_background(scores: torch.Tensor, floor: float) -> torch.Tensor:
    """Class scores (..., C) -> (..., 1 + C): a background column first, 1 where the best class
    score is below ``floor`` and 0 elsewhere (NVlabs' background channel), then the scores.

    >>> with_background(torch.tensor([[0.6, 0.4], [0.3, 0.7]]), 0.7)
    tensor([[1.0000, 0.6000, 0.4000],
            [0.0000, 0.3000, 0.7000]])
    """
    bg = (scores.max(-1, keepdim=True).values < floor).to(scores.dtype)
    return torch.cat([bg, scores], dim=-1)


def background_value(num_classes: int) -> int:
    """The label-map value of background: 255 (uint8 maps), or -1 for >= 255 classes (int32 maps)."""
    return BACKGROUND if num_classes < BACKGROUND else -1


def to_label_map(labels: torch.Tensor, num_classes: int, background: torch.Tensor | None = None) -> np.ndarray:
    """The one label-map step: class index per pixel -> a numpy label map (uint8, or int32 for
    >= 255 classes) with ``background`` pixels set to ``background_value(num_classes)``.

    Args:
        labels: (H, W) integer class indices 0..C-1.
        num_classes: C.
        background: (H, W) boolean mask of background pixels, or ``None``.

    >>> to_label_map(torch.tensor([[0, 2]]), 3, torch.tensor([[False, True]]))
    array([[  0, 255]], dtype=uint8)
    """
    lm = labels.cpu().numpy().astype(np.uint8 if num_classes < BACKGROUND else np.int32)
    if background is not None:
        lm[background.cpu().numpy()] = background_value(num_classes)
    return lm


def threshold_label_map(scores: torch.Tensor, threshold: float) -> np.ndarray:
    """groupseg's plain rule on per-pixel scores (C, H, W): the best class, background where its
    score is below ``threshold`` (0 = no background)."""
    conf, label = scores.max(0)
    return to_label_map(label, scores.shape[0], conf < threshold if threshold > 0 else None)


def background_channel_label_map(channels: torch.Tensor, num_classes: int) -> np.ndarray:
    """NVlabs' label map from the argmax over (1 + C) channels whose channel 0 is background:
    channel 0 -> background, channel c -> class c - 1.

    >>> background_channel_label_map(torch.tensor([[0, 1, 3]]), 3)
    array([[255,   0,   2]], dtype=uint8)
    """
    return to_label_map((channels - 1).clamp_min(0), num_classes, channels == 0)
