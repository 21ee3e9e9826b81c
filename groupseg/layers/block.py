"""Pre-norm transformer blocks."""
from __future__ import annotations

from typing import Literal

import torch
from timm.layers import DropPath
from torch import nn

from .attention import Attention
from .mlp import Mlp


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: channels.
        num_heads: attention heads.
        mlp_ratio: hidden size of the MLP as a multiple of ``dim``.
        act: MLP activation.
        drop_path: stochastic depth rate.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act: Literal["gelu", "quick_gelu"] = "gelu",
        drop_path: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), causal=causal))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttnBlock(nn.Module):
    """Post-norm cross-attention block used before group assignment.

    ``x = q + attn(q, kv)``; ``x = x + mlp(norm2(x))``; ``norm_post(x)``.

    Args:
        dim: channels.
        num_heads: attention heads.
        mlp_ratio: hidden size of the MLP as a multiple of ``dim``.
        act: MLP activation.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: Literal["gelu", "quick_gelu"] = "gelu", eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act)
        self.norm_post = nn.LayerNorm(dim, eps=eps)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = query + self.attn(query, context)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)
