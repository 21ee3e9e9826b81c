"""STEGO's correspondence-distillation loss (Hamilton et al., ICLR 2022).

For two images with backbone features f, g and head codes s, t:

    F_hwij = cos(f_hw, g_ij)                      feature correspondence
    F^SC_hwij = F_hwij - mean_i'j' F_hwi'j'         spatially centred (over the second image)
    S_hwij = cos(s_hw, t_ij)                      code correspondence
    L(f, g, s, t, b) = - sum_hwij (F^SC_hwij - b) max(S_hwij, 0)

for the image with itself, with a k-nearest neighbour and with a random other image, each with its
own shift b and weight. The head and its cluster probe live in ``groupseg.stego``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correspondence (B, P, Q) between (B, C, P) and (B, C, Q) vectors."""
    return torch.einsum("bcp,bcq->bpq", F.normalize(a, dim=1), F.normalize(b, dim=1))


def pair_loss(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, shift: float) -> torch.Tensor:
    """STEGO's loss of one pair of images: (B, P, Q) per position pair, to be averaged.

    Args:
        f1, f2: (B, C, P) / (B, C, Q) backbone features at sampled positions (no gradient).
        c1, c2: (B, dim, P) / (B, dim, Q) codes at the same positions.
        shift: b; feature correspondences above it attract, below it repel.
    """
    with torch.no_grad():
        fd = correlation(f1.float(), f2.float())
        fd = fd - fd.mean(dim=2, keepdim=True)  # spatially centred over the second image
    cd = correlation(c1, c2)
    return -cd.clamp_min(0) * (fd - shift)


def sample_points(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps read at (B, P, 2) coordinates in [-1, 1] (x, y), bilinear -> (B, C, P)."""
    return F.grid_sample(x, coords[:, :, None], mode="bilinear", padding_mode="border", align_corners=True)[..., 0]


def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (n >= 2)."""
    perm = torch.randperm(n, generator=gen)
    fixed = perm == torch.arange(n)
    return torch.where(fixed, (perm + 1) % n, perm) if fixed.any() else perm


def correspondence_loss(
    feats: torch.Tensor,
    feats_knn: torch.Tensor,
    codes: torch.Tensor,
    codes_knn: torch.Tensor,
    shifts: Sequence[float],
    weights: Sequence[float],
    gen: torch.Generator,
    samples: int = 11,
    rand_pairs: int = 5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """STEGO's correspondence-distillation loss of a batch.

    Args:
        feats, feats_knn: (B, C, h, w) backbone features of the images and of one k-NN of each.
        codes, codes_knn: (B, dim, h, w) the head's codes of the same.
        shifts: (b_self, b_knn, b_rand).
        weights: (l_self, l_knn, l_rand).
        gen: CPU generator for the sampled positions and the random pairs.
        samples: positions per side (samples x samples per image, as STEGO's 11 x 11).
        rand_pairs: random pairings of the batch, averaged (STEGO: 5).

    Returns the weighted loss and its three parts (floats, for logging).
    """
    B = feats.shape[0]
    dev = feats.device

    def coords() -> torch.Tensor:
        return (torch.rand(B, samples * samples, 2, generator=gen) * 2 - 1).to(dev)

    p1, p2 = coords(), coords()
    f, c = sample_points(feats, p1), sample_points(codes, p1)
    fk, ck = sample_points(feats_knn, p2), sample_points(codes_knn, p2)
    parts = {"self": pair_loss(f, f, c, c, shifts[0]).mean(), "knn": pair_loss(f, fk, c, ck, shifts[1]).mean()}
    rand = []
    for _ in range(rand_pairs if B > 1 else 0):
        perm = derangement(B, gen).to(dev)
        rand.append(pair_loss(f, fk[perm], c, ck[perm], shifts[2]).mean())
    parts["rand"] = torch.stack(rand).mean() if rand else feats.new_zeros(())
    total = weights[0] * parts["self"] + weights[1] * parts["knn"] + weights[2] * parts["rand"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
