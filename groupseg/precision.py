"""Which float precision a machine runs fast: bf16 autocast on GPUs, and on CPUs whose native bf16
is measured faster than fp32 (AVX512-BF16 without AMX can be slower: Intel Xeons of 2026 ran bf16
matrix products at 0.6x fp32)."""
from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch


# the instruction-set flags that decide which precision a CPU runs fast (names as in /proc/cpuinfo)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where that is missing)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """Which of ``CPU_FLAGS`` this CPU has, e.g. ``{"avx2": True, "avx512f": False, ...}``."""
    words = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            words = set(line.split(":", 1)[1].split())
            break
    return {f: f in words for f in CPU_FLAGS}


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    flags = cpu_flags()
    return flags["avx512_bf16"] or flags["amx_bf16"]


@lru_cache(maxsize=1)
def cpu_matmul_seconds(n: int = 768, reps: int = 3) -> dict[str, float]:
    """Best-of-``reps`` seconds of an n x n x n matrix product in fp32 and in bf16 on this CPU (~0.1 s in all)."""
    import time

    a = torch.randn(n, n)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = a.to(dtype)
        x @ x  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def cpu_bf16_is_faster(margin: float = 0.8) -> bool:
    """True when this CPU has native bf16 and a bf16 matrix product takes under ``margin`` of fp32's time."""
    if not cpu_has_bf16():
        return False
    t = cpu_matmul_seconds()
    return t["bf16"] < margin * t["fp32"]


def resolve_precision(p: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> bf16 on GPUs with bf16 (fp16 on older ones); on CPUs, bf16 where it is native and
    measured faster than fp32 (``cpu_bf16_is_faster``), else fp32."""
    if p != "auto":
        return p
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_is_faster() else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """An autocast context for ``precision`` (``fp32`` = none)."""
    dev = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(dev.type, dtype=dtype)
