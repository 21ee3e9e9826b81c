"""Feed-forward layers and the activations the model configs name."""
from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Two linear layers with an activation between them.

    Args:
        in_features: input channels.
        hidden_features: hidden channels.
        out_features: output channels (defaults to ``in_features``).
        act_layer: activation layer type, built with no arguments.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerMlp(Mlp):
    """An ``Mlp`` over the token axis: (B, N, C) -> (B, M, C).

    Args:
        in_features: tokens in (N).
        hidden_features: hidden size of the token-mixing MLP.
        out_features: tokens out (M; defaults to N).
        act_layer: activation layer type.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)
