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


def _neighbours(x: torch.Tensor, dilations: Sequence[int], rows: tuple[int, int] | None = None, padded: torch.Tensor | None = None):
    """Every (dy * d, dx * d) neighbour view of x (B, C, H, W), borders replicated, in (d, offset)
    order: one padding by the largest dilation serves all (replicating by more than d reads the
    same border values as replicating by d). ``rows`` (r0, r1): the views of those rows only;
    ``padded``: x already padded that way (one padding for many bands)."""
    H, W = x.shape[-2:]
    m = max(dilations)
    xp = F.pad(x, (m, m, m, m), mode="replicate") if padded is None else padded
    r0, r1 = rows or (0, H)
    for d in dilations:
        for dy, dx in OFFSETS:
            yield xp[..., m + dy * d + r0 : m + dy * d + r1, m + dx * d : m + dx * d + W]


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
    if image.shape[0] not in (1, scores.shape[0]):
        raise ValueError(f"pamr: {image.shape[0]} images for {scores.shape[0]} score maps")
    # on a CPU one image at a time, so that its scores and weights stay in cache; elsewhere the batch
    cpu, n = scores.device.type == "cpu", scores.shape[0]
    parts = [slice(b, b + 1) for b in range(n)] if cpu and n > 1 else [slice(None)]
    shared = pamr_affinity(image.float(), dilations) if image.shape[0] == 1 else None  # one image for all maps
    out = []
    for part in parts:
        aff = shared if shared is not None else pamr_affinity(image[part].float(), dilations)
        x = scores[part].float()
        for _ in range(iterations):
            x = _propagate(x, aff, dilations)
        out.append(x)
    x = torch.cat(out) if len(out) > 1 else out[0]
    return x[0] if squeeze else x


BAND_BYTES = 8 << 20  # working set of one band of rows in ``_propagate`` on a CPU


def _propagate(x: torch.Tensor, aff: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """One PAMR step on (B, C, H, W) scores with (B or 1, K, H, W) weights: each pixel's weighted
    sum of its neighbours. On a CPU, in bands of rows whose scores, neighbours and weights fit in
    a cache (the whole image at once streams them from memory 48 times: 1.1-1.7x slower on 2
    cores); each band sums its neighbours in the same order, so the result is the same to the bit.
    Elsewhere (a GPU) one band: one kernel per neighbour."""
    H, W = x.shape[-2:]
    m = max(dilations)
    xp = F.pad(x, (m, m, m, m), mode="replicate")
    band = max(16, BAND_BYTES // (4 * (W + 2 * m) * (aff.shape[1] + 2 * x.shape[1]))) if x.device.type == "cpu" else H
    out = torch.zeros_like(x)
    for r0 in range(0, H, band):
        r1 = min(H, r0 + band)
        o = out[..., r0:r1, :]
        for k, nb in enumerate(_neighbours(x, dilations, (r0, r1), xp)):
            o.addcmul_(nb, aff[:, k : k + 1, r0:r1])
    return out
