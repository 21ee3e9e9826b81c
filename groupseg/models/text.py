"""Text towers: CLIP-style causal transformer, or a Hugging Face encoder."""
from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from ..layers.block import Block
from ..layers.create import layer_types


class TextTransformer(nn.Module):
    """CLIP-style text transformer over BPE token ids, pooled at the end-of-text token.

    Sequences may be shorter than ``context_length``: with a causal mask, trailing
    padding never changes earlier tokens, so trimming a batch to its longest prompt
    gives the same embeddings faster.

    Args:
        cfg: the text configuration.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        act_layer, norm_layer = layer_types(cfg.act, cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, act_layer, norm_layer) for _ in range(cfg.depth)
        )
        self.norm = norm_layer(cfg.width)
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: (B, L) with L <= context_length. Returns (B, width)."""
        if self.cfg.pool == "eot":
            # trim trailing padding: only tokens up to the last end-of-text matter
            last = int(ids.argmax(dim=-1).max()) + 1
            ids = ids[:, :last]
        L = ids.shape[1]
        if L > self.cfg.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context length {self.cfg.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:L]  # (B, L, C)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, self.cfg.causal, use_reentrant=False)
            else:
                x = blk(x, causal=self.cfg.causal)
        x = self.norm(x)
        if self.cfg.pool == "eot":
            return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        if self.cfg.pool == "cls":
            return x[:, 0]
        if attention_mask is None:
            return x.mean(dim=1)
        m = attention_mask[:, :L, None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder (BERT, MiniLM, ...) as the text tower, mean-pooled over tokens.

    The architecture comes from ``cfg.hf_config`` (a transformers config dict), so a
    saved groupseg model rebuilds it offline without the original download.

    Args:
        cfg: the text configuration with ``kind="hf"``.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if not cfg.hf_config:
            raise ValueError("text.kind='hf' needs text.hf_config (a transformers config dict)")
        hf = dict(cfg.hf_config)
        model_type = hf.pop("model_type")
        self.cfg = cfg
        self.encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **hf), add_pooling_layer=False)

    @property
    def width(self) -> int:
        return self.encoder.config.hidden_size

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = (ids != self.encoder.config.pad_token_id).long()
        last = int(attention_mask.sum(-1).max())
        ids, attention_mask = ids[:, :last], attention_mask[:, :last]
        x = self.encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # (B, L, C)
        if self.cfg.pool == "cls":
            return x[:, 0]
        m = attention_mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)


def build_text_tower(cfg: TextConfig) -> nn.Module:
    """The text tower ``cfg.kind`` names: ``TextTransformer`` or ``HFTextEncoder``.

    Args:
        cfg: the text configuration.
    """
    return HFTextEncoder(cfg) if cfg.kind == "hf" else TextTransformer(cfg)
