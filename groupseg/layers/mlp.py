"""Feed-forward layers."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(act: Literal["gelu", "quick_gelu", "relu"]) -> nn.Module:
    if act == "gelu":
        return nn.GELU()
    if act == "quick_gelu":
        return QuickGELU()
    if act == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {act!r}")


class Mlp(nn.Module):
    """Two linear layers with an activation between them.

    Args:
        in_features: input channels.
        hidden_features: hidden channels.
        out_features: output channels (defaults to ``in_features``).
        act: activation name.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act: Literal["gelu", "quick_gelu", "relu"] = "gelu",
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerMlp(Mlp):
    """An ``Mlp`` over the token axis: (B, N, C) -> (B, M, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)
