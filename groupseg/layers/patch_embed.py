"""Patch embedding and position-embedding resizing."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions (BatchNorm, ReLU) down to ``patch`` stride, then a 1x1 to ``dim``.

    The "early convolutions" stem of Xiao et al. (NeurIPS 2021): same token grid as a
    patchify convolution, but a ViT trained from scratch on little data optimises faster
    and generalises better with it.

    Args:
        patch_size: total stride, a power of two >= 2.
        in_chans: input channels.
        dim: output channels.
        norm_layer: norm layer type after each 3x3 convolution, called with its channels.
        act_layer: activation layer type after each norm, built with no arguments.
    """

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        dim: int,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        n = patch_size.bit_length() - 1
        if patch_size < 2 or 2**n != patch_size:
            raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(n):
            c_out = max(dim // 2 ** (n - 1 - i), 16)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), norm_layer(c_out), act_layer()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchEmbed(nn.Module):
    """Patches by a strided convolution (or a convolutional stem), then LayerNorm.

    Any input size works: the output grid is ``(H // patch, W // patch)``.

    Args:
        patch_size: side of a square patch in pixels.
        in_chans: input channels.
        dim: output channels.
        norm_layer: norm layer type over the tokens, called with ``dim`` (``functools.partial`` sets its eps).
        stem: ``"patch"`` (one patch_size x patch_size convolution, as GroupViT and ViT) or
            ``"conv"`` (``ConvStem``).
    """

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        dim: int,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        stem: Literal["patch", "conv"] = "patch",
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        if stem == "patch":
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        elif stem == "conv":
            self.proj = ConvStem(patch_size, in_chans, dim)
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'patch' or 'conv'")
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.proj(x[..., : h * self.patch_size, : w * self.patch_size])  # (B, C, h, w)
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
