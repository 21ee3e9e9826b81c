"""Multi-head attention with a fused QKV projection, for self- and cross-attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# dtypes whose attention runs on CPU through plain matmuls (see ``_math_attention``): a train step of
# the gvit-s config is 1.19x (bf16) and 1.04x (fp32) faster than with the fused SDPA CPU kernel
# (benchmarks/RESULTS.md); benchmarks change it to compare
CPU_MATMUL_ATTENTION_DTYPES: set[torch.dtype] = {torch.bfloat16, torch.float32}


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    One fused ``qkv`` weight serves both modes: self-attention projects the input
    once; cross-attention projects queries with the first third of the weight and
    keys/values with the rest.

    Args:
        dim: channels of queries, keys and values.
        num_heads: attention heads; ``dim`` must divide evenly.
        qkv_bias: bias on the q/k/v projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Attend from ``x`` (B, N, C) to ``context`` (B, S, C), or to itself when None."""
        h = self.num_heads
        if context is None:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=h)
        else:
            dim = x.shape[-1]
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:dim], None if b is None else b[:dim])
            kv = F.linear(context, w[dim:], None if b is None else b[dim:])
            q = rearrange(q, "b n (h d) -> b h n d", h=h)
            k, v = rearrange(kv, "b s (two h d) -> two b h s d", two=2, h=h)
        if q.device.type == "cpu" and q.dtype in CPU_MATMUL_ATTENTION_DTYPES:
            out = _math_attention(q, k, v, causal)  # faster than the fused CPU kernel at these sizes
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with plain matmuls: on CPUs with native bf16 these run on the
    fast bf16 GEMM path, while ``scaled_dot_product_attention``'s fused CPU kernel does not."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, N, S)
    if causal:
        n, s = attn.shape[-2:]
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(s - n + 1)
        attn = attn.masked_fill(mask, float("-inf"))
    return attn.softmax(-1) @ v
