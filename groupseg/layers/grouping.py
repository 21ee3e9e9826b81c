"""Group-token assignment: the part of GroupViT that merges patches into segments."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .block import CrossAttnBlock
from .mlp import Mlp, MixerMlp


def hard_softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot argmax of ``softmax(logits)`` with the straight-through gradient of the softmax."""
    y_soft = logits.softmax(dim)
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    if not torch.is_grad_enabled():
        return y_hard
    return y_hard - y_soft.detach() + y_soft


def gumbel_softmax(logits: torch.Tensor, dim: int, tau: float = 1.0, hard: bool = True) -> torch.Tensor:
    """Gumbel-softmax over ``dim``; ``hard`` gives one-hot samples with a straight-through gradient."""
    finfo = torch.finfo(logits.dtype)
    u = torch.rand_like(logits).clamp_(finfo.tiny, 1.0 - finfo.eps)
    gumbels = -torch.log(-torch.log(u))  # ~Gumbel(0, 1)
    y = (logits + gumbels) / tau
    return hard_softmax(y, dim) if hard else y.softmax(dim)


class AssignAttention(nn.Module):
    """Single-head attention from group tokens to image tokens, normalised over the groups.

    Each image token is assigned to one group (hard, Gumbel noise in training) and a
    group's new feature is the average of its tokens' values.

    Args:
        dim: channels.
        hard: one-hot assignment with a straight-through gradient.
        gumbel_tau: Gumbel temperature during training.
        assign_eps: added to the per-group token count before averaging.
        scale_init: when set, a learnable multiplier of the logits (stored as its log,
            clamped at 100) starts at this value.
    """

    def __init__(
        self, dim: int, hard: bool = True, gumbel_tau: float = 1.0, assign_eps: float = 1.0, scale_init: float | None = None
    ) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale_init))) if scale_init else None
        self.hard = hard
        self.gumbel_tau = gumbel_tau
        self.assign_eps = assign_eps
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, groups: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Assign ``x`` (B, N, C) to ``groups`` (B, G, C).

        Returns:
            new group features (B, G, C) and the soft assignment (B, G, N), softmax over G.
        """
        dim = x.shape[-1]
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(groups, w[:dim], b[:dim])
        k, v = F.linear(x, w[dim:], b[dim:]).chunk(2, dim=-1)
        raw = (q @ k.transpose(1, 2)) * self.scale  # (B, G, N)
        if self.logit_scale is not None:
            raw = raw * self.logit_scale.exp().clamp(max=100)
        soft = raw.softmax(dim=1)
        if self.hard and self.training:
            attn = gumbel_softmax(raw, dim=1, tau=self.gumbel_tau, hard=True)
        elif self.hard:
            attn = hard_softmax(raw, dim=1)
        else:
            attn = soft
        attn = attn / (attn.sum(dim=-1, keepdim=True) + self.assign_eps)
        return self.proj(attn @ v), soft  # (B, G, C)


class GroupingBlock(nn.Module):
    """Merge image tokens into ``num_output_groups`` segments.

    Group tokens are mixed to the output count, refined by cross-attention to the
    image tokens, and then every image token is assigned to one of them.

    Args:
        dim: channels.
        num_heads: heads of the pre-assignment cross-attention.
        num_group_tokens: group tokens coming in.
        num_output_groups: segments going out.
        assign_mlp_ratio: (token-mixing, channel) MLP ratios.
        mlp_ratio: MLP ratio of the pre-assignment cross-attention block.
        act_layer: MLP activation layer type.
        norm_layer: norm layer type, called with ``dim`` (``functools.partial`` sets its eps).
        hard: hard assignment.
        gumbel_tau: Gumbel temperature.
        assign_eps: see ``AssignAttention``.
        assign_scale_init: see ``AssignAttention``'s ``scale_init``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_group_tokens: int,
        num_output_groups: int,
        assign_mlp_ratio: tuple[float, float] = (0.5, 4.0),
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        hard: bool = True,
        gumbel_tau: float = 1.0,
        assign_eps: float = 1.0,
        assign_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        tokens_dim, channels_dim = (int(r * dim) for r in assign_mlp_ratio)
        self.norm_tokens = norm_layer(dim)
        self.mlp_inter = MixerMlp(num_group_tokens, tokens_dim, num_output_groups, act_layer=act_layer)
        self.norm_post_tokens = norm_layer(dim)
        self.norm_x = norm_layer(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer)
        self.assign = AssignAttention(dim, hard=hard, gumbel_tau=gumbel_tau, assign_eps=assign_eps, scale_init=assign_scale_init)
        self.norm_new_x = norm_layer(dim)
        self.mlp_channels = Mlp(dim, channels_dim, dim, act_layer=act_layer)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C) image tokens; group_tokens: (B, S, C). Returns (B, G, C) and soft assignment (B, G, N)."""
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        groups = self.norm_post_tokens(self.mlp_inter(group_tokens))  # (B, G, C)
        groups = self.pre_assign_attn(groups, x)
        new_x, soft = self.assign(groups, x)
        new_x = new_x + groups
        return new_x + self.mlp_channels(self.norm_new_x(new_x)), soft
