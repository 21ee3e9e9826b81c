"""The fine-tuning model: a GroupViT with a trainable classifier over its groups."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import groupseg
from groupseg.classify import class_logits


class SegmentationHead(nn.Module):
    """A GroupViT with a trainable classifier over its groups, scored as at inference.

    The classifier keeps one row per synonym (S, D) and an owner index (S,): a class scores as
    its best synonym through ``groupseg.classify.class_logits``, the rule ``Segmenter`` uses, so
    at initialisation (the synonyms' own prompt-ensembled embeddings) the head scores groups
    exactly as the zero-shot model does.

    Args:
        model: the pretrained GroupViT.
        class_embeds: (S, D) initial rows (L2-normalised synonym text embeddings).
        owner: (S,) class index of each row; ``None`` = one row per class.
        groupings: grouping stages that segment (``None`` = all).
    """

    def __init__(self, model: groupseg.GroupViT, class_embeds: torch.Tensor, owner: torch.Tensor | None = None,
                 groupings: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.classifier = nn.Parameter(class_embeds.detach().clone().float())
        owner = torch.arange(len(class_embeds)) if owner is None else torch.as_tensor(owner).long()
        self.register_buffer("owner", owner.clone(), persistent=False)
        self.num_classes = int(owner.max()) + 1 if len(owner) else 0
        self.groupings = groupings
        self.sim_head = nn.Sequential(nn.Linear(model.visual.width, 128), nn.GELU(), nn.Linear(128, 64))

    def no_weight_decay(self) -> set[str]:
        """The model's no-decay parameter names, under this module's prefix."""
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def class_rows(self) -> torch.Tensor:
        """(S, D) L2-normalised classifier rows (what the exported model stores)."""
        return F.normalize(self.classifier.float(), dim=-1)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``group_logits`` (B, G, C), ``grouping`` (B, G, h, w), ``group_embeds`` (B, G, D)
        and ``patch_tokens`` (B, h*w, width): the first grouping stage's patch features."""
        g = self.model.encode_groups(pixels, self.groupings, return_patch_tokens=True)
        scale = self.model.logit_scale.exp().clamp(max=100)
        embeds = g["group_embeds"].float()
        group_logits = class_logits(embeds, self.class_rows(), self.owner, self.num_classes, scale).float()  # (B, G, C)
        return {
            "group_logits": group_logits,
            "grouping": g["grouping"].float(),  # (B, G, h, w), softmax over G
            "group_embeds": embeds,
            "patch_tokens": g["patch_tokens"].float(),
        }
