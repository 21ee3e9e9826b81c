"""Multi-head attention with a fused QKV projection, for self- and cross-attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# dtypes whose attention runs on CPU through plain matmuls when a module's ``fused_attn`` is None
# (the default): under bf16 autocast a train step of the gvit-s config is 1.05-1.19x faster than
# with the fused SDPA CPU kernel. fp32 takes SDPA: 1.17x faster than plain matmuls on an Intel
# Xeon (AVX-512) and 1.12x with its kernels held to AVX2, against 0.96x on the AMD EPYC of
# 2026-11-24 (benchmarks/RESULTS.md). Read-only: to compare paths, set the modules' flag
# (``set_fused_attn``), not this.
CPU_MATMUL_DTYPES: frozenset[torch.dtype] = frozenset({torch.bfloat16})


def default_fused_attn(device: torch.device, dtype: torch.dtype) -> bool:
    """The measured-faster path: plain matmuls on CPU for ``CPU_MATMUL_DTYPES``, fused SDPA elsewhere.

    >>> default_fused_attn(torch.device("cpu"), torch.bfloat16), default_fused_attn(torch.device("cpu"), torch.float32)
    (False, True)
    """
    return not (device.type == "cpu" and dtype in CPU_MATMUL_DTYPES)


class Attention(nn.Module):
    """Multi-head attention, through ``F.scaled_dot_product_attention`` or plain matmuls.

    One fused ``qkv`` weight serves both modes: self-attention projects the input
    once; cross-attention projects queries with the first third of the weight and
    keys/values with the rest.

    Args:
        dim: channels of queries, keys and values.
        num_heads: attention heads; ``dim`` must divide evenly.
        qkv_bias: bias on the q/k/v projection.
        fused_attn: attention path (timm's ``fused_attn``): True = fused
            ``scaled_dot_product_attention``, False = plain matmuls and softmax, None = the
            faster one for the input's device and dtype (``default_fused_attn``). A plain
            attribute, so it can be changed on a built module (``set_fused_attn``).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.fused_attn = fused_attn
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
        fused = self.fused_attn if self.fused_attn is not None else default_fused_attn(q.device, q.dtype)
        if fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, N, d)
        else:
            out = math_attention(q, k, v, causal)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with plain matmuls: on CPUs these run on the fast GEMM path
    (bf16 where native), while ``scaled_dot_product_attention``'s fused CPU kernel does not.

    Args:
        q: queries (B, h, N, d).
        k: keys (B, h, S, d).
        v: values (B, h, S, d).
        causal: mask keys after each query (aligned at the end, as SDPA's ``is_causal``).
    """
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, N, S)
    if causal:
        n, s = attn.shape[-2:]
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(s - n + 1)
        attn = attn.masked_fill(mask, float("-inf"))
    return attn.softmax(-1) @ v  # (B, h, N, d)


def set_fused_attn(module: nn.Module, fused_attn: bool | None) -> int:
    """Set ``fused_attn`` on every ``Attention`` inside ``module``; returns how many were set.

    Args:
        module: a model or layer.
        fused_attn: see ``Attention``.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused_attn
            n += 1
    return n
