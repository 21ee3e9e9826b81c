"""Segment classification: the one place where embeddings meet class embeddings.

Every feature that turns segment (group) or image embeddings into class scores calls these
functions: ``Segmenter``, ``groupseg eval``, the fine-tuning head, cluster naming and
``GroupViT.segmentation_logits``. One synonym rule (a class scores as its best synonym), one
image-level top-k rule.

>>> import torch
>>> text = torch.eye(3)                       # three synonym embeddings
>>> owner = torch.tensor([0, 1, 1])           # class 0 has one name, class 1 two
>>> class_logits(torch.tensor([[0.0, 0.0, 1.0]]), text, owner, 2, scale=1.0)
tensor([[0., 1.]])
"""
from __future__ import annotations

import torch


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

    Without a filter (``top_k`` 0 or >= C) this is the softmax over classes. With one, only the
    image's ``top_k`` classes (by the image embedding's logits) stay: the softmax over the kept
    classes' logits times the unfiltered softmax, as NVlabs' ``GroupViTSegInference`` does.

    Args:
        group_logits: (B, G, C) class logits of each segment.
        image_logits: (B, C) class logits of the image embedding.
        top_k: number of classes kept per image; 0 keeps all.
    """
    probs = group_logits.softmax(-1)
    if not top_k or top_k >= group_logits.shape[-1]:
        return probs
    keep = torch.zeros_like(image_logits, dtype=torch.bool)
    keep.scatter_(-1, image_logits.topk(top_k, dim=-1).indices, True)
    return group_logits.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1) * probs
