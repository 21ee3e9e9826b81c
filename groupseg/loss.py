"""GroupViT's multi-label image-text contrastive loss.

``loss = clip + w * multi_label``:

* clip: symmetric InfoNCE between images and their captions;
* multi_label: each image against the K prompts built from its caption's nouns
  ("a photo of a {noun}."): image -> prompts uses a soft target spread uniformly
  over the image's own K prompts, prompt -> images a one-hot target on its image.

Every rank computes the loss of its own rows against the columns of all ranks,
gathered with gradients (``torch.distributed.nn.all_gather``); the mean of the
per-rank losses equals the one-process loss on the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gather_features(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, differentiable w.r.t. every rank's part."""
    if world_size == 1:
        return x
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(target * log_softmax(logits))``."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class MultiLabelContrastiveLoss(nn.Module):
    """Image-text InfoNCE plus the multi-label image-to-prompts loss.

    Args:
        multi_label_weight: weight of the multi-label term (0 switches it off).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, multi_label_weight: float = 1.0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.multi_label_weight = multi_label_weight
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        multi_label_logit_scale: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args:
            image_embeds: (B, D) L2-normalised.
            text_embeds: (B, D) captions, or (B, 1 + K, D) caption then K prompts, L2-normalised.
            logit_scale: exp'd temperature of the caption term.
            multi_label_logit_scale: exp'd temperature of the prompt term (default: ``logit_scale``).

        Returns:
            ``loss`` (the total), ``clip_loss`` and ``multi_label_loss``.
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
        out["loss"] = total
        return out
