"""GroupViT vision tower: patches -> transformer stages with learned group tokens -> segments."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import StageConfig, VisionConfig
from ..layers.block import Block
from ..layers.grouping import GroupingBlock
from ..layers.create import layer_types
from ..layers.mlp import MixerMlp
from ..layers.patch_embed import PatchEmbed, resize_pos_embed


class GroupProjector(nn.Module):
    """Maps the previous stage's group tokens onto this stage's (token-mixing MLP).

    Args:
        dim: channels.
        num_in: group tokens of the previous stage.
        num_out: group tokens of this stage.
        act_layer: activation layer type.
        norm_layer: norm layer type, called with ``dim``.
    """

    def __init__(
        self, dim: int, num_in: int, num_out: int, act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm
    ) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.mlp = MixerMlp(num_in, dim // 2, num_out, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


class GroupingStage(nn.Module):
    """Transformer blocks over [image tokens; group tokens], then an optional grouping block.

    Args:
        cfg: the vision configuration (width, MLP ratios, activation, assignment settings).
        stage: this stage's record.
        prev_group_tokens: group tokens of the previous stage (0: none, no projector).
        drop_path: stochastic depth rate of each of this stage's blocks.
    """

    def __init__(self, cfg: VisionConfig, stage: StageConfig, prev_group_tokens: int, drop_path: list[float]) -> None:
        super().__init__()
        d = cfg.width
        act_layer, norm_layer = layer_types(cfg.act, cfg.layer_norm_eps)
        self.num_group_tokens = stage.num_group_tokens
        self.grad_checkpointing = False
        if stage.num_group_tokens:
            self.group_token = nn.Parameter(torch.zeros(1, stage.num_group_tokens, d))
        else:
            self.register_parameter("group_token", None)
        self.group_projector = (
            GroupProjector(d, prev_group_tokens, stage.num_group_tokens, act_layer, norm_layer)
            if stage.num_group_tokens and prev_group_tokens
            else None
        )
        self.blocks = nn.ModuleList(
            Block(d, stage.num_heads, cfg.mlp_ratio, act_layer, norm_layer, drop_path[i]) for i in range(stage.depth)
        )
        self.grouping = (
            GroupingBlock(
                d,
                stage.num_heads,
                stage.num_group_tokens,
                stage.num_output_groups,
                cfg.assign_mlp_ratio,
                cfg.mlp_ratio,
                act_layer=act_layer,
                norm_layer=norm_layer,
                hard=cfg.hard_assignment,
                gumbel_tau=cfg.gumbel_tau,
                assign_eps=cfg.assign_eps,
                assign_scale_init=cfg.assign_scale_init,
            )
            if stage.num_output_groups
            else None
        )

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def attend(
        self, x: torch.Tensor, prev_groups: torch.Tensor | None, group: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's blocks over [image tokens; group tokens], before any grouping.

        Returns the image tokens (B, N, C) and this stage's group tokens (B, S, C), or ``None``
        when the stage has none or ``group=False`` (then the blocks run over the image tokens alone).
        """
        n = x.shape[1]
        with_groups = group and self.group_token is not None
        if with_groups:
            groups = self.group_token.expand(x.shape[0], -1, -1)
            if self.group_projector is not None and prev_groups is not None:
                groups = groups + self.group_projector(prev_groups)
            x = torch.cat([x, groups], dim=1)  # (B, N + S, C)
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(self._run_blocks, x, use_reentrant=False)
        else:
            x = self._run_blocks(x)
        return (x[:, :n], x[:, n:]) if with_groups else (x, None)

    def forward(
        self, x: torch.Tensor, prev_groups: torch.Tensor | None, group: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x: (B, N, C). Returns (tokens out, this stage's group tokens, soft assignment (B, G, N) or None).

        ``group=False`` runs only the blocks over the image tokens: the tokens pass through unmerged.
        """
        x, groups = self.attend(x, prev_groups, group)
        if not group or self.grouping is None:
            return x, groups, None
        x, assignment = self.grouping(x, groups)  # (B, G, C), (B, G, N)
        return x, groups, assignment


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # (B, G, C) final tokens after the last norm: one per segment
    pooled: torch.Tensor  # (B, C) mean of tokens
    assignments: list[torch.Tensor]  # per grouping stage: soft assignment (B, G_i, N_{i-1}), softmax over G_i
    grid: tuple[int, int]  # patch grid (h, w) of the input
    patch_tokens: torch.Tensor | None = None  # (B, h*w, C) first stage's image tokens before its grouping (on request)


class VisionTower(nn.Module):
    """GroupViT image encoder.

    Args:
        cfg: the vision configuration.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        _, norm_layer = layer_types(cfg.act, cfg.layer_norm_eps)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.width, norm_layer=norm_layer, stem=cfg.stem)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, cfg.width))
        total = sum(s.depth for s in cfg.stages)
        dpr = torch.linspace(0, cfg.drop_path_rate, total).tolist() if total else []
        self.stages = nn.ModuleList()
        prev, start = 0, 0
        for s in cfg.stages:
            self.stages.append(GroupingStage(cfg, s, prev, dpr[start : start + s.depth]))
            prev, start = s.num_group_tokens, start + s.depth
        self.norm = norm_layer(cfg.width)

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, pixels: torch.Tensor, groupings: int | None = None, return_patch_tokens: bool = False) -> VisionOutput:
        """Encode images; ``groupings`` = how many grouping stages merge tokens (None = all).

        With fewer groupings the later stages' blocks run over the finer segments of the last
        grouping used (their group tokens are left out), e.g. ``groupings=1`` segments an image
        into the first stage's 64 groups instead of the final 8. ``return_patch_tokens`` also
        returns the first stage's image tokens after its blocks (one per patch, in grid order),
        the features its grouping reads.
        """
        x, grid = self.patch_embed(pixels)  # (B, h*w, C)
        x = x + resize_pos_embed(self.pos_embed, grid)
        groups, assignments, patch_tokens = None, [], None
        for i, stage in enumerate(self.stages):
            merge = groupings is None or len(assignments) < groupings
            x, groups = stage.attend(x, groups, group=merge)
            if i == 0 and return_patch_tokens:
                patch_tokens = x  # (B, h*w, C)
            if merge and stage.grouping is not None:
                x, assignment = stage.grouping(x, groups)  # (B, G, C), (B, G, N)
                assignments.append(assignment)
        x = self.norm(x)
        return VisionOutput(tokens=x, pooled=x.mean(dim=1), assignments=assignments, grid=grid, patch_tokens=patch_tokens)
