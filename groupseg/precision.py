"""Which float precision a machine runs fast: bf16 autocast on GPUs and on CPUs with native bf16."""
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


def resolve_precision(p: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> bf16 on GPUs with bf16 (fp16 on older ones) and CPUs with native bf16, else fp32."""
    if p != "auto":
        return p
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """An autocast context for ``precision`` (``fp32`` = none)."""
    dev = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(dev.type, dtype=dtype)
