"""GroupViT's multi-label image-text contrastive loss (and its segment-level terms).

``loss = clip + w * multi_label``:

* clip: symmetric InfoNCE between images and their captions;
* multi_label: each image against the K prompts built from its caption's nouns
  ("a photo of a {noun}."): image -> prompts uses a soft target spread uniformly
  over the image's own K prompts, prompt -> images a one-hot target on its image.

Two optional terms act on the segments rather than the pooled image (off by default;
the shipped model's config switches them on, with a learnable assignment scale
(``VisionConfig.assign_scale_init``), because on a few thousand photos the assignments
otherwise stay flat and the last grouping stage ends as one segment per image):

* group_label: the same multi-label targets, but an image's score for a prompt is its
  best-matching segment's (multiple-instance learning over segments), so each noun
  of the caption pulls on one segment and different nouns on different segments;
* group_usage: information maximisation between patches and a stage's groups, scaled
  to [0, 1] by log(G) and averaged over the grouping stages: 1 - (H(mean_n p_n) -
  mean_n H(p_n)) / log(G), where p_n is patch n's soft assignment. 0 when every patch
  sits confidently in one group and all groups are used equally; 1 when assignments
  are flat (then the hard, Gumbel-noised assignment of training is a coin toss) or
  every patch lands in one group.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def gather_features(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, differentiable w.r.t. every rank's part."""
    if world_size == 1:
        return x
    import torch.distributed.nn as dist_nn

    out = torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)
    if out.requires_grad:
        # the gather's backward sends each rank's slice of this gradient as is; gloo reads a
        # non-contiguous slice (e.g. of an einsum's transposed gradient) as if it were packed
        out.register_hook(lambda g: g.contiguous())
    return out


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(target * log_softmax(logits))``."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def group_usage_loss(grouping: torch.Tensor) -> torch.Tensor:
    """``1 - I(patch; group) / log G`` for soft maps (B, G, ...) summing to 1 over G, mean over images."""
    p = grouping.float().flatten(2)  # (B, G, N)
    g = p.shape[1]
    sizes = p.mean(-1)  # (B, G)
    h_sizes = -(sizes * sizes.clamp_min(1e-8).log()).sum(-1)  # H(mean p): even use of groups
    h_patch = -(p * p.clamp_min(1e-8).log()).sum(1).mean(-1)  # mean H(p_n): each patch's uncertainty
    return (1.0 - (h_sizes - h_patch) / math.log(g)).mean()


class MultiLabelContrastiveLoss(nn.Module):
    """Image-text InfoNCE plus the multi-label image-to-prompts loss.

    Args:
        multi_label_weight: weight of the multi-label term (0 switches it off).
        rank: this process's rank.
        world_size: number of processes.
        group_label_weight: weight of the segment-level multi-label term (needs ``group_embeds``).
        group_usage_weight: weight of the assignment information term (needs ``grouping``).
    """

    def __init__(
        self,
        multi_label_weight: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        group_label_weight: float = 0.0,
        group_usage_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.multi_label_weight = multi_label_weight
        self.group_label_weight = group_label_weight
        self.group_usage_weight = group_usage_weight
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        multi_label_logit_scale: torch.Tensor | None = None,
        group_embeds: torch.Tensor | None = None,
        grouping: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args:
            image_embeds: (B, D) L2-normalised.
            text_embeds: (B, D) captions, or (B, 1 + K, D) caption then K prompts, L2-normalised.
            logit_scale: exp'd temperature of the caption term.
            multi_label_logit_scale: exp'd temperature of the prompt term (default: ``logit_scale``).
            group_embeds: (B, G, D) L2-normalised segment embeddings (for group_label).
            grouping: (B, G, h, w) soft maps of patches over segments, softmax over G, or one
                such map per grouping stage (for group_usage).

        Returns:
            ``loss`` (the total), ``clip_loss``, ``multi_label_loss`` and, when their weights
            are set, ``group_label_loss`` and ``group_usage_loss``.
        """
        img = image_embeds.float()
        txt = text_embeds.float()
        prompts = None
        if txt.ndim == 3:
            txt, prompts = txt[:, 0], txt[:, 1:]
        B = img.shape[0]
        r, w = self.rank, self.world_size
        all_img = gather_features(img, r, w)
        all_txt = gather_features(txt, r, w)
        labels = torch.arange(B, device=img.device) + r * B
        clip = 0.5 * (
            F.cross_entropy(logit_scale * img @ all_txt.T, labels) + F.cross_entropy(logit_scale * txt @ all_img.T, labels)
        )
        out = {"clip_loss": clip}
        total = clip
        if prompts is not None and prompts.shape[1] > 0 and self.multi_label_weight:
            K = prompts.shape[1]
            scale = logit_scale if multi_label_logit_scale is None else multi_label_logit_scale
            flat = prompts.reshape(B * K, -1)  # (B*K, D), image b's prompts at rows b*K .. b*K+K-1
            all_flat = gather_features(flat, r, w)  # (W*B*K, D)
            # image -> prompts: uniform over its own K prompts
            t_img = torch.zeros(B, all_flat.shape[0], device=img.device)
            cols = (labels[:, None] * K + torch.arange(K, device=img.device)).reshape(B, K)
            t_img.scatter_(1, cols, 1.0 / K)
            # prompt -> images: its own image
            t_txt = F.one_hot(labels.repeat_interleave(K), all_img.shape[0]).float()
            ml = 0.5 * (soft_cross_entropy(scale * img @ all_flat.T, t_img) + soft_cross_entropy(scale * flat @ all_img.T, t_txt))
            out["multi_label_loss"] = ml
            total = total + self.multi_label_weight * ml
            if self.group_label_weight and group_embeds is not None:
                grp = group_embeds.float()
                all_grp = gather_features(grp, r, w)  # (W*B, G, D)
                # a pair's score is its best segment's: (B, W*B*K) and (B*K, W*B)
                img_to_prompt = torch.einsum("bgd,pd->bpg", grp, all_flat).amax(-1)
                prompt_to_img = torch.einsum("pd,bgd->pbg", flat, all_grp).amax(-1)
                gl = 0.5 * (soft_cross_entropy(scale * img_to_prompt, t_img) + soft_cross_entropy(scale * prompt_to_img, t_txt))
                out["group_label_loss"] = gl
                total = total + self.group_label_weight * gl
        if self.group_usage_weight and grouping is not None:
            maps = [grouping] if torch.is_tensor(grouping) else list(grouping)
            usage = sum(group_usage_loss(m) for m in maps) / len(maps)
            out["group_usage_loss"] = usage
            total = total + self.group_usage_weight * usage
        out["loss"] = total
        return out
