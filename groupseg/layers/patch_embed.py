"""Patch embedding and position-embedding resizing."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution, then LayerNorm.

    Any input size works: the output grid is ``(H // patch, W // patch)``.

    Args:
        patch_size: side of a square patch in pixels.
        in_chans: input channels.
        dim: output channels.
        eps: LayerNorm epsilon.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, h, w)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw  # (B, h*w, C)


def resize_pos_embed(pos: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a square (1, g*g, C) position table to an (h, w) grid."""
    n, c = pos.shape[1], pos.shape[2]
    g = int(round(n**0.5))
    if (g, g) == tuple(hw):
        return pos
    grid = pos.reshape(1, g, g, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=hw, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], c)
