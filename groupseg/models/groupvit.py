"""The two-tower GroupViT model."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..layers.grouping import AssignAttention
from .text import build_text_tower
from .vision import VisionOutput, VisionTower


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear (GroupViT's 2-layer projector), or one Linear.

    Args:
        in_dim: input channels.
        hidden_dim: hidden channels; 0 gives a single linear layer.
        out_dim: output channels.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        if hidden_dim:
            self.fc1 = nn.Linear(in_dim, hidden_dim)
            self.bn = nn.BatchNorm1d(hidden_dim)
            self.fc2 = nn.Linear(hidden_dim, out_dim)
        else:
            self.fc1, self.bn = None, None
            self.fc2 = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # BatchNorm1d wants (N, C)
        if self.fc1 is not None:
            x = F.relu(self.bn(self.fc1(x)))
        return self.fc2(x).reshape(*shape[:-1], -1)


def soft_grouping(assignments: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Chain per-stage soft assignments into (B, G_last, h, w) maps over the patch grid."""
    chain = assignments[0]  # (B, G1, N)
    for a in assignments[1:]:
        chain = a @ chain  # (B, G_i, G_{i-1}) @ (B, G_{i-1}, N)
    return chain.reshape(chain.shape[0], chain.shape[1], *grid)


class GroupViT(nn.Module):
    """GroupViT: a grouping vision transformer and a text transformer in one embedding space.

    ``forward`` returns embeddings and temperatures, never a loss (see ``groupseg.loss``).

    Args:
        cfg: the model configuration.

    >>> import groupseg
    >>> model = groupseg.create_model("groupvit-tiny-test").eval()
    >>> model.encode_image(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 16])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.text = build_text_tower(cfg.text)
        self.visual_proj = ProjectionHead(self.visual.width, cfg.proj_hidden_dim, cfg.embed_dim)
        self.text_proj = ProjectionHead(self.text.width, cfg.proj_hidden_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        if cfg.multi_label_logit_scale:
            self.multi_label_logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        else:
            self.register_parameter("multi_label_logit_scale", None)
        if cfg.tuned_classes:  # fine-tuned class vectors, in the joint space (see ``ModelConfig``)
            rows = len(cfg.tuned_owner) or len(cfg.tuned_classes)
            self.tuned_class_embeds = nn.Parameter(torch.zeros(rows, cfg.embed_dim))
        else:
            self.register_parameter("tuned_class_embeds", None)
        self.init_weights()
        if cfg.stego:  # unsupervised segmentation head and its cluster centres (groupseg.stego)
            from ..stego import build_head

            self.stego = build_head(cfg.stego, cfg.embed_dim)

    # ---------------------------------------------------------------- init / timm interface
    def init_weights(self) -> None:
        def _init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.visual.apply(_init)
        self.visual_proj.apply(_init)
        self.text_proj.apply(_init)
        nn.init.trunc_normal_(self.visual.pos_embed, std=0.02)
        for i, stage in enumerate(self.visual.stages):
            if stage.group_token is not None and stage.group_projector is None:
                nn.init.trunc_normal_(stage.group_token, std=0.02)  # zero when a projector feeds it
        if self.cfg.text.kind == "transformer":
            t = self.text
            w, layers = t.width, len(t.blocks)
            for blk in t.blocks:
                nn.init.normal_(blk.attn.qkv.weight, std=w**-0.5)
                nn.init.normal_(blk.attn.proj.weight, std=w**-0.5 * (2 * layers) ** -0.5)
                nn.init.normal_(blk.mlp.fc1.weight, std=(2 * w) ** -0.5)
                nn.init.normal_(blk.mlp.fc2.weight, std=w**-0.5 * (2 * layers) ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.visual.stages:
            stage.grad_checkpointing = enable
        if hasattr(self.text, "grad_checkpointing"):
            self.text.grad_checkpointing = enable
        elif enable:
            self.text.encoder.gradient_checkpointing_enable()

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay: norms, biases, embeddings and tokens."""
        names = set()
        for n, p in self.named_parameters():
            if p.ndim <= 1 or n.endswith(("pos_embed", "group_token", "token_embed.weight")) or "embeddings" in n:
                names.add(n)
        return names

    # ---------------------------------------------------------------- encoders
    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_vision(self, pixels: torch.Tensor) -> VisionOutput:
        """Run the vision tower: final segment tokens, pooled feature and soft assignments."""
        return self.visual(pixels)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) image embeddings (L2-normalised by default)."""
        x = self.visual_proj(self.visual(pixels).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(..., L) token ids -> (..., D) text embeddings (L2-normalised by default)."""
        lead = ids.shape[:-1]
        ids = ids.reshape(-1, ids.shape[-1])
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
        x = self.text_proj(self.text(ids, attention_mask))
        x = x.reshape(*lead, -1)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_groups(
        self, pixels: torch.Tensor, groupings: int | None = None, return_patch_tokens: bool = False
    ) -> dict[str, torch.Tensor | list | tuple]:
        """Segment embeddings and how patches map onto them.

        Returns a dict with ``group_embeds`` (B, G, D) L2-normalised, ``image_embeds``
        (B, D) L2-normalised, ``grouping`` (B, G, h, w) soft maps over the patch grid
        (softmax over G), ``assignments`` (per-stage soft assignments) and ``grid``.
        ``groupings`` limits the grouping stages used (see ``VisionTower.forward``);
        ``return_patch_tokens`` adds ``patch_tokens`` (B, h*w, width): the first grouping
        stage's patch features, which its grouping reads (one per patch, in grid order).
        """
        out = self.visual(pixels, groupings, return_patch_tokens=return_patch_tokens)
        groups = F.normalize(self.visual_proj(out.tokens), dim=-1)  # (B, G, D)
        image = F.normalize(self.visual_proj(out.pooled), dim=-1)
        if out.assignments:
            grouping = soft_grouping(out.assignments, out.grid)
        else:  # no grouping stage: every patch is its own segment
            b, n = out.tokens.shape[:2]
            eye = torch.eye(n, device=pixels.device, dtype=groups.dtype).expand(b, n, n)
            grouping = eye.reshape(b, n, *out.grid)
        res = {
            "group_embeds": groups,
            "image_embeds": image,
            "grouping": grouping,
            "assignments": out.assignments,
            "grid": out.grid,
        }
        if return_patch_tokens:
            res["patch_tokens"] = out.patch_tokens
        return res

    def segmentation_logits(self, pixels: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pixel class logits (B, C, H, W) at the input resolution.

        Each segment's class logits (``groupseg.classify.class_logits``: cosine similarity x
        logit scale, a class scoring as its best synonym), spread over pixels by the soft
        grouping maps (bilinearly upsampled) and scaled once more, as transformers'
        ``GroupViTModel`` defines ``segmentation_logits``.

        Args:
            pixels: (B, 3, H, W) normalised images.
            text_emb: (S, D) L2-normalised class (or synonym) embeddings.
            owner: (S,) class index of each row of ``text_emb``; ``None`` = one row per class.
        """
        from ..classify import class_logits

        g = self.encode_groups(pixels)
        scale = self.logit_scale.exp()
        owner = torch.arange(text_emb.shape[0]) if owner is None else owner
        logits = class_logits(g["group_embeds"], text_emb, owner, int(owner.max()) + 1, scale)  # (B, G, C)
        grouping = F.interpolate(g["grouping"], size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        seg = torch.einsum("bgc,bghw->bchw", logits, grouping)
        return seg * scale

    def set_tuned_classes(self, names: list[str], embeds: torch.Tensor, owner: list[int] | torch.Tensor | None = None) -> None:
        """Store fine-tuned class vectors for the class labels ``names`` (saved with the weights).

        Args:
            names: C class labels.
            embeds: (S, D) tuned rows: one per class, or one per synonym with ``owner``.
            owner: (S,) index into ``names`` of each row (a class scores as its best row, as
                ``groupseg.classify.class_logits`` does); ``None`` = one row per class.
        """
        owner = list(range(len(names))) if owner is None else [int(o) for o in owner]
        if len(owner) != embeds.shape[0] or embeds.shape[-1] != self.cfg.embed_dim or set(owner) != set(range(len(names))):
            raise ValueError(f"{len(names)} names for tuned class vectors of shape {tuple(embeds.shape)}")
        self.cfg.tuned_classes = list(names)
        self.cfg.tuned_owner = [] if owner == list(range(len(names))) else owner
        self.tuned_class_embeds = nn.Parameter(embeds.detach().to(self.logit_scale).clone(), requires_grad=False)

    def clear_tuned_classes(self) -> None:
        """Forget the fine-tuned class vectors: every word goes through the text tower again."""
        self.cfg.tuned_classes, self.cfg.tuned_owner = [], []
        if self.tuned_class_embeds is not None:
            del self.tuned_class_embeds
            self.register_parameter("tuned_class_embeds", None)

    def tuned_class_rows(self, label: str) -> torch.Tensor | None:
        """The L2-normalised fine-tuned rows (k, D) of a class label (k > 1: one per synonym), or ``None``."""
        if self.tuned_class_embeds is None or label not in self.cfg.tuned_classes:
            return None
        c = self.cfg.tuned_classes.index(label)
        owner = self.cfg.tuned_owner or list(range(len(self.cfg.tuned_classes)))
        rows = [i for i, o in enumerate(owner) if o == c]
        return F.normalize(self.tuned_class_embeds[rows].detach().float(), dim=-1)

    def tuned_class_embedding(self, label: str) -> torch.Tensor | None:
        """The L2-normalised fine-tuned vector (D,) of a class label (its first row), or ``None``."""
        rows = self.tuned_class_rows(label)
        return None if rows is None else rows[0]

    def sharpen_assignments(self, init: float) -> list[nn.Parameter]:
        """Give every grouping assignment that has none a learnable logit multiplier starting at ``init``.

        Recorded in the model config (``vision.assign_scale_init``), so saved weights load with it.
        Models trained on few photos assign patches with nearly flat logits (the shipped model's
        first stage: mean max probability 0.03 over 64 groups), so a per-pixel loss on the soft
        grouping barely localises; the multiplier lets fine-tuning sharpen them. The argmax
        segments stay as they are.

        Args:
            init: the multiplier's starting value (> 0).

        Returns:
            the assignment scales (stored as logs), new and existing.
        """
        for m in self.modules():
            if isinstance(m, AssignAttention) and m.logit_scale is None:
                m.logit_scale = nn.Parameter(torch.tensor(math.log(init), device=m.qkv.weight.device))
        self.cfg.vision.assign_scale_init = init
        return self.assignment_scales()

    def assignment_scales(self) -> list[nn.Parameter]:
        """The learnable logit multipliers (logs) of the grouping assignments that have one."""
        return [m.logit_scale for m in self.modules() if isinstance(m, AssignAttention) and m.logit_scale is not None]

    def project_text_features(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(..., width) text-tower outputs (e.g. cached ones of a locked tower) -> (..., D) embeddings."""
        x = self.text_proj(features.to(self.text_proj.fc2.weight.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self,
        pixels: torch.Tensor,
        text: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        return_groups: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Embed a batch of images and texts.

        Args:
            pixels: (B, 3, H, W).
            text: (B, L) token ids, or (B, T, L) for several texts per image (caption + prompts).
            attention_mask: optional mask matching ``text``.
            text_features: instead of ``text``, text-tower outputs (B, [T,] width), e.g. cached
                features of a locked text tower; only the projection runs.
            return_groups: also return ``group_embeds`` (B, G, D) L2-normalised and
                ``groupings``, per grouping stage the (B, G_s, h, w) soft patch-to-segment
                maps (for the segment losses of ``groupseg.loss``).

        Returns:
            ``image_embeds`` (B, D), ``text_embeds`` (B, D) or (B, T, D), both L2-normalised,
            ``logit_scale`` and ``multi_label_logit_scale`` (exp'd, clamped at 100).
        """
        vis = self.visual(pixels)
        out = {
            "image_embeds": F.normalize(self.visual_proj(vis.pooled), dim=-1),
            "text_embeds": (
                self.encode_text(text, attention_mask) if text_features is None else self.project_text_features(text_features)
            ),
            "logit_scale": self.logit_scale.exp().clamp(max=100),
        }
        if return_groups:
            out["group_embeds"] = F.normalize(self.visual_proj(vis.tokens), dim=-1)
            out["groupings"] = [soft_grouping(vis.assignments[: s + 1], vis.grid) for s in range(len(vis.assignments))]
        if self.multi_label_logit_scale is not None:
            out["multi_label_logit_scale"] = self.multi_label_logit_scale.exp().clamp(max=100)
        return out

    # ---------------------------------------------------------------- weights
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        tmp = directory / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt", "groupseg": "1"})
        tmp.replace(directory / "model.safetensors")
        self.cfg.save(directory / "config.json")
        return directory
