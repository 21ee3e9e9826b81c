"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as TCL uses it at test time.

Class scores are repeatedly replaced by an average of their neighbours' scores at several
dilations, weighted by how similar the neighbours' colours are (an affinity normalised by the
local colour spread and softmaxed over the neighbours). Segment boundaries move onto image edges.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DILATIONS = (1, 2, 4, 8, 12, 24)
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _neighbours(x: torch.Tensor, dilations: Sequence[int]):
    """Every (dy * d, dx * d) neighbour view of x (B, C, H, W), borders replicated, in (d, offset)
    order: one padding by the largest dilation serves all (replicating by more than d reads the
    same border values as replicating by d)."""
    H, W = x.shape[-2:]
    m = max(dilations)
    xp = F.pad(x, (m, m, m, m), mode="replicate")
    for d in dilations:
        for dy, dx in OFFSETS:
            yield xp[..., m + dy * d : m + dy * d + H, m + dx * d : m + dx * d + W]


@torch.no_grad()
def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """(B, 3, H, W) image -> (B, K, H, W) neighbour weights (K = 8 per dilation), summing to 1 over K."""
    nb = torch.stack(list(_neighbours(image, dilations)), 2)  # (B, 3, K, H, W)
    std = nb.std(dim=2, keepdim=True)
    aff = -((nb - image[:, :, None]).abs() / (1e-8 + 0.1 * std)).mean(1)  # (B, K, H, W)
    return aff.softmax(1)


@torch.no_grad()
def pamr(image: torch.Tensor, scores: torch.Tensor, iterations: int = 10, dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """Refine class scores with image-adaptive neighbour averaging.

    Args:
        image: (B, 3, H, W) or (3, H, W) image (any normalisation; the affinity is scale-free).
        scores: (B, C, H, W) or (C, H, W) class scores at the image's resolution.
        iterations: propagation steps (TCL: 10).
        dilations: neighbourhood dilations (TCL: 1, 2, 4, 8, 12, 24).

    Returns refined scores of the same shape; each step is a convex combination of neighbours,
    so probabilities stay probabilities.
    """
    squeeze = scores.dim() == 3
    if squeeze:
        image, scores = image[None], scores[None]
    if image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"pamr: image {tuple(image.shape[-2:])} and scores {tuple(scores.shape[-2:])} differ in size")
    aff = pamr_affinity(image.float(), dilations)
    x = scores.float()
    for _ in range(iterations):
        out = torch.zeros_like(x)
        for k, nb in enumerate(_neighbours(x, dilations)):
            out.addcmul_(nb, aff[:, k : k + 1])
        x = out
    return x[0] if squeeze else x
