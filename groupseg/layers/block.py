"""Pre-norm transformer blocks."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .drop import DropPath
from .mlp import Mlp


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: channels.
        num_heads: attention heads.
        mlp_ratio: hidden size of the MLP as a multiple of ``dim``.
        act_layer: MLP activation layer type.
        norm_layer: norm layer type, called with ``dim`` (``functools.partial`` sets its eps).
        drop_path: stochastic depth rate.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=act_layer)
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
        act_layer: MLP activation layer type.
        norm_layer: norm layer type, called with ``dim``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=act_layer)
        self.norm_post = norm_layer(dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = query + self.attn(query, context)  # (B, G, C)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)
