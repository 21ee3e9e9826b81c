"""Stochastic depth (drop path): drop a residual branch for a random subset of samples."""
from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole samples of ``x`` (B, ...) with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    The identity in eval mode or with ``p == 0``, so the expected output equals the input.

    >>> x = torch.ones(4, 3)
    >>> torch.equal(drop_path(x, 0.5, training=False), x)
    True
    >>> _ = torch.manual_seed(0)
    >>> sorted(set(drop_path(x, 0.5, training=True).flatten().tolist()))
    [0.0, 2.0]
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ..., 1)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Stochastic depth for a residual branch (Huang et al., 2016): ``x + DropPath(p)(branch(x))``.

    Args:
        p: probability of dropping the branch for a sample, in [0, 1).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
